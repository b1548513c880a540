"""Running the all-pairs study (preprint §6.1–6.2, Figures 2, 3, Appendix C).

:func:`run_study` scores eq. 8, θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ, for every ordered pair
(source S, target T ≠ S) of a set of domains and writes one tidy table (:mod:`diag.table`),
one row per (S, T, λ2) and run — (α, training seed, θ_ft* variant): with ``StudySettings(seeds=(0, 1, 2))``
every pair is scored on each seed's vectors and φ — built by :func:`pair_rows`:

* every row of :func:`diag.transfer.evaluate.evaluate_pair`, as columns ``<metric><_suffix>``
  (:data:`diag.transfer.evaluate.ROW_SUFFIX`): the proposed model without suffix, the references
  ``_ft_target``, ``_zeroshot``, ``_ftx_target``, ``_ft_source_on_target``,
  ``_ftx_source_on_target``, the controls ``_random`` (mean over draws, ``_random_sd`` their
  sd), ``_other`` and ``_other_rescaled`` (τ* of ``other_source``, as is and at ‖τ*ˢ‖),
  ``_meanmap`` and ``_meanmap_target``;
* the pair's features from :func:`diag.features.pair_features.pair_features` (``cos_ft``,
  ``cos_ft.<group>``, ``cos_star``, ``norm_*``, ``risk_*``, ``grad_dot_tau``) and ``absent`` (why a
  feature does not apply);
* the target's ``val`` split (never ``test``) for the λ2 choice: ``accuracy_val`` (eq. 8 at this λ2),
  ``acc_drop_val_se`` (the paired standard error of its drop against θ_ftᵀ on the same images),
  ``accuracy_val_ft_target`` (θ_ftᵀ) and ``loss_increase_val`` (what the loss model predicts; ``_se`` its paired se), from
  :func:`diag.transfer.budget.accuracy_grid`;
* the run: ``alpha``, ``seed``, ``variant``; every metric has an image-specific twin ``ermse_img*``;
* the source's own quality on S's val split (features, so never its test split): ``ermse_star_source``
  (θ_ft*ˢ), ``accuracy_ft_source``;
* provenance: ``base_hash``, ``backbone_id``, ``tvdiag_version``, ``study_version``, ``pair_key``, ``card_form``
  (with curvature: the card form ``risk_card`` and ``grad_dot_tau`` came from),
  ``n_test``, ``ks``, ``seconds``.

Cost: each domain's test set is loaded once (the shared :class:`~diag.runtime.context.Workspace`); every
pair then costs a handful of forward passes over T's test set. Resume and shards: see
:mod:`diag.table`; under torchrun the shard defaults to (rank, world size).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from diag.constants import DEFAULT_MAX_ACC_DROP, PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2, RANDOM_DRAWS
from diag.decide.predictor import RANKER
from diag.decide.recommend import ranker_gains
from diag.decide.record import distinct_pairs
from diag.features.pair_features import CurvatureSettings, Diagnostics, pair_features
from diag.runtime.context import Workspace
from diag.runtime.distributed import barrier, claimed, is_distributed, rank_and_world
from diag.runtime.shards import build_curvatures
from diag.runtime.workers import release_freed_memory
from diag.study.provenance import code_version, record, run_provenance
from diag.table import (add_normalised, append_rows, check_shard, dedupe, default_shard, DEFAULT_STUDY, lam_key,
                        merge_shards, ordered_pairs, pair_key, PAIRS_FILE, PLAIN, read_table, shard_file,
                        STUDY_VERSION, table_files, with_run_columns)
from diag.transfer.budget import accuracy_grid
from diag.transfer.eq8 import evaluate_state
from diag.transfer.evaluate import evaluate_pair, with_method
from diag.transfer.methods import CURVED_METHODS, METHODS, RANKED_METHODS
from train import __version__
from train.errors import ArtifactError, DataError, unknown
from train.store import Store
from train.vectors import check_scale

log = logging.getLogger(__name__)



@dataclass
class StudySettings:
    """The science settings of a study: what its rows depend on besides the artifacts.

    Args:
        alpha: α of θ_ft* (τ* = θ_ft* − θ_ft).
        lambda1: scale of τ_ftᵀ in eq. 8; lambda2s: the scales of τ*ˢ scored per pair (deduplicated,
            rounded to :func:`diag.table.lam_key`).
        seeds: training seeds; each is a run with that seed's θ_ft, φ and θ_ft*, and seeds its
            controls (:func:`diag.transfer.evaluate.pair_seed`).
        variant: θ_ft* variant and τ*'s reference (:data:`train.store.VARIANTS`).
        controls: score the control rows; n_random: draws of the random-direction control.
        curvature: compute the risk columns (each target's Hᵀ built once per seed, cached in the store);
            curvature_settings: how Hᵀ is estimated.
        methods: transfer methods scored per (pair, λ2, seed) (:data:`METHODS`; ``plain`` is always
            computed and comes first, its references and controls are shared by the others' rows).
        max_acc_drop: val-accuracy budget of each method's choice.

    Raises:
        DataError: no λ2 or no seed. UnknownNameError: a method not in :data:`METHODS`.
    """

    alpha: float = PAPER_ALPHA
    lambda1: float = PAPER_LAMBDA1
    lambda2s: tuple[float, ...] = (PAPER_LAMBDA2,)
    seeds: tuple[int, ...] = (0,)
    variant: str = "paper"
    controls: bool = True
    curvature: bool = True
    curvature_settings: CurvatureSettings = field(default_factory=CurvatureSettings)
    methods: tuple[str, ...] = (PLAIN,)
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP
    n_random: int = RANDOM_DRAWS

    def __post_init__(self) -> None:
        self.lambda1 = check_scale("lambda1", self.lambda1)
        self.lambda2s = tuple(dict.fromkeys(lam_key(check_scale("lambda2", v)) for v in self.lambda2s))
        self.seeds = tuple(dict.fromkeys(int(s) for s in self.seeds))
        if not self.lambda2s or not self.seeds:
            raise DataError(f"give at least one λ2 and one seed (got λ2 {list(self.lambda2s)}, seeds "
                            f"{list(self.seeds)})")
        for m in self.methods:
            if m not in METHODS:
                raise unknown("study method", m, METHODS)
        self.methods = tuple(dict.fromkeys([PLAIN, *self.methods]))
        if self.curvature_settings is None:
            self.curvature_settings = CurvatureSettings()

    def key_payload(self, seed: int, method: str = PLAIN) -> dict:
        """The settings the rows of training seed ``seed``'s run and ``method`` depend on (part of every
        ``pair_key``; ``plain``'s payload is the pre-method one: old tables resume; a ranked mix's names the
        ranker and the training seeds whose pairs it learns, so rows weighted by another fit are recomputed,
        never reused)."""
        out = {"alpha": float(self.alpha), "lambda1": float(self.lambda1), "controls": bool(self.controls),
               "curvature": bool(self.curvature), "seed": int(seed), "n_random": int(self.n_random),
               "variant": self.variant}
        if self.curvature or method in CURVED_METHODS:
            out["curvature_settings"] = asdict(self.curvature_settings)
        if method != PLAIN:
            out.update(method=method, max_acc_drop=float(self.max_acc_drop))
        if method in RANKED_METHODS:  # its weights are the ranker's, fitted on the plain rows of every run
            out.update(ranker=RANKER, ranker_seeds=list(self.seeds))
        return out


def source_quality(ws: Workspace, source: str, cache: dict) -> dict:
    """The source's own quality on its val split (never its test split: these are ranker features): E-RMSE of
    θ_ft*ˢ, accuracy of θ_ftˢ and θ_ft*ˢ (``cache`` per run)."""
    if source not in cache:
        tset = ws.target_set(source, "val", explained=True)
        ft = evaluate_state(ws, tset, ws.state(ws.vector(source, "ft")), "θ_ftˢ")
        ftx = evaluate_state(ws, tset, ws.state(ws.vector(source, "ftx")), "θ_ft*ˢ")
        cache[source] = {"ermse_star_source": ftx.ermse, "accuracy_ft_source": ft.accuracy,
                         "accuracy_ftx_source": ftx.accuracy}
    return cache[source]


def pair_rows(diag: Diagnostics, source: str, target: str, settings: StudySettings, lambda2s: Sequence[float],
              candidates: Sequence[str], keys: dict[str, str], quality: dict,
              done: set | frozenset = frozenset(), gains: dict | None = None) -> list[dict]:
    """The study rows of one pair, one per (method, λ2) not in ``done``: :func:`evaluate_pair` +
    :func:`pair_features` + provenance.

    ``keys``: method → that method's ``pair_key`` (``plain`` always: its results — references,
    controls and eq. 8 — are computed first and shared by every method's row, which adds only
    its own vector: :func:`diag.transfer.evaluate.with_method`). Each method's curvature is the target's
    (:meth:`Diagnostics.curvature`, built once per target and run, cached in the store).
    ``gains``: target → the ranker's predicted gain per source (``mix-ranked``, :func:`ranked_gains`).
    """
    start = time.perf_counter()
    ws = diag.ws
    results = evaluate_pair(ws, source, target, settings.lambda1, lambda2s, settings.controls, candidates,
                            settings.n_random)
    val = accuracy_grid(ws, target, [source], settings.lambda1, lambda2s)
    feats = pair_features(diag, source, target, curvature=settings.curvature, exact=True)
    ft_t = results[0].row("θ_ftᵀ")
    fixed = {**feats.values, "accuracy_val_ft_target": val.attrs["accuracy_ft_target"], "absent": feats.absent_text(),
             **source_quality(ws, source, quality), "base_hash": ws.base_hash,
             "backbone_id": ws.store.backbone_id, "tvdiag_version": __version__, "study_version": STUDY_VERSION,
             "n_test": int(ft_t.n), "ks": ",".join(str(k) for k in ft_t.ks),
             **({"card_form": diag.card_form} if settings.curvature else {})}  # the form risk_card came from
    rows = [{**r.to_row(), **fixed, "method": PLAIN, "pair_key": keys[PLAIN], "accuracy_val": float(acc),
             "acc_drop_val_se": float(se), "loss_increase_val": float(loss), "loss_increase_val_se": float(loss_se)}
            for r, acc, se, loss, loss_se in zip(results, val["accuracy"], val["acc_drop_se"], val["loss_increase"],
                                                 val["loss_increase_se"])
            if (keys[PLAIN], lam_key(r.lambda2)) not in done]
    for method in (m for m in keys if m != PLAIN):
        todo = [r for r in results if (keys[method], lam_key(r.lambda2)) not in done]
        curv = diag.curvature(target, need_operator=method == "blocks", need_eig=method == "project") \
            if method in CURVED_METHODS else None
        for r in todo:
            m = with_method(ws, r, method, curv, candidates, settings.max_acc_drop,
                            (gains or {}).get(target) if method in RANKED_METHODS else None)
            rows.append({**m.to_row(), **fixed, "pair_key": keys[method], "accuracy_val": m.repair["val_accuracy"],
                         "loss_increase_val": m.repair["measured_loss_increase"],
                         "loss_increase_val_se": m.repair["measured_loss_increase_se"]})
    seconds = time.perf_counter() - start
    return [{**r, "seconds": seconds} for r in rows]


def _check_domains(ws: Workspace, domains: Sequence[str]) -> list[str]:
    """``domains`` (deduplicated) when the store holds every artifact of ``ws``'s run for each."""
    store = ws.store
    domains = list(dict.fromkeys(domains))
    if len(domains) < 2:
        raise DataError(f"the study needs at least 2 domains, got {domains}")
    if not store.base_path().is_file():
        raise ArtifactError(f"no base model in {store.folder}; run `diag zoo` first")
    for d in domains:
        for path in (ws.vector_path(d, "ft"), ws.vector_path(d, "ftx"), ws.vector_path(d, "ref"), ws.attribution_path(d),
                     store.head_path(d)):
            if not path.is_file():
                raise ArtifactError(f"missing artifact {path} for domain '{d}' (seed {ws.seed}, variant "
                                    f"{ws.variant}, α={ws.alpha:g}); run `diag zoo --domains {d}` for that run")
    return domains


