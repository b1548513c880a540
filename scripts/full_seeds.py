"""The full-seed axis: one study per full seed (θ_base and the splits reseeded), gathered into one checked table.

Each full seed F is a store of its own, built with ``TVDIAG_BASE_SEED=F TVDIAG_SPLIT_SEED=F`` (θ_base's
initialisation and pretraining, and the val carve, drawn from F; the test split is the suite's own),
then studied at training seed 0:

    TVDIAG_STORE=S1 TVDIAG_BASE_SEED=1 TVDIAG_SPLIT_SEED=1 diag zoo --seeds 0
    TVDIAG_STORE=S1 TVDIAG_BASE_SEED=1 TVDIAG_SPLIT_SEED=1 diag study --seeds 0 --no-curvature --out STUDY1
    python scripts/full_seeds.py --out results/full-seeds 0=STUDY0 1=STUDY1 2=STUDY2

Only the plain eq. 8 rows at λ2 = 0.7 of the paper variant, training seed 0, are kept, with a ``full_seed``
column; ``OUT/full_seeds.csv`` gets its check file and a provenance side file keyed by full seed, which
``scripts/results_report.py`` renders. Seconds; not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from diag.constants import PAPER_LAMBDA2  # noqa: E402
from diag.table import PLAIN, at_lambda, load_study, write_table  # noqa: E402
from train.errors import DataError  # noqa: E402


def gather(studies: dict[int, Path]) -> tuple[pd.DataFrame, dict]:
    """The rows of every full seed's study (paper variant, training seed 0, plain, λ2 = 0.7) and their provenance."""
    parts, provenance = [], {}
    for full_seed, folder in sorted(studies.items()):
        table = load_study(folder)
        rows = at_lambda(table[(table["variant"] == "paper") & (table["seed"] == 0)
                               & (table.get("method", PLAIN) == PLAIN)], PAPER_LAMBDA2)
        if rows.empty:
            raise DataError(f"{folder}: no paper-variant rows of training seed 0 at λ2 = {PAPER_LAMBDA2:g}")
        if rows["base_hash"].nunique() != 1:
            raise DataError(f"{folder}: rows of several θ_base — one full seed per study")
        parts.append(rows.assign(full_seed=full_seed))
        side = folder / "pairs.csv.provenance.json"
        if side.is_file():
            for key, entry in json.loads(side.read_text()).items():
                if "seed=0" in key and "variant=paper" in key:
                    provenance[f"full seed {full_seed} ({key})"] = entry
    table = pd.concat(parts, ignore_index=True)
    hashes = table.groupby("full_seed")["base_hash"].first()
    if hashes.nunique() != len(hashes):
        raise DataError("two full seeds share one θ_base: were both stores built with the same $TVDIAG_BASE_SEED?")
    return table, provenance


def _study(text: str) -> tuple[int, Path]:
    seed, sep, folder = text.partition("=")
    if not sep or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"expected FULL_SEED=STUDY_DIR, got {text!r}")
    return int(seed), Path(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=_study, nargs="+", metavar="FULL_SEED=STUDY_DIR")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table, provenance = gather(dict(args.studies))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "full_seeds.csv"
    write_table(table, path)
    path.with_name(path.name + ".provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    counts = table.groupby("full_seed").size().to_dict()
    print(f"{path}: {len(table)} rows, per full seed {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
