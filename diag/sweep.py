"""Running the all-pairs study (preprint §6.1–6.2, Figures 2, 3, Appendix C).

:func:`run_study` scores eq. 8, θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ, for every ordered pair
(source S, target T ≠ S) of a set of domains and writes one tidy table (:mod:`diag.pairs`),
one row per (S, T, λ2), built by :func:`pair_rows`:

* every row of :func:`diag.transfer.evaluate_pair`, as columns ``<metric><_suffix>``
  (:data:`diag.transfer.ROW_SUFFIX`): the proposed model without suffix, the references
  ``_ft_target``, ``_zeroshot``, ``_ftx_target``, ``_ft_source_on_target``,
  ``_ftx_source_on_target``, the controls ``_random`` (mean over draws, ``_random_sd`` their
  sd), ``_other`` and ``_other_rescaled`` (τ* of ``other_source``, as is and at ‖τ*ˢ‖),
  ``_meanmap`` and ``_meanmap_target``;
* the pair's features from :func:`diag.diagnostics.pair_features` (``cos_ft``,
  ``cos_ft.<group>``, ``cos_star``, ``norm_*``, ``risk_*``) and ``absent`` (why a feature
  does not apply);
* the source's own quality on S's test set: ``ermse_star_source`` (θ_ft*ˢ), ``accuracy_ft_source``;
* provenance: ``base_hash``, ``backbone_id``, ``tvdiag_version``, ``study_version``, ``pair_key``,
  ``n_test``, ``ks``, ``seconds``.

Cost: each domain's test set is loaded once (the shared :class:`~diag.context.Workspace`); every
pair then costs a handful of forward passes over T's test set. Resume and shards: see
:mod:`diag.pairs`; under torchrun the shard defaults to (rank, world size).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from diag.constants import LAMBDA_GRID, PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2, RANDOM_DRAWS
from diag.context import Workspace
from diag.diagnostics import CurvatureSettings, Diagnostics, pair_features
from diag.pairs import (DEFAULT_STUDY, PAIRS_FILE, STUDY_VERSION, add_normalised, append_rows, check_shard, dedupe,
                        default_shard, lam_key, merge_shards, ordered_pairs, pair_key, read_table, shard_file)
from diag.transfer import evaluate_pair, evaluate_state
from train import __version__
from train.errors import ArtifactError, DataError
from train.store import Store
from train.vectors import check_scale

log = logging.getLogger(__name__)


@dataclass
class StudySettings:
    """What a study's rows depend on besides the artifacts (part of every ``pair_key``)."""

    alpha: float = PAPER_ALPHA
    lambda1: float = PAPER_LAMBDA1
    controls: bool = True
    curvature: bool = True
    seed: int = 0
    n_random: int = RANDOM_DRAWS
    curvature_settings: CurvatureSettings = field(default_factory=CurvatureSettings)

    def key_payload(self) -> dict:
        out = {"alpha": float(self.alpha), "lambda1": float(self.lambda1), "controls": bool(self.controls),
               "curvature": bool(self.curvature), "seed": int(self.seed), "n_random": int(self.n_random)}
        if self.curvature:
            out["curvature_settings"] = asdict(self.curvature_settings)
        return out


def source_quality(ws: Workspace, source: str, cache: dict) -> dict:
    """The source's own quality on its test set: E-RMSE of θ_ft*ˢ, accuracy of θ_ftˢ and θ_ft*ˢ."""
    if source not in cache:
        tset = ws.target_set(source, "test")
        ft = evaluate_state(ws, tset, ws.state(ws.vector(source, "ft")), "θ_ftˢ")
        ftx = evaluate_state(ws, tset, ws.state(ws.vector(source, "ftx")), "θ_ft*ˢ")
        cache[source] = {"ermse_star_source": ftx.ermse, "accuracy_ft_source": ft.accuracy,
                         "accuracy_ftx_source": ftx.accuracy}
    return cache[source]


