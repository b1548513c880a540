"""The all-pairs study (preprint §6.1–6.2, Figures 2, 3, 5, Appendix C).

:func:`run_study` scores eq. 8, θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ, for every ordered pair
(source S, target T ≠ S) of a set of domains and writes one tidy table, one row per
(S, T, λ2):

* the proposed model: ``accuracy``, ``ermse``, ``kendall``, ``iou1``, ``iou5``, ``iou10``;
* the same six metrics with a suffix for every reference model, all on T's test set:
  ``_ft_target`` (θ_ftᵀ), ``_zeroshot`` (θ_base), ``_ftx_target`` (θ_ft*ᵀ, the upper
  bound), ``_ft_source_on_target`` (θ_ftˢ with T's head), ``_ftx_source_on_target`` (θ_ft*ˢ);
* controls: ``_random`` (a Gaussian vector with τ*ˢ's per-tensor norms added with the same
  λ2), ``_other`` (τ* of another source, named in ``other_source``), ``_meanmap`` (always
  predict the mean φ map of S's training images; its accuracy is θ_ftᵀ's) and
  ``_meanmap_target`` (the mean φ map of T, an oracle prior);
* normalised columns (÷ θ_ftᵀ): ``ermse_norm``, ``acc_norm``, ``acc_change``, ``iou10_norm``
  and ``ermse_norm_<control>`` / ``acc_norm_<control>``;
* diagnostics: ``cos_ft``, ``cos_star``, ``cos_ft.<group>``, ``norm_star_source``,
  ``norm_ft_source``, ``norm_ft_target``, ``risk_exact``, ``risk_diag``, ``risk_card``
  (cosines and norms in one float64 pass streamed over all vector files; the risks from
  :class:`diag.diagnostics.Diagnostics`, each target's curvature built once, NaN with
  ``curvature=False`` or without that module);
* the source's own quality on S's test set: ``ermse_star_source`` (θ_ft*ˢ) and
  ``accuracy_ft_source`` (θ_ftˢ);
* provenance: ``base_hash``, ``backbone_id``, ``alpha``, ``lambda1``, ``tvdiag_version``,
  ``pair_key`` (hash of the settings and of every artifact key the pair was computed from),
  ``diagnostics`` (which code produced them), ``n_test``, ``ks``, ``seconds``.

Cost: each domain's test set, base and θ_ftᵀ scores are set up once (n setups); every pair
then costs a handful of forward passes over T's test set (n² cheap evaluations).

Resume and sharding: rows are written to ``<out>/pairs.csv`` (atomically, after every pair);
a pair whose ``pair_key`` and λ2 are already there is skipped. ``shard=(i, n)`` handles the
pairs with index % n == i and writes ``pairs-shard{i}of{n}.csv``; :func:`merge_shards` (and
:func:`load_study`) combine them. Under torchrun the shard defaults to (rank, world size).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diag.metrics import Scores, score
from diag.stats import with_normalised
from diag.transfer import TargetSet, predict, target_set
from train import __version__
from train.errors import ArtifactError, DataError, TvdiagError, unknown
from train.model import load_visual_state
from train.store import Store, base_state, content_key
from train.tensorio import read_metadata
from train.vectors import TaskVector, check_scale

log = logging.getLogger(__name__)

DEFAULT_STUDY = "allpairs"
PAIRS_FILE = "pairs.csv"
KS_FILE = "kernelshap_budget.csv"
STUDY_VERSION = 1
PAPER_LAMBDA2 = 0.7
LAMBDA_GRID: tuple[float, ...] = tuple(round(0.4 + 0.1 * i, 1) for i in range(9))  # 0.4, 0.5, ..., 1.2
KS_BUDGETS: tuple[int, ...] = (50, 100, 200, 300, 500, 1000)
METRICS = ("accuracy", "ermse", "kendall", "iou1", "iou5", "iou10")
REFERENCES = ("ft_target", "zeroshot", "ftx_target", "ft_source_on_target", "ftx_source_on_target")
CONTROLS = ("random", "other", "meanmap", "meanmap_target")
RISK_COLUMNS = ("risk_exact", "risk_diag", "risk_card")
#: Figure-2 variant names of the control columns.
VARIANTS = {"random": "random τ (τ*ˢ norms)", "other": "τ* of other source", "meanmap": "mean φ map (source)"}


# ----------------------------------------------------------------------------------- helpers


def _metric_dict(s: Scores, suffix: str = "") -> dict:
    tail = f"_{suffix}" if suffix else ""
    return {f"{m}{tail}": float(getattr(s, m)) for m in METRICS}


def _nan_metrics(suffix: str) -> dict:
    return {f"{m}_{suffix}": float("nan") for m in METRICS}


def _lam(x: float) -> float:
    return round(float(x), 6)


def default_shard() -> tuple[int, int]:
    """(rank, world size) under torch.distributed or torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise TvdiagError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    return check_shard((i, n))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise TvdiagError(f"shard {i}/{n} is out of range: need 0 <= i < n")
    return i, n


