"""Compare a rebuilt study table with a committed one, row by row and column by column.

    python scripts/compare_tables.py results/paper-s0/pairs.csv REBUILT/pairs.csv [--by-pair] [--ignore COL ...]

Rows are matched by ``pair_key`` and λ2; with ``--by-pair`` by what the row is about — source,
target, seed, variant, α, method and λ2 — so that a table built before a change of the study's
settings key (e.g. the default card form) can still be compared on the columns the change does not
touch; ``--ignore`` leaves columns out (e.g. ``risk_card`` and ``grad_dot_tau``, which depend on the
card form); ``--rows-of-rebuilt`` compares only the committed rows the rebuilt table has (seed 0 at
λ2 = 0.7 of a table of several seeds and a λ2 grid). Exit 0 when every compared committed row is in
the rebuilt table with the same values (text equal, numbers within the relative tolerance of
``diag study --verify``, 1e-6), else exit 1 naming the first difference. Used by ``scripts/reproduce_seed0.sh``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diag.study.verify import _row_id, compare, RTOL  # noqa: E402
from diag.table import read_table  # noqa: E402
from train.errors import ArtifactError  # noqa: E402

#: What a row is about, when its pair_key cannot be compared (``--by-pair``).
IDENTITY = ("source", "target", "seed", "variant", "alpha", "method")


def _by_pair(df):
    ids = df[[c for c in IDENTITY if c in df.columns]].astype(str).agg("|".join, axis=1)
    return df.assign(pair_key=ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("committed", type=Path)
    p.add_argument("rebuilt", type=Path)
    p.add_argument("--by-pair", action="store_true", help="match rows by source, target, seed, variant, α, method, λ2")
    p.add_argument("--ignore", action="append", default=[], metavar="COL", help="a column left out (repeatable)")
    p.add_argument("--rows-of-rebuilt", action="store_true",
                   help="compare only the committed rows the rebuilt table has (e.g. seed 0 at λ2 = 0.7 of a "
                        "table of several seeds and λ2s); at least one must match")
    args = p.parse_args(argv)
    old, new = read_table(args.committed), read_table(args.rebuilt)
    if args.by_pair:
        old, new = _by_pair(old), _by_pair(new)
    if args.rows_of_rebuilt:
        old = old[_row_id(old).isin(set(_row_id(new)))]
        if old.empty:
            print(f"differs: no row of {args.rebuilt} is in {args.committed}", file=sys.stderr)
            return 1
    ignored = [c for c in args.ignore if c in old.columns]
    try:
        n = compare(old.drop(columns=ignored), new.drop(columns=[c for c in ignored if c in new.columns]),
                    args.committed)
    except ArtifactError as err:
        print(f"differs: {err}", file=sys.stderr)
        return 1
    left_out = f", leaving out {', '.join(ignored)}" if ignored else ""
    print(f"{n} rows of {args.committed} reproduced by {args.rebuilt} (relative tolerance {RTOL:g}{left_out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