def pair_rows(diag: Diagnostics, source: str, target: str, settings: StudySettings, lambda2s: Sequence[float],
              candidates: Sequence[str], key: str, quality: dict) -> list[dict]:
    """The study rows of one pair, one per λ2: :func:`evaluate_pair` + :func:`pair_features` + provenance."""
    start = time.perf_counter()
    ws = diag.ws
    results = evaluate_pair(ws, source, target, settings.lambda1, lambda2s, settings.controls, settings.seed,
                            candidates, settings.n_random)
    feats = pair_features(diag, source, target, curvature=settings.curvature, exact=True)
    ft_t = results[0].row("θ_ftᵀ")
    fixed = {"variant": "proposed", **feats.values, "absent": feats.absent_text(),
             **source_quality(ws, source, quality), "base_hash": ws.base_hash,
             "backbone_id": ws.store.backbone_id, "tvdiag_version": __version__, "study_version": STUDY_VERSION,
             "pair_key": key, "n_test": int(ft_t.n), "ks": ",".join(str(k) for k in ft_t.ks)}
    seconds = time.perf_counter() - start
    return [{**r.to_row(), **fixed, "seconds": seconds} for r in results]


def _check_domains(store: Store, domains: Sequence[str], alpha: float) -> list[str]:
    domains = list(dict.fromkeys(domains))
    if len(domains) < 2:
        raise DataError(f"the study needs at least 2 domains, got {domains}")
    if not store.base_path().is_file():
        raise ArtifactError(f"no base model in {store.folder}; run `diag zoo` first")
    for d in domains:
        for path in (store.vector_path(d, "ft"), store.vector_path(d, "ftx", alpha), store.attribution_path(d),
                     store.head_path(d)):
            if not path.is_file():
                raise ArtifactError(f"missing artifact {path} for domain '{d}'; run `diag zoo --domains {d}`")
    return domains


def _done(out_dir: Path, path: Path, resume: bool) -> set[tuple[str, float]]:
    """(pair_key, λ2) already in the tables (resume), after a full validated read."""
    if not resume:
        if path.is_file():
            path.unlink()
        return set()
    prev = [read_table(f) for f in dict.fromkeys([out_dir / PAIRS_FILE, path]) if f.is_file()]
    if not prev:
        return set()
    table = pd.concat(prev, ignore_index=True)
    return set(zip(table["pair_key"].astype(str), table["lambda2"].map(lam_key)))