def _done(out_dir: Path, path: Path, resume: bool, every_shard: bool = False) -> set[tuple[str, float]]:
    """(pair_key, λ2) already in the tables (resume), after a full validated read: ``pairs.csv`` and this
    shard's table, or with ``every_shard`` every shard table of the folder (pairs are claimed, not assigned:
    a pair another rank computed before may come to this one)."""
    if not resume:
        if path.is_file():
            path.unlink()
        return set()
    files = table_files(out_dir) if every_shard else [out_dir / PAIRS_FILE, path]
    prev = [read_table(f) for f in dict.fromkeys(files) if f.is_file()]
    if not prev:
        return set()
    table = pd.concat(prev, ignore_index=True)
    return set(zip(table["pair_key"].astype(str), table["lambda2"].map(lam_key)))


def run_study(store: Store, domains: Sequence[str], settings: StudySettings, *,
              out_dir: str | Path | None = None, shard: tuple[int, int] | None = None, resume: bool = True,
              progress: bool = True, data: dict | None = None, name: str = DEFAULT_STUDY,
              workspace: Workspace | None = None) -> pd.DataFrame:
    """Score eq. 8, its controls and the pair features for every ordered pair of ``domains``, λ2, seed and method.

    Args:
        store: artifact store holding base, heads, vectors and φ of every domain and seed.
        domains: at least two domains; n domains give n·(n−1) pairs.
        settings: the science settings (α, λ1, λ2s, training seeds, variant, controls, curvature,
            methods, budget): :class:`StudySettings`.
        out_dir: study folder (default ``store.study_dir(name)``).
        shard: (i, n): only pairs with index % n == i. Default: under torch.distributed every rank claims
            the next missing pair from a shared queue (:func:`~diag.runtime.distributed.claimed`), each writing
            its rows to its own shard table; else (0, 1).
        resume: skip pairs whose rows (same ``pair_key`` — pair, settings, run — and λ2) are already written.
        progress: tqdm bar over pairs; data: domain → local dataset path.
        workspace: a shared :class:`Workspace` (default: a new one on ``store``); θ_base is shared by all runs.

    Returns:
        The rows of this run's pairs, λ2s, seeds and methods (this shard's, when sharded), with normalised columns.

    Raises:
        DataError: fewer than 2 domains. ArtifactError: a missing artifact or a damaged table.

    Long because under torch.distributed every rank must pass the same collectives in the same order
    (the read of what is done, each run's curvature queue, its pair queues, the merge): one body keeps it.
    """
    lambda2s, methods = list(settings.lambda2s), list(settings.methods)
    code_version()  # read (and cached) before any row: the provenance names the code that ran, not a later checkout
    root = workspace or Workspace(store, settings.alpha, data)
    runs = [root.for_run(alpha=settings.alpha, seed=s, variant=settings.variant) for s in settings.seeds]
    for ws in runs:
        domains = _check_domains(ws, domains)
    dynamic = shard is None and is_distributed() and rank_and_world()[1] > 1  # pairs claimed from a queue
    shard = check_shard(shard if shard is not None else default_shard())
    out_dir = Path(out_dir) if out_dir is not None else store.study_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_file(shard)
    all_pairs = ordered_pairs(domains)
    pairs = all_pairs if dynamic else [p for k, p in enumerate(all_pairs) if k % shard[1] == shard[0]]
    done = _done(out_dir, path, resume, every_shard=dynamic)
    if dynamic:
        barrier()  # every rank read the same tables before any writes: the same queue of missing pairs
    wanted: set[str] = set()
    every: set[str] = set()  # every pair of every run: what rank 0 reports after merging the shards
    run_keys = []
    for ws in runs:
        dkeys: dict = {}
        keys = {p: {m: pair_key(store, p[0], p[1], settings.key_payload(ws.seed, m), ws.base_hash, dkeys)
                    for m in methods} for p in all_pairs}
        run_keys.append(keys)
        wanted |= {k for p in pairs for k in keys[p].values()}
        every |= {k for p in all_pairs for k in keys[p].values()}
        if settings.curvature:  # under torchrun each target's Hᵀ is built by one rank before the pairs are split
            build_curvatures(Diagnostics(ws, settings=settings.curvature_settings, progress=progress,
                                         data_parallel=False), domains)
        _run_pairs(ws, pairs, {p: {m: k for m, k in keys[p].items() if m not in RANKED_METHODS} for p in pairs},
                   settings, lambda2s, domains, path, done, progress, dynamic=dynamic)
    ranked = [m for m in methods if m in RANKED_METHODS]
    all_plain = {keys[p][PLAIN] for keys in run_keys for p in all_pairs}
    for ws, keys in zip(runs, run_keys):
        if any((keys[p][m], lam) not in done for m in ranked for p in pairs for lam in lambda2s):
            # second pass: the ranker learns the plain rows of every pair of every run (as rank-sources does)
            gains = ranked_gains(out_dir, path, {keys[p][PLAIN] for p in all_pairs}, len(all_pairs), all_plain)
            _run_pairs(ws, pairs, {p: {PLAIN: keys[p][PLAIN], **{m: keys[p][m] for m in ranked}} for p in pairs},
                       settings, lambda2s, domains, path, done, progress, gains, dynamic=dynamic)
    if shard[1] > 1 and _merge_distributed(out_dir):  # rank 0 under torch.distributed: pairs.csv has every shard
        path, wanted = out_dir / PAIRS_FILE, every
    if path.name == PAIRS_FILE and path.is_file():  # the whole table's writer (not a shard) records where it came from
        for ws in runs:
            record(path, f"alpha={ws.alpha:g} seed={ws.seed} variant={ws.variant}",
                   run_provenance(ws, settings, domains))
    return _collect(out_dir, path, wanted, lambda2s)


