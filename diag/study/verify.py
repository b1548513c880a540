"""Re-checking an untrusted study table by recomputing its rows (``diag study --verify``).

A pair table whose side file is missing, damaged or disagrees with its bytes is refused by
every reader (:func:`diag.table.read_table`): nothing says its numbers are the ones tvdiag
computed. :func:`verify_study` recomputes every row the given settings produce into a
scratch folder and compares them with the untrusted table, row by row (matched on
``pair_key`` and λ2) and column by column. When every row of the table is recomputed and
agrees, the table's bytes are re-certified (a new side file; the table itself is not
rewritten); otherwise nothing is written and the error names the first disagreement.

Agreement: text columns equal; numeric columns equal within ``rtol`` = 1e-6 (a table built
with another thread count or worker split may differ in the last float32 bits; an edited
value, a truncated row or a row from other settings does not pass).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from diag.study.run import run_study, StudySettings
from diag.table import certify, lam_key, read_table, table_files, TEXT
from train.errors import ArtifactError
from train.store import Store

RTOL = 1e-6


@dataclass(frozen=True)
class TableCheck:
    """One table's outcome: rows compared, rows that agree, and whether it was re-certified."""

    path: Path
    rows: int
    agree: int
    certified: bool

    def to_dict(self) -> dict:
        return {"path": str(self.path), "rows": self.rows, "agree": self.agree, "certified": self.certified}


def untrusted_tables(out_dir: Path) -> list[Path]:
    """The tables of a study folder that a trusted read refuses."""
    bad = []
    for path in table_files(Path(out_dir)):
        try:
            read_table(path)
        except ArtifactError:
            bad.append(path)
    return bad


def _row_id(df: pd.DataFrame) -> pd.Series:
    return df["pair_key"].astype(str) + "|" + df["lambda2"].map(lam_key).astype(str)


def _missing(v) -> bool:
    """None, NaN and pandas' NA (text columns read as strings hold NA, whose truth value raises)."""
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


def _differs(a, b, column: str) -> bool:
    if _missing(a) or _missing(b):
        return _missing(a) != _missing(b)
    if column in TEXT:
        return str(a) != str(b)
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return str(a) != str(b)
    if math.isnan(x) or math.isnan(y):
        return not (math.isnan(x) and math.isnan(y))
    return not math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-12)


def compare(untrusted: pd.DataFrame, recomputed: pd.DataFrame, path: Path) -> int:
    """Rows of ``untrusted`` that agree with ``recomputed``; ArtifactError at the first row that does not.

    Raises:
        ArtifactError: a row that was not recomputed (other settings or domains), or a value
            that differs from its recomputation.
    """
    fresh = recomputed.assign(_id=_row_id(recomputed)).drop_duplicates("_id", keep="last").set_index("_id")
    for n, (rid, row) in enumerate(zip(_row_id(untrusted), untrusted.to_dict(orient="records"))):
        if rid not in fresh.index:
            raise ArtifactError(f"study table {path}: row {n + 1} ({row['source']}→{row['target']}, λ2="
                                f"{row['lambda2']}) is not one these settings compute; rerun --verify with the "
                                "table's domains, λ2s, seeds, variant and methods, or --fresh to replace it")
        other = fresh.loc[rid]
        for column, value in row.items():
            if column in other.index and _differs(value, other[column], column):
                raise ArtifactError(f"study table {path}: row {n + 1} ({row['source']}→{row['target']}, λ2="
                                    f"{row['lambda2']}) has {column}={value}, its recomputation gives "
                                    f"{other[column]}; the table was changed: --fresh replaces it")
    return len(untrusted)


def verify_study(store: Store, domains: Sequence[str], settings: StudySettings, out_dir: Path, *,
                 progress: bool = True, data: dict | None = None, workspace=None) -> list[TableCheck]:
    """Recompute the rows of every untrusted table of ``out_dir`` and re-certify those that agree.

    Every untrusted table is compared before any is certified, so a failure writes nothing.

    Raises:
        ArtifactError: a table that cannot be read as a table at all, a row these settings do
            not compute, or a value that differs from its recomputation.
    """
    out_dir = Path(out_dir)
    bad = untrusted_tables(out_dir)
    if not bad:
        return []
    with tempfile.TemporaryDirectory(prefix="tvdiag-verify-") as scratch:
        recomputed = run_study(store, domains, settings, out_dir=Path(scratch), shard=(0, 1), resume=False,
                               progress=progress, data=data, workspace=workspace)
    checks = []
    for path in bad:
        table = read_table(path, trusted=False)
        checks.append(TableCheck(path, len(table), compare(table, recomputed, path), False))
    for check in checks:
        certify(check.path)
    return [TableCheck(c.path, c.rows, c.agree, True) for c in checks]