def run_study(store: Store, domains: Sequence[str], alpha: float = PAPER_ALPHA, lambda1: float = PAPER_LAMBDA1,
              lambda2s: Sequence[float] = (PAPER_LAMBDA2,), out_dir: str | Path | None = None,
              shard: tuple[int, int] | None = None, resume: bool = True, curvature: bool = True,
              curvature_settings: CurvatureSettings | None = None, controls: bool = True, progress: bool = True,
              data: dict | None = None, seed: int = 0, name: str = DEFAULT_STUDY,
              workspace: Workspace | None = None) -> pd.DataFrame:
    """Score eq. 8, its controls and the pair features for every ordered pair of ``domains`` at each λ2.

    Args:
        store: artifact store holding base, heads, vectors and φ of every domain.
        domains: at least two domains; n domains give n·(n−1) pairs.
        alpha: α of θ_ft* (τ* = θ_ft* − θ_ft); lambda1, lambda2s: scales of τ_ftᵀ and (each) of τ*ˢ.
        out_dir: study folder (default ``store.study_dir(name)``).
        shard: (i, n): only pairs with index % n == i (default: the process group's rank/world or (0, 1)).
        resume: skip pairs whose rows (same ``pair_key`` and λ2) are already written.
        curvature: compute the risk columns (each target's Hᵀ built once, cached in the store).
        curvature_settings: how Hᵀ is estimated; controls: score the control rows.
        progress: tqdm bar over pairs; data: domain → local dataset path.
        seed: the pairs' control seed (:func:`diag.transfer.pair_seed`).
        workspace: a shared :class:`Workspace` (default: a new one on ``store``).

    Returns:
        The rows of this run's pairs and λ2s (this shard's, when sharded), with normalised columns.

    Raises:
        DataError: fewer than 2 domains or no λ2. ArtifactError: a missing artifact or a damaged table.
    """
    settings = StudySettings(alpha, check_scale("lambda1", lambda1), controls, curvature, seed,
                             curvature_settings=curvature_settings or CurvatureSettings())
    lambda2s = list(dict.fromkeys(lam_key(check_scale("lambda2", v)) for v in lambda2s))
    if not lambda2s:
        raise DataError("give at least one λ2")
    domains = _check_domains(store, domains, alpha)
    shard = check_shard(shard if shard is not None else default_shard())
    out_dir = Path(out_dir) if out_dir is not None else store.study_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_file(shard)
    all_pairs = ordered_pairs(domains)
    pairs = [p for k, p in enumerate(all_pairs) if k % shard[1] == shard[0]]
    ws = workspace or Workspace(store, alpha, data)
    dkeys: dict = {}
    keys = {p: pair_key(store, p[0], p[1], settings.key_payload(), ws.base_hash, dkeys) for p in all_pairs}
    done = _done(out_dir, path, resume)
    todo = [p for p in pairs if any((keys[p], l2) not in done for l2 in lambda2s)]
    log.info("study: %d pairs in this shard, %d to compute", len(pairs), len(todo))
    if todo:
        diag = Diagnostics(ws, settings=settings.curvature_settings, progress=progress)
        quality: dict = {}
        bar = tqdm(todo, desc="study pairs", disable=not progress, unit="pair")
        for source, target in bar:
            bar.set_postfix_str(f"{source}→{target}")
            missing = [l2 for l2 in lambda2s if (keys[(source, target)], l2) not in done]
            append_rows(path, pair_rows(diag, source, target, settings, missing, domains, keys[(source, target)],
                                        quality))
            done.update((keys[(source, target)], l2) for l2 in missing)
    merged = shard[1] > 1 and _merge_distributed(out_dir)
    if merged:  # rank 0 under torch.distributed: every shard is in pairs.csv now
        path, pairs = out_dir / PAIRS_FILE, all_pairs
    return _collect(out_dir, path, {keys[p] for p in pairs}, lambda2s)


def _collect(out_dir: Path, path: Path, wanted: set[str], lambda2s: list[float]) -> pd.DataFrame:
    """This run's rows from the study's tables, deduplicated and normalised."""
    files = [f for f in dict.fromkeys([out_dir / PAIRS_FILE, path]) if f.is_file()]
    if not files:
        return pd.DataFrame()
    table = dedupe(pd.concat([read_table(f) for f in files], ignore_index=True))
    table = table[table["pair_key"].astype(str).isin(wanted) & table["lambda2"].map(lam_key).isin(lambda2s)]
    return add_normalised(table.reset_index(drop=True))


def _merge_distributed(out_dir: Path) -> bool:
    """Under an initialised process group: wait for every rank, rank 0 merges the shards.

    Returns True on the rank that merged. Every rank must call this (it holds barriers).
    """
    import torch.distributed as dist

    from diag.curvature.distributed import is_distributed, rank_and_world

    if not is_distributed():
        return False
    dist.barrier()
    rank, _ = rank_and_world()
    if rank == 0:
        merge_shards(out_dir)
    dist.barrier()
    return rank == 0


def lambda_sweep(store: Store, domains: Sequence[str], lambda2s: Sequence[float] = LAMBDA_GRID,
                 **kwargs) -> pd.DataFrame:
    """:func:`run_study` over the λ2 grid of Figure 3 (0.4 … 1.2); rows carry ``lambda2``."""
    return run_study(store, domains, lambda2s=lambda2s, **kwargs)