def _run_pairs(ws: Workspace, pairs: list, keys: dict, settings: StudySettings, lambda2s: list[float],
               domains: list[str], path: Path, done: set, progress: bool, gains: dict | None = None, *,
               dynamic: bool = False) -> None:
    """Score and append the missing (pair, method, λ2) rows of one run (resumable pair by pair); with
    ``dynamic`` each missing pair is claimed from the ranks' shared queue."""
    missing = {p: {(k, l2) for k in keys[p].values() for l2 in lambda2s} - done for p in pairs}
    todo = [p for p in pairs if missing[p]]
    log.info("study seed %d variant %s: %d pairs in this shard, %d to compute", ws.seed, ws.variant,
             len(pairs), len(todo))
    if not todo:
        return
    diag = Diagnostics(ws, settings=settings.curvature_settings, progress=progress, data_parallel=False)
    quality: dict = {}
    mine = claimed(todo, "study pairs") if dynamic else todo
    bar = tqdm(mine, desc=f"study pairs (seed {ws.seed}, {ws.variant})", disable=not progress, unit="pair",
               total=None if dynamic else len(todo))
    for source, target in bar:
        bar.set_postfix_str(f"{source}→{target}")
        lams = sorted({l2 for _, l2 in missing[(source, target)]})
        append_rows(path, pair_rows(diag, source, target, settings, lams, domains, keys[(source, target)],
                                    quality, done, gains))
        done.update(missing[(source, target)])
        release_freed_memory()


