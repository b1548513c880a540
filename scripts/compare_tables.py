"""Compare a rebuilt study table with a committed one, row by row (pair_key and λ2) and column by column.

    python scripts/compare_tables.py results/paper-s0/pairs.csv REBUILT/pairs.csv

Exit 0 when every committed row is in the rebuilt table with the same values (text equal,
numbers within the relative tolerance of ``diag study --verify``, 1e-6), else exit 1 naming
the first difference. Used by ``scripts/reproduce_seed0.sh``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diag.study.verify import compare, RTOL  # noqa: E402
from diag.table import read_table  # noqa: E402
from train.errors import ArtifactError  # noqa: E402


def main(committed: str, rebuilt: str) -> int:
    old, new = read_table(Path(committed)), read_table(Path(rebuilt))
    try:
        n = compare(old, new, Path(committed))
    except ArtifactError as err:
        print(f"differs: {err}", file=sys.stderr)
        return 1
    print(f"{n} rows of {committed} reproduced by {rebuilt} (relative tolerance {RTOL:g})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