def shard_file(shard: tuple[int, int]) -> str:
    i, n = shard
    return PAIRS_FILE if n == 1 else f"pairs-shard{i}of{n}.csv"


def ordered_pairs(domains: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (source, target) with source ≠ target, target-major (n·(n−1) pairs)."""
    return [(s, t) for t in domains for s in domains if s != t]


def _write_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read study table {path}: {exc}") from exc


def _append_rows(path: Path, rows: list[dict]) -> None:
    """Add rows to a CSV table (rewritten atomically, so a kill never leaves half a row)."""
    new = pd.DataFrame(rows)
    if path.is_file():
        new = pd.concat([_read_csv(path), new], ignore_index=True)
    _write_atomic(new, path)


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "pair_key" not in df.columns:
        return df
    key = df["pair_key"].astype(str) + "|" + df["lambda2"].map(_lam).astype(str)
    return df.loc[~key.duplicated(keep="last")].reset_index(drop=True)


def merge_shards(out_dir: str | Path) -> pd.DataFrame:
    """Concatenate ``pairs.csv`` and every ``pairs-shard*of*.csv`` into ``pairs.csv``.

    Rows with the same ``pair_key`` and λ2 are kept once (the last written); the shard files
    are left in place. Returns the merged table (empty when there is nothing).
    """
    out_dir = Path(out_dir)
    parts = [p for p in [out_dir / PAIRS_FILE, *sorted(out_dir.glob("pairs-shard*of*.csv"))] if p.is_file()]
    if not parts:
        return pd.DataFrame()
    merged = _dedupe(pd.concat([_read_csv(p) for p in parts], ignore_index=True))
    if len(parts) > 1 or not (out_dir / PAIRS_FILE).is_file():
        _write_atomic(merged, out_dir / PAIRS_FILE)
    return merged


def load_study(out_dir: str | Path, lambda2: float | None = None, merge: bool = True,
               latest: bool = True) -> pd.DataFrame:
    """The study table of ``out_dir`` (shards merged), optionally only the rows at ``lambda2``.

    A folder can hold rows of several runs with different settings (e.g. with and without
    curvature, or after artifacts were rebuilt); with ``latest`` only the last-written row of
    each (source, target, λ2) is kept, so every pair counts once.

    Raises:
        ArtifactError: no table in ``out_dir``.
    """
    out_dir = Path(out_dir)
    df = merge_shards(out_dir) if merge else (_read_csv(out_dir / PAIRS_FILE) if (out_dir / PAIRS_FILE).is_file()
                                              else pd.DataFrame())
    if df.empty:
        raise ArtifactError(f"no study table in {out_dir} (expected {PAIRS_FILE}); run `diag study` first")
    if latest:
        dup = df.assign(_l=df["lambda2"].map(_lam)).duplicated(["source", "target", "_l"], keep="last")
        if dup.any():
            log.info("study %s: %d older rows of re-run pairs hidden (latest=False shows them)", out_dir, int(dup.sum()))
        df = df.loc[~dup].reset_index(drop=True)
    return add_normalised(at_lambda(df, lambda2) if lambda2 is not None else df)


def at_lambda(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows at one λ2 (one row per pair for the main study); DataError if there are none."""
    out = df[df["lambda2"].map(_lam) == _lam(lambda2)].reset_index(drop=True)
    if out.empty:
        have = sorted(set(df["lambda2"].map(_lam)))
        raise DataError(f"the study has no rows at λ2={lambda2:g}; it has λ2 in {have}")
    return out


def add_normalised(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`diag.stats.with_normalised` plus ``iou10_norm`` and normalised control columns."""
    out = with_normalised(df)
    if {"iou10", "iou10_ft_target"} <= set(out.columns) and "iou10_norm" not in out:
        out["iou10_norm"] = out["iou10"] / out["iou10_ft_target"]
    for suffix in (*CONTROLS, "zeroshot", "ftx_target", "ft_source_on_target", "ftx_source_on_target"):
        if f"ermse_{suffix}" in out.columns and "ermse_ft_target" in out.columns:
            out[f"ermse_norm_{suffix}"] = out[f"ermse_{suffix}"] / out["ermse_ft_target"]
        if f"accuracy_{suffix}" in out.columns and "accuracy_ft_target" in out.columns:
            out[f"acc_norm_{suffix}"] = out[f"accuracy_{suffix}"] / out["accuracy_ft_target"]
    return out


# -------------------------------------------------------------------------------- diagnostics


def _risk_engine(store: Store, alpha: float, data: dict | None, progress: bool, settings=None):
    """``(source, target) -> {risk_exact, risk_diag, risk_card}`` from :mod:`diag.diagnostics`, or None.

    Uses one :class:`diag.diagnostics.Diagnostics` for the whole study (each target's curvature is
    built once and cached in the store) when the module has it, else ``pair_diagnostics``.
    """
    try:
        from diag import diagnostics as mod
    except ModuleNotFoundError as err:
        if err.name == "diag.diagnostics":
            return None
        raise
    if hasattr(mod, "Diagnostics") and hasattr(mod.Diagnostics, "risks"):
        kwargs = {"settings": settings} if settings is not None else {}
        engine = mod.Diagnostics(store, alpha, data=data, progress=progress, **kwargs)
        return lambda s, t: engine.risks(s, t)
    if hasattr(mod, "pair_diagnostics"):
        return lambda s, t: {k: v for k, v in mod.pair_diagnostics(store, s, t, alpha=alpha, curvature=True,
                                                                   data=data).items() if k in RISK_COLUMNS}
    return None


class _CosineDiagnostics:
    """Fallback diagnostics: cos τ_ft, cos τ* (global and per block) and norms, one streamed pass."""

    name = "cosines+norms (diag.similarity, one streamed pass)"

    def __init__(self, store: Store, domains: Sequence[str], alpha: float):
        from diag.similarity import VectorSpec, gram_streamed

        self.index = {d: i for i, d in enumerate(domains)}
        ft_specs = [VectorSpec(store.vector_path(d, "ft")) for d in domains]
        star_specs = [VectorSpec(store.vector_path(d, "ftx", alpha), store.vector_path(d, "ft")) for d in domains]
        self.g_ft, self.groups_ft, _ = gram_streamed(ft_specs, by="block")
        self.g_star, _, _ = gram_streamed(star_specs, by="global")

    @staticmethod
    def _cos(G: np.ndarray, i: int, j: int) -> float:
        den = math.sqrt(G[i, i]) * math.sqrt(G[j, j])
        return float(G[i, j] / den) if den > 0 else float("nan")

    def __call__(self, source: str, target: str) -> dict:
        i, j = self.index[source], self.index[target]
        out = {"cos_ft": self._cos(self.g_ft, i, j), "cos_star": self._cos(self.g_star, i, j)}
        out.update({f"cos_ft.{g}": self._cos(G, i, j) for g, G in self.groups_ft.items()})
        out.update(norm_star_source=math.sqrt(self.g_star[i, i]), norm_ft_source=math.sqrt(self.g_ft[i, i]),
                   norm_ft_target=math.sqrt(self.g_ft[j, j]))
        out.update({c: float("nan") for c in RISK_COLUMNS})
        return out


# ----------------------------------------------------------------------------- domain setup


@dataclass
class _Domain:
    """One domain's test set and the scores of its own models on it (computed once)."""

    name: str
    tset: TargetSet
    model: torch.nn.Module
    zeroshot: Scores
    ft: Scores
    ftx: Scores | None
    mean_map: torch.Tensor


class _Evaluator:
    """Artifacts shared by all pairs: base weights, vectors (LRU), domain setups (LRU)."""

    def __init__(self, store: Store, alpha: float, data: dict | None, max_vectors: int = 32, max_domains: int = 2):
        self.store = store
        self.alpha = alpha
        self.data = dict(data or {})
        self.backbone, self.base_hash = store.load_base()
        self.base = base_state(self.backbone)
        n_params = sum(v.numel() for k, v in self.base.items())
        # keep every vector of a tiny backbone in memory; a handful of a large one
        self.max_vectors = max_vectors if n_params < 5e7 else 4
        self.max_domains = max_domains
        self._vectors: OrderedDict = OrderedDict()
        self._domains: OrderedDict = OrderedDict()
        self._summaries: dict[str, dict] = {}

    def _cached(self, cache: OrderedDict, key, limit: int, make):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = make()
        cache[key] = value
        while len(cache) > limit:
            cache.popitem(last=False)
        return value

    def vector(self, domain: str, kind: str) -> TaskVector:
        """``ft``, ``ftx`` or ``star`` (= ftx − ft) of a domain."""
        def make():
            if kind == "star":
                return self.vector(domain, "ftx") - self.vector(domain, "ft")
            alpha = None if kind == "ft" else self.alpha
            return self.store.load_vector(domain, kind, alpha, expect_base=self.base_hash)
        return self._cached(self._vectors, (domain, kind), self.max_vectors, make)

    def state(self, vector: TaskVector, scale: float = 1.0) -> dict:
        return vector.apply_to(self.base, scale=scale, base_hash=self.base_hash)

    def evaluate(self, dom: _Domain, state: dict, name: str) -> Scores:
        load_visual_state(dom.model, state)
        logits, phi = predict(dom.model, dom.tset.x, dom.tset.y)
        return score(name, logits, dom.tset.y, phi, dom.tset.phi)

    def domain(self, name: str) -> _Domain:
        def make():
            tset = target_set(self.store, name, self.data.get(name))
            model = self.store.model(name, None, backbone=self.backbone)
            dom = _Domain(name, tset, model, None, None, None,
                          self.store.load_attributions(name)["train"].mean(dim=0))
            dom.zeroshot = self.evaluate(dom, self.base, "zero-shot θ_base")
            dom.ft = self.evaluate(dom, self.state(self.vector(name, "ft")), "θ_ftᵀ")
            if self.store.vector_path(name, "ftx", self.alpha).is_file():
                dom.ftx = self.evaluate(dom, self.state(self.vector(name, "ftx")), "θ_ft*ᵀ (upper bound)")
            self._summaries[name] = {"ermse_star_source": dom.ftx.ermse if dom.ftx else float("nan"),
                                     "accuracy_ft_source": dom.ft.accuracy,
                                     "accuracy_ftx_source": dom.ftx.accuracy if dom.ftx else float("nan")}
            return dom
        return self._cached(self._domains, name, self.max_domains, make)

    def summary(self, name: str) -> dict:
        """The source's own quality on its test set (sets the domain up if needed)."""
        if name not in self._summaries:
            self.domain(name)
        return self._summaries[name]


def _artifact_key(path: Path) -> str:
    if not path.is_file():
        return "missing"
    try:
        return read_metadata(path).get("key", "unkeyed")
    except ArtifactError:
        return "unreadable"


def _domain_keys(store: Store, domain: str, alpha: float) -> list[str]:
    return [_artifact_key(store.vector_path(domain, "ft")), _artifact_key(store.vector_path(domain, "ftx", alpha)),
            _artifact_key(store.attribution_path(domain))]


def pair_key(store: Store, source: str, target: str, alpha: float, lambda1: float, controls: bool,
             curvature: bool, seed: int, base_hash: str, domain_keys: dict | None = None) -> str:
    """Identity of a pair's rows: the settings and the content keys of every artifact used."""
    cache = domain_keys if domain_keys is not None else {}

    def keys(d):
        if d not in cache:
            cache[d] = _domain_keys(store, d, alpha)
        return cache[d]
    return content_key({"source": source, "target": target, "alpha": float(alpha), "lambda1": float(lambda1),
                        "controls": bool(controls), "curvature": bool(curvature), "seed": int(seed),
                        "base": base_hash, "artifacts": keys(source) + keys(target), "version": STUDY_VERSION})


# --------------------------------------------------------------------------------- the study


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


def run_study(store: Store, domains: Sequence[str], alpha: float = 0.8, lambda1: float = 1.0,
              lambda2s: Sequence[float] = (PAPER_LAMBDA2,), out_dir: str | Path | None = None,
              shard: tuple[int, int] | None = None, resume: bool = True, curvature: bool = True,
              curvature_settings=None,
              controls: bool = True, progress: bool = True, data: dict | None = None, seed: int = 0,
              name: str = DEFAULT_STUDY) -> pd.DataFrame:
    """Score eq. 8 and its controls for every ordered pair of ``domains`` at each λ2.

    Args:
        store: artifact store holding base, heads, vectors and φ of every domain.
        domains: at least two domains; n domains give n·(n−1) pairs.
        alpha: α of θ_ft* (τ* = θ_ft* − θ_ft).
        lambda1, lambda2s: scales of τ_ftᵀ and (each) of τ*ˢ.
        out_dir: study folder (default ``store.study_dir(name)``).
        shard: (i, n): only pairs with index % n == i (default: torchrun rank/world or (0, 1)).
        resume: skip pairs whose rows (same ``pair_key`` and λ2) are already written.
        curvature: ask :func:`diag.diagnostics.pair_diagnostics` for the risk columns.
        curvature_settings: :class:`diag.diagnostics.CurvatureSettings` (images, probes, k) of the targets' Hᵀ.
        controls: score the random-vector, other-source and mean-map controls.
        progress: tqdm bar over pairs.
        data: domain → local dataset path (for domains outside the mini-suite).
        seed: seed of the random-vector control and of the other-source choice.
        name: study name for the default folder.

    Returns:
        The rows of this run's pairs and λ2s (this shard's, when sharded), with normalised columns.

    Raises:
        DataError: fewer than 2 domains or no λ2.
        ArtifactError: a missing artifact (build it with ``diag zoo``).
    """
    lambda1 = check_scale("lambda1", lambda1)
    lambda2s = [_lam(check_scale("lambda2", v)) for v in lambda2s]
    lambda2s = list(dict.fromkeys(lambda2s))
    if not lambda2s:
        raise DataError("give at least one λ2")
    domains = _check_domains(store, domains, alpha)
    shard = check_shard(shard if shard is not None else default_shard())
    out_dir = Path(out_dir) if out_dir is not None else store.study_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / shard_file(shard)
    all_pairs = ordered_pairs(domains)
    pairs = [p for k, p in enumerate(all_pairs) if k % shard[1] == shard[0]]

    base_hash = read_metadata(store.base_path()).get("base_hash", "")
    dkeys: dict = {}
    keys = {p: pair_key(store, p[0], p[1], alpha, lambda1, controls, curvature, seed, base_hash, dkeys)
            for p in all_pairs}
    done: set[tuple[str, float]] = set()
    if resume:
        existing = []
        for f in (out_dir / PAIRS_FILE, path):
            if f.is_file():
                existing.append(_read_csv(f))
        if existing:
            prev = pd.concat(existing, ignore_index=True)
            if "pair_key" in prev.columns:
                done = set(zip(prev["pair_key"].astype(str), prev["lambda2"].map(_lam)))
    elif path.is_file():
        path.unlink()
    todo = [p for p in pairs if any((keys[p], l2) not in done for l2 in lambda2s)]
    log.info("study: %d pairs in this shard, %d to compute, %d already done", len(pairs), len(todo),
             len(pairs) - len(todo))

    if todo:
        cosines = _CosineDiagnostics(store, domains, alpha)
        risks = _risk_engine(store, alpha, data, progress, curvature_settings) if curvature else None
        diag_name = cosines.name + ("; risks: diag.diagnostics" if risks is not None else "; no risks")
        if curvature and risks is None:
            log.warning("diag.diagnostics is not available: the risk columns stay NaN")
        ev = _Evaluator(store, alpha, data)
        bar = tqdm(todo, desc="study pairs", disable=not progress, unit="pair")
        for source, target in bar:
            bar.set_postfix_str(f"{source}→{target}")
            missing = [l2 for l2 in lambda2s if (keys[(source, target)], l2) not in done]
            rows = _score_pair(ev, store, source, target, domains, alpha, lambda1, missing, controls, curvature,
                               seed, cosines, risks, diag_name, keys[(source, target)])
            _append_rows(path, rows)
            done.update((keys[(source, target)], l2) for l2 in missing)
    merged = shard[1] > 1 and _maybe_merge_distributed(out_dir)
    if merged:  # rank 0 under torch.distributed: every shard is in pairs.csv now
        path, pairs = out_dir / PAIRS_FILE, all_pairs

    files = [f for f in dict.fromkeys([out_dir / PAIRS_FILE, path]) if f.is_file()]
    table = _dedupe(pd.concat([_read_csv(f) for f in files], ignore_index=True)) if files else pd.DataFrame()
    if not table.empty:
        wanted = {keys[p] for p in pairs}
        table = table[table["pair_key"].astype(str).isin(wanted) & table["lambda2"].map(_lam).isin(lambda2s)]
        table = add_normalised(table.reset_index(drop=True))
    if not table.empty and (shard[1] == 1 or merged):
        _save_parquet(add_normalised(_read_csv(path)), path.with_suffix(".parquet"))
    return table


def _maybe_merge_distributed(out_dir: Path) -> bool:
    """Under an initialised process group: wait for every rank, rank 0 merges the shards.

    Returns True on the rank that merged. Every rank must call this (it holds barriers).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    rank = dist.get_rank()
    if rank == 0:
        merge_shards(out_dir)
    dist.barrier()
    return rank == 0


def _save_parquet(df: pd.DataFrame, path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return
    try:
        df.to_parquet(path, index=False)
    except (ValueError, TypeError, OSError) as exc:  # CSV is the contract; Parquet is a convenience
        log.warning("could not write %s: %s", path, exc)


def _score_pair(ev: _Evaluator, store: Store, source: str, target: str, domains: Sequence[str], alpha: float,
                lambda1: float, lambda2s: Sequence[float], controls: bool, curvature: bool, seed: int,
                cosines, risks, diag_name: str, key: str) -> list[dict]:
    start = time.perf_counter()
    src_summary = dict(ev.summary(source))
    dom = ev.domain(target)
    ft_t, ft_s, ftx_s, star_s = (ev.vector(target, "ft"), ev.vector(source, "ft"), ev.vector(source, "ftx"),
                                 ev.vector(source, "star"))
    fixed: dict = {"source": source, "target": target, "variant": "proposed", "alpha": float(alpha),
                   "lambda1": float(lambda1)}
    fixed.update(_metric_dict(dom.ft, "ft_target"))
    fixed.update(_metric_dict(dom.zeroshot, "zeroshot"))
    fixed.update(_metric_dict(dom.ftx, "ftx_target") if dom.ftx else _nan_metrics("ftx_target"))
    fixed.update(_metric_dict(ev.evaluate(dom, ev.state(ft_s), "θ_ftˢ"), "ft_source_on_target"))
    fixed.update(_metric_dict(ev.evaluate(dom, ev.state(ftx_s), "θ_ft*ˢ"), "ftx_source_on_target"))
    other = None
    if controls:
        means = {"meanmap": ev.domain(source).mean_map if source in ev._domains else
                 store.load_attributions(source)["train"].mean(dim=0), "meanmap_target": dom.mean_map}
        for suffix, mean_map in means.items():
            if mean_map.shape[0] != dom.tset.phi.shape[1]:
                fixed.update(_nan_metrics(suffix))
                continue
            s = score(suffix, None, dom.tset.y, mean_map.expand_as(dom.tset.phi), dom.tset.phi,
                      accuracy=dom.ft.accuracy)
            fixed.update(_metric_dict(s, suffix))
        others = sorted(d for d in domains if d not in (source, target))
        other = random.Random(f"{seed}:{source}:{target}").choice(others) if others else None
    fixed["other_source"] = other
    fixed.update(src_summary)
    diags = cosines(source, target)
    if risks is not None:
        diags.update(risks(source, target))
    fixed.update({k: (float("nan") if v is None else float(v)) for k, v in diags.items()})
    for c in RISK_COLUMNS:
        fixed.setdefault(c, float("nan"))
    fixed.update(base_hash=ev.base_hash, backbone_id=store.backbone_id, tvdiag_version=__version__,
                 study_version=STUDY_VERSION, pair_key=key, diagnostics=diag_name, n_test=int(dom.tset.y.shape[0]),
                 ks=",".join(str(k) for k in dom.ft.ks), seed=int(seed))

    rows = []
    tau_ft = lambda1 * ft_t
    for l2 in lambda2s:
        row = {**fixed, "lambda2": float(l2)}
        row.update(_metric_dict(ev.evaluate(dom, ev.state(tau_ft + l2 * star_s), "proposed")))
        if controls:
            rnd = ev._cached(ev._vectors, (source, "random", seed), ev.max_vectors,
                             lambda: star_s.random_like(seed))
            row.update(_metric_dict(ev.evaluate(dom, ev.state(tau_ft + l2 * rnd), "random"), "random"))
            if other is not None:
                row.update(_metric_dict(ev.evaluate(dom, ev.state(tau_ft + l2 * ev.vector(other, "star")), "other"),
                                        "other"))
            else:
                row.update(_nan_metrics("other"))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def lambda_sweep(store: Store, domains: Sequence[str], lambda2s: Sequence[float] = LAMBDA_GRID,
                 **kwargs) -> pd.DataFrame:
    """:func:`run_study` over the λ2 grid of Figure 3 (0.4 … 1.2); rows carry ``lambda2``."""
    return run_study(store, domains, lambda2s=lambda2s, **kwargs)


# ---------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class StudySummary:
    """Headline counts of a study at one λ2 (the paper's claim and the controls).

    Attributes:
        n_pairs: pairs scored.
        lambda2: the λ2 summarised.
        n_better_keep90: pairs with E-RMSE below θ_ftᵀ's while keeping ≥ 90 % of its accuracy
            (the paper's headline: the transfer improves explanations at little accuracy cost).
        n_lower_ermse: pairs with E-RMSE below θ_ftᵀ's.
        n_keep90: pairs keeping ≥ 90 % of θ_ftᵀ's accuracy.
        n_beat_random, n_beat_meanmap, n_beat_other: pairs whose E-RMSE is below that control's
            (NaN-valued controls are not counted; ``n_controls`` says how many had each).
        mean_ermse_norm, mean_acc_norm: means of E-RMSE and accuracy ÷ θ_ftᵀ, with standard
            errors over pairs (``*_se``; pairs share domains, so these are optimistic).
    """

    n_pairs: int
    lambda2: float
    n_better_keep90: int
    n_lower_ermse: int
    n_keep90: int
    n_beat_random: int
    n_beat_meanmap: int
    n_beat_other: int
    n_controls: dict = field(default_factory=dict)
    mean_ermse_norm: float = float("nan")
    mean_ermse_norm_se: float = float("nan")
    mean_acc_norm: float = float("nan")
    mean_acc_norm_se: float = float("nan")
    mean_ermse_norm_controls: dict = field(default_factory=dict)

    def verdicts(self) -> list[str]:
        """Plain sentences, including when the method does NOT beat a control."""
        n = self.n_pairs
        out = [f"{self.n_better_keep90}/{n} pairs: lower E-RMSE than θ_ftᵀ while keeping ≥ 90 % of its accuracy "
               f"(lower E-RMSE: {self.n_lower_ermse}/{n}; accuracy kept ≥ 90 %: {self.n_keep90}/{n})"]
        for ctrl, label in (("random", VARIANTS["random"]), ("meanmap", VARIANTS["meanmap"]),
                            ("other", VARIANTS["other"])):
            m = self.n_controls.get(ctrl, 0)
            if not m:
                continue
            k = getattr(self, f"n_beat_{ctrl}")
            if k > m / 2:
                out.append(f"the transfer beats the control '{label}' on E-RMSE in {k}/{m} pairs")
            else:
                out.append(f"the transfer does NOT beat the control '{label}' on E-RMSE: better in only {k}/{m} pairs")
        return out

    def __repr__(self) -> str:
        return (f"StudySummary(n_pairs={self.n_pairs}, λ2={self.lambda2:g}, better&keep90={self.n_better_keep90}, "
                f"beat random={self.n_beat_random}, beat meanmap={self.n_beat_meanmap}, "
                f"ermse_norm={self.mean_ermse_norm:.3f}±{self.mean_ermse_norm_se:.3f}, "
                f"acc_norm={self.mean_acc_norm:.3f}±{self.mean_acc_norm_se:.3f})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdicts"] = self.verdicts()
        return d


def _mean_se(v: pd.Series) -> tuple[float, float]:
    v = pd.to_numeric(v, errors="coerce").dropna()
    if v.empty:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def summarize(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2, keep: float = 0.9) -> StudySummary:
    """Headline counts at ``lambda2`` (see :class:`StudySummary`); ``keep`` is the accuracy fraction."""
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    lower = rows["ermse"] < rows["ermse_ft_target"]
    kept = rows["accuracy"] >= keep * rows["accuracy_ft_target"]
    beats, counts, ctrl_means = {}, {}, {}
    for ctrl in ("random", "meanmap", "other"):
        col = f"ermse_{ctrl}"
        if col not in rows.columns:
            beats[ctrl], counts[ctrl] = 0, 0
            continue
        have = rows[col].notna()
        counts[ctrl] = int(have.sum())
        beats[ctrl] = int((rows["ermse"] < rows[col])[have].sum())
        ctrl_means[ctrl] = _mean_se(rows[f"ermse_norm_{ctrl}"])[0] if f"ermse_norm_{ctrl}" in rows else float("nan")
    e_mean, e_se = _mean_se(rows["ermse_norm"])
    a_mean, a_se = _mean_se(rows["acc_norm"])
    return StudySummary(n_pairs=len(rows), lambda2=float(lambda2), n_better_keep90=int((lower & kept).sum()),
                        n_lower_ermse=int(lower.sum()), n_keep90=int(kept.sum()), n_beat_random=beats["random"],
                        n_beat_meanmap=beats["meanmap"], n_beat_other=beats["other"], n_controls=counts,
                        mean_ermse_norm=e_mean, mean_ermse_norm_se=e_se, mean_acc_norm=a_mean,
                        mean_acc_norm_se=a_se, mean_ermse_norm_controls=ctrl_means)


def figure2_frame(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows for :func:`diag.figures.figure2`: the proposed pairs plus one row per control variant.

    Control rows carry ``variant`` (see :data:`VARIANTS`) and their own ``acc_norm`` /
    ``ermse_norm``; the mean-map control keeps θ_ftᵀ's accuracy (acc_norm = 1).
    """
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    parts = [rows.assign(variant="proposed")]
    for ctrl, label in VARIANTS.items():
        e, a = f"ermse_norm_{ctrl}", f"acc_norm_{ctrl}"
        if e not in rows.columns or rows[e].isna().all():
            continue
        part = rows[["source", "target"]].copy()
        part["variant"] = label
        part["ermse_norm"] = rows[e]
        part["acc_norm"] = rows[a] if a in rows.columns else 1.0
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


#: Table-1 rows of the study table: row label → column suffix ("" = proposed).
TABLE1_ROWS = {
    "zero-shot θ_base": "zeroshot", "θ_ftˢ": "ft_source_on_target", "θ_ft*ˢ": "ftx_source_on_target",
    "θ_ftᵀ": "ft_target", "proposed": "", "θ_ft*ᵀ (upper bound)": "ftx_target",
    "control: random τ (τ*ˢ norms)": "random", "control: τ* of other source": "other",
    "control: mean φ map (source)": "meanmap", "oracle: mean φ map (target)": "meanmap_target",
}


def table1(df: pd.DataFrame, source: str, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Table 1 analogue: one source over every other target, mean ± sd per model row.

    Returns:
        DataFrame indexed by model row, columns ``<metric>_mean`` and ``<metric>_sd`` for the six
        metrics, ``n_targets``, and the paper's accuracy / E-RMSE (``paper_accuracy``,
        ``paper_ermse``; NaN for rows the paper does not have).

    Raises:
        UnknownNameError: ``source`` is not a source of the study.
    """
    from diag.transfer import PAPER_TABLE1

    rows = at_lambda(df, lambda2) if "lambda2" in df.columns else df
    sources = sorted(rows["source"].unique())
    if source not in sources:
        raise unknown("study source", source, sources)
    rows = rows[rows["source"] == source]
    out = []
    for label, suffix in TABLE1_ROWS.items():
        cols = {m: (m if not suffix else f"{m}_{suffix}") for m in METRICS}
        if not all(c in rows.columns for c in cols.values()):
            continue
        rec = {"model": label, "n_targets": int(rows[cols["ermse"]].notna().sum())}
        for m, c in cols.items():
            v = pd.to_numeric(rows[c], errors="coerce")
            rec[f"{m}_mean"], rec[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.count() > 1 else float("nan")
        paper = PAPER_TABLE1.get(label)
        rec["paper_accuracy"], rec["paper_ermse"] = paper if paper else (float("nan"), float("nan"))
        out.append(rec)
    return pd.DataFrame(out).set_index("model")


# ------------------------------------------------------------------ Kernel SHAP budget (Fig. 5)


def kernelshap_budget(store: Store, target: str, source: str, budgets: Sequence[int] = KS_BUDGETS,
                      n_images: int = 32, alpha: float = 0.8, lambda1: float = 1.0,
                      lambda2: float = PAPER_LAMBDA2, seed: int = 0, data: str | Path | None = None) -> pd.DataFrame:
    """Figure 5: Kernel SHAP with P perturbations on θ_ftᵀ vs the proposed model's one forward pass.

    Both are scored against the stored ground truth φ (Kernel SHAP on θ_ftᵀ with the zoo's
    number of samples) on the first ``n_images`` test images of ``target``. The proposed
    model is θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ. Note that Kernel SHAP with P equal to the zoo's
    sample count and the same seed reproduces the ground truth exactly, and large P
    converges to the exact Shapley values, not to the (noisy) stored φ.

    Returns:
        One row per method and budget: ``method`` (``kernelshap`` / ``proposed``),
        ``n_perturbations`` (NaN for proposed), ``ermse``, ``iou1``, ``kendall``, ``wall_s``
        (seconds for all ``n_images``), ``n_images``, ``target``, ``source``.
    """
    from train.explain.kernelshap import kernel_shap

    budgets = [int(b) for b in budgets]
    if not budgets or any(b < 2 or b % 2 for b in budgets):
        raise DataError(f"Kernel SHAP budgets must be even integers >= 2 (paired sampling), got {budgets}")
    if n_images < 1:
        raise DataError(f"n_images must be positive, got {n_images}")
    if source == target:
        raise DataError(f"source and target are both '{source}'")
    ev = _Evaluator(store, alpha, {target: data} if data else None)
    tset = target_set(store, target, data)
    n = min(n_images, tset.y.shape[0])
    x, y, phi_true = tset.x[:n], tset.y[:n], tset.phi[:n]
    patch = ev.backbone.config.patch_size
    ft_model = store.model(target, ev.state(ev.vector(target, "ft")), backbone=ev.backbone)
    rows = []
    for p in budgets:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            phi = kernel_shap(ft_model, x, y, patch_size=patch, n_samples=p, generator=gen)
        wall = time.perf_counter() - t0
        s = score(f"kernelshap P={p}", None, y, phi, phi_true, accuracy=float("nan"))
        rows.append({"method": "kernelshap", "n_perturbations": p, "ermse": s.ermse, "iou1": s.iou1,
                     "kendall": s.kendall, "wall_s": wall})
    state = ev.state(lambda1 * ev.vector(target, "ft") + lambda2 * ev.vector(source, "star"))
    model = store.model(target, state, backbone=ev.backbone)
    t0 = time.perf_counter()
    logits, phi = predict(model, x, y)
    wall = time.perf_counter() - t0
    s = score("proposed", logits, y, phi, phi_true)
    rows.append({"method": "proposed", "n_perturbations": float("nan"), "ermse": s.ermse, "iou1": s.iou1,
                 "kendall": s.kendall, "wall_s": wall})
    out = pd.DataFrame(rows)
    out["n_images"], out["target"], out["source"], out["lambda2"], out["alpha"] = n, target, source, lambda2, alpha
    return out


__all__ = ["run_study", "lambda_sweep", "merge_shards", "load_study", "at_lambda", "add_normalised", "summarize",
           "StudySummary", "figure2_frame", "table1", "kernelshap_budget", "ordered_pairs", "parse_shard",
           "default_shard", "pair_key", "LAMBDA_GRID", "KS_BUDGETS", "DEFAULT_STUDY", "PAIRS_FILE", "KS_FILE"]