def ranked_gains(out_dir: Path, path: Path, plain_keys: set[str], n_pairs: int,
                 known_keys: set[str] | None = None) -> dict[str, dict]:
    """target → the ranker's predicted gain per source (:func:`diag.decide.recommend.ranker_gains`), from this run's plain rows.

    The rows at λ2 = 0.7 (else the λ2 nearest to it) of every pair of the run are read from the
    study's tables; for each target the ranker is fitted on the pairs without it — those of every run
    in ``known_keys`` (default this run's: ``plain_keys``), as ``rank-sources`` fits the sources' record
    on the study's pairs at every training seed — and reads only the features of this run's pairs of the
    target. ``mix-ranked`` rows are therefore computed after the plain rows of every run, re-scoring
    each pair's references and controls (one more :func:`evaluate_pair`).

    Raises:
        DataError: some pair of the run has no plain row here (a shard sees only its own pairs:
            run the study with the other methods first, merge, then resume with ``mix-ranked``).
    """

    files = [f for f in dict.fromkeys([out_dir / PAIRS_FILE, path]) if f.is_file()]
    table = dedupe(pd.concat([read_table(f) for f in files], ignore_index=True)) if files else pd.DataFrame()
    plain = table[table["pair_key"].astype(str).isin(plain_keys)] if len(table) else table
    have = distinct_pairs(plain)
    if have < n_pairs:
        raise DataError(f"{' and '.join(RANKED_METHODS)} need the plain rows of all {n_pairs} pairs of the run, found {have}: run the "
                        "study without it first (and merge the shards), then resume with it")
    known = table[table["pair_key"].astype(str).isin(known_keys or plain_keys)]
    plain, known = _near_paper(plain), _near_paper(known)
    return {t: ranker_gains(plain, t, known=known)[0] for t in sorted(plain["target"].unique())}


