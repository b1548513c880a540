"""The study's pair table on disk: identity of a pair's rows, shards, validated reading and writing.

One row per (source S, target T, λ2) of a run (α, training seed, θ_ft* variant); a table may
hold several runs (columns ``alpha``, ``seed``, ``variant``). Columns are described in :mod:`diag.study.run`. Rows are
written to ``<study>/pairs.csv`` (or ``pairs-shard{i}of{n}.csv`` for shard i of n), always
atomically, with a side file ``<table>.check.json`` holding the row count and the sha256 of
the bytes. Reading validates the table (complete last line, the side file, required columns,
numeric dtypes, finite values where a row cannot be without them) and refuses a damaged one
with an :class:`~train.errors.ArtifactError` naming the file and the problem; a table without
its side file is untrusted and refused too (``diag study --verify`` recomputes its rows and
re-checks it). A table that could not be read completely is never appended to.

Same inputs, same bytes: wall-clock columns (``seconds``) never enter the table; they go to
its side file ``<table>.timings.json`` (pair_key and λ2 → seconds).

A pair's ``pair_key`` hashes the settings and the content keys of every artifact the pair was
computed from: a pair whose key and λ2 are already in the table is skipped on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from diag.constants import PAPER_ALPHA, PAPER_LAMBDA2
from diag.runtime.distributed import rank_and_world
from diag.stats import with_normalised
from train.errors import ArtifactError, DataError, TvdiagError, unknown
from train.store import content_key, has_twin, Store
from train.ownership import decide
from train.tensorio import atomic_write_bytes, is_timing_key, merge_json_side, read_metadata, timings_path

log = logging.getLogger(__name__)

DEFAULT_STUDY = "allpairs"
PAIRS_FILE = "pairs.csv"
#: Beside the pair table: per domain, seed and artifact whether it was built or imported, with its sha256.
VECTORS_FILE = "vectors.csv"
STUDY_VERSION = 4
CHECK_SUFFIX = ".check.json"
#: What identifies a row besides its ``pair_key``: the pair, λ2, the run and the transfer method.
ROW_ID = ("source", "target", "lambda2", "alpha", "seed", "variant", "method")
#: The method of eq. 8 itself (rows of tables written before methods existed).
PLAIN = "plain"
#: Columns every row has, and those that must be finite numbers.
REQUIRED = ("source", "target", "lambda2", "pair_key")
FINITE = ("lambda2", "accuracy", "ermse", "accuracy_ft_target", "ermse_ft_target")
TEXT = ("source", "target", "pair_key", "other_source", "base_hash", "backbone_id", "tvdiag_version", "ks",
        "absent", "variant", "diagnostics", "method", "repair_choice", "card_form")
CONTROLS = ("random", "other", "other_rescaled", "meanmap", "meanmap_target")


def lam_key(x: float) -> float:
    """λ rounded to 6 decimals: the λ identity of a row."""
    return round(float(x), 6)


# ------------------------------------------------------------------------------- shards


def default_shard() -> tuple[int, int]:
    """(rank, world size) of the process group (initialised once, by ``diag.cli.main``), else (0, 1)."""
    return rank_and_world()


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


# ------------------------------------------------------------------------------ pair key


def artifact_key(path: Path) -> str:
    """The content key in an artifact's header ("missing" when there is no file)."""
    return read_metadata(path).get("key", "unkeyed") if path.is_file() else "missing"


def pair_key(store: Store, source: str, target: str, settings: dict, base_hash: str,
             cache: dict | None = None) -> str:
    """Identity of a pair's rows: ``settings`` and the content keys of every artifact used.

    ``settings`` holds the run (``alpha``, ``seed``, ``variant``): the artifacts are that seed's
    θ_ft, φ and θ_ft* of that variant and α (and ``from-ft``'s twin, τ*'s reference).

    Raises:
        ArtifactError: an artifact exists but cannot be read (it is never silently ignored).
    """
    cache = cache if cache is not None else {}
    alpha, seed, variant = settings["alpha"], int(settings.get("seed", 0)), settings.get("variant", "paper")

    def keys(d):
        k = (d, alpha, seed, variant)
        if k not in cache:
            paths = (store.vector_path(d, "ft", seed=seed), store.vector_path(d, "ftx", alpha, seed=seed, variant=variant),
                     store.attribution_path(d, seed=seed))
            twin = (store.reference_path(d, seed=seed, variant=variant),) if has_twin(variant) else ()
            cache[k] = [artifact_key(p) for p in (*paths, *twin)]
        return cache[k]
    return content_key({"source": source, "target": target, **settings, "base": base_hash,
                        "artifacts": keys(source) + keys(target), "version": STUDY_VERSION})


