"""Do the ranking's intervals hold on a domain that is not one of the study's seven?

Builds ImageFolders (one folder per class, ``train/`` and ``test/`` kept) of transformed suite
domains — their images change, their classes do not, and none of them is in the study the
predictor learns from — then, as a user with such a folder would, runs

    diag rank-sources --target D --data D=FOLDER --study STUDY --json   (predictions with intervals)
    diag transfer --source S --target D --data D=FOLDER --json          (the measured test values)

for every source, and scores each prediction against the measurement: the share of (domain,
source) pairs inside their interval (with a Wilson interval) and the bias (mean predicted −
measured, ± its standard error), per quantity. The scored rows are written as a checked study
table (``OUT/scored.csv``) that ``scripts/results_report.py`` reads when it is committed under
``results/``.

    python scripts/outside_domains.py --study DIR --out OUT [--store S] [--domains recolor:gtsrb crop:cifar10]

Long (a zoo build per new domain: minutes on 2 CPU cores); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diag.stats import wilson_interval  # noqa: E402
from diag.table import write_table  # noqa: E402

SUITE = ROOT / "data" / "minisuite"
TRANSFORMS = ("recolor", "crop")


def transform(x: np.ndarray, how: str) -> np.ndarray:
    """``recolor``: channels reversed and inverted; ``crop``: the central 20 × 20 pixels (read back at 32 px)."""
    if how == "recolor":
        return 255 - x[..., ::-1]
    if how == "crop":
        return x[:, 6:26, 6:26]
    raise SystemExit(f"unknown transform {how!r} (known: {', '.join(TRANSFORMS)})")


def make_folder(domain: str, how: str, out: Path) -> Path:
    """An ImageFolder of ``domain``'s train and test images, transformed by ``how`` (written once)."""
    folder = out / f"{domain}-{how}"
    if (folder / ".complete").is_file():
        return folder
    arrays = np.load(SUITE / f"{domain}.npz")
    names = [str(n) for n in arrays["classnames"]]
    for split in ("train", "test"):
        x, y = transform(arrays[f"x_{split}"], how), arrays[f"y_{split}"]
        for i, (img, label) in enumerate(zip(x, y)):
            cls = folder / split / names[int(label)].replace("/", " ")
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img)).save(cls / f"{i:05d}.png")
    (folder / ".complete").write_text("ok")
    return folder


def diag_json(args: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "diag.cli", *args, "--json", "--quiet"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _row(rows: list[dict], model: str) -> dict:
    return next(r for r in rows if r["model"] == model)


def score_domain(name: str, folder: Path, study: Path, env: dict) -> list[dict]:
    """One scored row per (source, quantity) of the new domain ``name``."""
    data = ["--data", f"{name}={folder}"]
    ranking = diag_json(["rank-sources", "--target", name, "--study", str(study), *data], env)
    scored = []
    for src in ranking["sources"]:
        result = diag_json(["transfer", "--source", src["source"], "--target", name, "--no-controls", *data], env)
        prop, ft = _row(result["rows"], "proposed"), _row(result["rows"], "θ_ftᵀ")
        measured = {"ermse_norm": prop["ermse"] / ft["ermse"],
                    "acc_drop": 1.0 - prop["accuracy"] / max(ft["accuracy"], 1e-12)}
        for q, value in measured.items():
            shown = ranking["predictions"][q]  # a quantity not predictable: the training mean for every source
            point = src[f"predicted_{q}"] if shown.get("predictable", True) else shown["training_mean"]
            lo, hi = src[f"predicted_{q}_interval"] or shown["training_mean_interval"]
            lo, hi = (-math.inf if lo is None else lo), (math.inf if hi is None else hi)
            scored.append({"target": name, "source": src["source"], "quantity": q,
                           "predicted": point, "lo": lo, "hi": hi, "measured": value,
                           "predictable": float(shown.get("predictable", True)),
                           "inside": float(lo <= value <= hi), "level": ranking["level"]})
    return scored


def summary(rows: list[dict]) -> dict:
    """Per quantity: n, coverage with its Wilson interval, bias ± se."""
    out = {}
    for q in sorted({r["quantity"] for r in rows}):
        part = [r for r in rows if r["quantity"] == q]
        k, n = int(sum(r["inside"] for r in part)), len(part)
        err = np.array([r["predicted"] - r["measured"] for r in part])
        out[q] = {"n": n, "coverage": k / n, "ci95": list(wilson_interval(k, n)), "bias": float(err.mean()),
                  "bias_se": float(err.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="the suite's study folder the predictor learns from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=None, help="default $TVDIAG_STORE or ~/.cache/tvdiag")
    parser.add_argument("--domains", nargs="+", default=["recolor:gtsrb", "crop:cifar10"],
                        help="TRANSFORM:SUITE_DOMAIN pairs")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.store:
        env["TVDIAG_STORE"] = str(args.store)
    rows = []
    for spec in args.domains:
        how, domain = spec.split(":")
        folder = make_folder(domain, how, args.out / "folders")
        rows += score_domain(f"{domain}-{how}", folder, args.study, env)
    import pandas as pd  # defer: only for the checked table

    write_table(pd.DataFrame(rows), args.out / "scored.csv")
    result = summary(rows)
    (args.out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