def _near_paper(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows at λ2 = 0.7, else at the λ2 of the table nearest to it."""
    lams = rows["lambda2"].astype(float)
    return rows[lams == lams.iloc[(lams - PAPER_LAMBDA2).abs().argmin()]]


def _collect(out_dir: Path, path: Path, wanted: set[str], lambda2s: list[float]) -> pd.DataFrame:
    """This run's rows from the study's tables, deduplicated and normalised."""
    files = [f for f in dict.fromkeys([out_dir / PAIRS_FILE, path]) if f.is_file()]
    if not files:
        return pd.DataFrame()
    table = dedupe(pd.concat([read_table(f) for f in files], ignore_index=True))
    table = table[table["pair_key"].astype(str).isin(wanted) & table["lambda2"].map(lam_key).isin(lambda2s)]
    return add_normalised(with_run_columns(table.reset_index(drop=True)))


def _merge_distributed(out_dir: Path) -> bool:
    """Under an initialised process group: wait for every rank, rank 0 merges the shards.

    Returns True on the rank that merged. Every rank must call this (it holds barriers).
    """
    import torch.distributed as dist


    if not is_distributed():
        return False
    dist.barrier()
    rank, _ = rank_and_world()
    if rank == 0:
        merge_shards(out_dir)
    dist.barrier()
    return rank == 0