# ------------------------------------------------------------------- validated table I/O


def check_path(path: Path) -> Path:
    return path.with_name(path.name + CHECK_SUFFIX)


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` atomically (temp file + rename) with its side file (row count, sha256).

    The side file is replaced first and also names the table it replaces (``previous``), so a
    kill between the two renames leaves a complete old table that still checks out. Timing
    columns are dropped (:func:`append_rows` keeps them in the timings side file).
    """
    may_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = df.drop(columns=[c for c in df.columns if is_timing_key(c)])
    data = df.to_csv(index=False).encode()
    check = _check_of(len(df), data)
    if path.is_file():
        old = path.read_bytes()
        check["previous"] = _check_of(old.count(b"\n") - 1, old)
    for target, payload in ((check_path(path), json.dumps(check).encode()), (path, data)):
        atomic_write_bytes(target, payload)


def may_write(path: Path) -> None:
    """Refuse (ArtifactError, naming the file) a table at ``path`` that tvdiag did not write; nothing is written."""
    decide(path, "", what="study table", read=table_provenance)


def table_provenance(path: Path) -> dict:
    """Provenance of an existing table for :func:`train.ownership.decide`: tvdiag's when its check file vouches for it.

    A table without a check file has no provenance (not tvdiag's); one that does not match its check file
    raises :class:`ArtifactError`.
    """
    if not check_path(path).is_file():
        return {}
    _checked_rows(path, Path(path).read_bytes())
    return {"key": check_path(path).name, "tvdiag_version": "study table"}


def _checked_rows(path: Path, data: bytes) -> int:
    """Row count the side file promises for ``data``; ArtifactError without a side file or on a mismatch."""
    side = check_path(path)
    if not side.is_file():
        raise ArtifactError(f"study table {path} has no check file {side.name}, so it cannot be trusted: "
                            "`diag study --verify` recomputes its rows and re-checks it, `diag study --fresh` "
                            "replaces it")
    try:
        check = json.loads(side.read_text())
        entries = [check] + ([check["previous"]] if "previous" in check else [])
        accepted = {str(e["sha256"]): int(e["rows"]) for e in entries}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"study table check file {side} is damaged: {_first_line(exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest not in accepted:
        raise ArtifactError(f"study table {path} does not match its check file {side.name} "
                            f"(sha256 differs: the table was changed or truncated)")
    return accepted[digest]


def certify(path: Path) -> None:
    """Write the side file of ``path``'s current bytes (after its rows were re-checked by recomputation)."""
    data = Path(path).read_bytes()
    rows = len(read_table(path, trusted=False))
    atomic_write_bytes(check_path(path), json.dumps(_check_of(rows, data)).encode())


def _check_of(rows: int, data: bytes) -> dict:  # the check file's entry for ``rows`` rows of bytes ``data``
    return {"rows": int(rows), "sha256": hashlib.sha256(data).hexdigest()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_table(path: Path, trusted: bool = True) -> pd.DataFrame:
    """Read and validate a pair table.

    Args:
        path: the table.
        trusted: check it against its side file (always, except to re-check an untrusted table
            by recomputing its rows: :func:`diag.study.verify.verify_study`).

    Raises:
        ArtifactError: the file is not a complete, consistent pair table, or has no valid side
            file (names the file and the problem).
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"study table {path} is not a file")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ArtifactError(f"study table {path} is truncated: its last line is incomplete")
    rows = _checked_rows(path, data) if trusted else None
    try:
        df = pd.read_csv(path, dtype={c: "string" for c in TEXT})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read study table {path}: {exc}") from None
    _validate(df, path, rows)
    return df.astype({c: object for c in TEXT if c in df.columns}).copy()


def read_checked_csv(path: Path) -> pd.DataFrame:
    """Any CSV :func:`write_table` wrote (not only pair tables), once its side file vouches for its bytes."""
    _checked_rows(Path(path), Path(path).read_bytes())
    return pd.read_csv(path)


def _validate(df: pd.DataFrame, path: Path, rows: int | None) -> None:
    if rows is not None and len(df) != rows:
        raise ArtifactError(f"study table {path} has {len(df)} rows, its check file says {rows}")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ArtifactError(f"study table {path} lacks column(s) {', '.join(missing)}")
    numeric = [c for c in df.columns if c not in TEXT]
    bad = [c for c in numeric if not pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    if bad:
        raise ArtifactError(f"study table {path}: column(s) {', '.join(bad[:5])} are not numeric")
    for c in FINITE:
        if c in df.columns and not pd.Series(pd.to_numeric(df[c], errors="coerce")).map(_finite).all():
            raise ArtifactError(f"study table {path}: column '{c}' has missing or non-finite values")
    if df[["source", "target", "pair_key"]].isna().any().any():
        raise ArtifactError(f"study table {path}: a row lacks its source, target or pair_key")


def _finite(v) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Add rows to a table: the old one is read (validated) in full first, then rewritten atomically.

    Timing values of the rows go to the table's timings side file, keyed ``<pair_key>|<λ2>``.
    """
    old = read_table(path) if path.is_file() else None
    timing = {f"{r['pair_key']}|{lam_key(r['lambda2'])}": {k: v for k, v in r.items() if is_timing_key(k)}
              for r in rows if any(is_timing_key(k) for k in r)}
    new = pd.DataFrame(rows)
    write_table(new if old is None else pd.concat([old, new], ignore_index=True), path)
    if timing:
        merge_json_side(timings_path(path), timing)


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with the same ``pair_key`` and λ2 kept once (the last written)."""
    if df.empty:
        return df
    key = df["pair_key"].astype(str) + "|" + df["lambda2"].map(lam_key).astype(str)
    return df.loc[~key.duplicated(keep="last")].reset_index(drop=True)


def table_files(out_dir: Path) -> list[Path]:
    """``pairs.csv`` and every shard table of a study folder that exist."""
    return [p for p in [out_dir / PAIRS_FILE, *sorted(out_dir.glob("pairs-shard*of*.csv"))] if p.is_file()]


def merge_shards(out_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """``pairs.csv`` and every ``pairs-shard*of*.csv`` combined (deduplicated).

    With ``write`` the merged table replaces ``pairs.csv`` when there were shards; the shard
    files are left in place. Returns an empty table when there is nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"study folder {out_dir} is a file, not a folder")
    parts = table_files(out_dir)
    if not parts:
        return pd.DataFrame()
    merged = dedupe(pd.concat([read_table(p) for p in parts], ignore_index=True))
    if write and (len(parts) > 1 or not (out_dir / PAIRS_FILE).is_file()):
        write_table(merged, out_dir / PAIRS_FILE)
    return merged


def load_study(out_dir: str | Path, lambda2: float | None = None, latest: bool = True,
               method: str | None = PLAIN) -> pd.DataFrame:
    """The study table of ``out_dir`` (shards combined, read only), optionally only the rows at ``lambda2``.

    A folder can hold rows of several runs with different settings; with ``latest`` only the
    last-written row of each (source, target, λ2, α, seed, variant, method) is kept, so every pair
    counts once per run and method. Tables written before runs were keyed read as seed 0,
    ``paper``, method ``plain``. ``method`` keeps that method's rows (default eq. 8's, which
    every paper analysis reads); None keeps every method's (the method study report and figure).

    Raises:
        ArtifactError: no table in ``out_dir``, or a damaged one.
    """
    out_dir = Path(out_dir)
    df = merge_shards(out_dir, write=False)
    if df.empty:
        raise ArtifactError(f"no study table in {out_dir} (expected {PAIRS_FILE}); run `diag study` first")
    df = with_run_columns(df)
    if latest:
        ids = [c for c in ROW_ID if c != "lambda2"]
        dup = df.assign(_l=df["lambda2"].map(lam_key)).duplicated([*ids, "_l"], keep="last")
        if dup.any():
            log.info("study %s: %d older rows of re-run pairs hidden (latest=False shows them)", out_dir, int(dup.sum()))
        df = df.loc[~dup].reset_index(drop=True)
    if method is not None:
        df = of_method(df, method)
    return add_normalised(at_lambda(df, lambda2) if lambda2 is not None else df)


def of_method(df: pd.DataFrame, method: str = PLAIN) -> pd.DataFrame:
    """The rows of one transfer method (a table without a ``method`` column holds only ``plain`` rows)."""
    if "method" not in df.columns:
        return df if method == PLAIN else df.iloc[0:0]
    return df[df["method"].fillna(PLAIN) == method].reset_index(drop=True)


def with_run_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``alpha``, ``seed``, ``variant`` and ``method`` filled (older tables: α 0.8, seed 0, ``paper``,
    ``plain``)."""

    out = df.copy()
    if "alpha" not in out.columns:
        out["alpha"] = PAPER_ALPHA
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce").fillna(0).astype(int) if "seed" in out else 0
    if "variant" not in out.columns:
        out["variant"] = "paper"
    out["variant"] = out["variant"].where(~out["variant"].isin(["proposed"]) & out["variant"].notna(), "paper")
    out["method"] = out["method"].fillna(PLAIN) if "method" in out.columns else PLAIN
    return out


def at_lambda(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows at one λ2 (one row per pair for the main study); DataError if there are none."""
    out = df[df["lambda2"].map(lam_key) == lam_key(lambda2)].reset_index(drop=True)
    if out.empty:
        have = sorted(set(df["lambda2"].map(lam_key)))
        raise DataError(f"the study has no rows at λ2={lambda2:g}; it has λ2 in {have}")
    return out


def add_normalised(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`diag.stats.with_normalised` plus ``iou10_norm`` and normalised control/reference columns."""
    out = with_normalised(df)
    if {"iou10", "iou10_ft_target"} <= set(out.columns) and "iou10_norm" not in out:
        out["iou10_norm"] = out["iou10"] / out["iou10_ft_target"]
    for suffix in (*CONTROLS, "zeroshot", "ftx_target", "ft_source_on_target", "ftx_source_on_target"):
        if f"ermse_{suffix}" in out.columns and "ermse_ft_target" in out.columns:
            out[f"ermse_norm_{suffix}"] = out[f"ermse_{suffix}"] / out["ermse_ft_target"]
        if f"accuracy_{suffix}" in out.columns and "accuracy_ft_target" in out.columns:
            out[f"acc_norm_{suffix}"] = out[f"accuracy_{suffix}"] / out["accuracy_ft_target"]
    return out


def select_run(df: pd.DataFrame, variant: str | None = None, seed: int | str | None = None) -> pd.DataFrame:
    """Rows of one θ_ft* variant (default ``paper`` when present, else the first) and one training seed
    (default the smallest; ``"all"`` keeps every seed): per-pair analyses must not count a pair once per seed.

    Raises:
        UnknownNameError: a variant or seed the table does not hold.
    """
    df = with_run_columns(df)
    have = sorted(df["variant"].unique())
    variant = variant or ("paper" if "paper" in have else have[0])
    if variant not in have:
        raise unknown("variant of this study", variant, have)
    df = df[df["variant"] == variant]
    if seed == "all":
        return df.reset_index(drop=True)
    seeds = sorted(int(s) for s in df["seed"].unique())
    seed = seeds[0] if seed is None else int(seed)
    if seed not in seeds:
        raise unknown("seed of this study", str(seed), [str(s) for s in seeds])
    return df[df["seed"] == seed].reset_index(drop=True)
