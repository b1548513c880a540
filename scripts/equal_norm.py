"""The from-ft explainability vectors at the paper variant's norm, scored beside the paper variant.

For each source S and variant v, the matched scale is λ2ᵥ = 0.7 · ‖τ*ˢ(paper)‖ / ‖τ*ˢ(v)‖, so that
‖λ2ᵥ · τ*ˢ(v)‖ = ‖0.7 · τ*ˢ(paper)‖: a function of the weights only (no data, no choice on any split).
Every ordered pair of ``--domains`` is scored on the target's test split by
:func:`diag.transfer.evaluate.evaluate_pair` (the one scorer of eq. 8), in these forms:

* ``paper@0.7`` — the paper variant at λ2 = 0.7 (the README's headline);
* ``<v>@0.7`` and ``<v>@norm`` — each other variant at λ2 = 0.7 and at its matched λ2ᵥ
  (``from-ft``: τ* = θ_ft* − θ_twin; ``from-ft-raw``: τ* = θ_ft* − θ_ft; :data:`train.store.VARIANTS`).

Writes ``<out>/equal_norm.csv`` (a validated table: one row per pair and form, with ``form``,
``norm_star`` = ‖τ*ˢ‖ and ``norm_step`` = ‖λ2·τ*ˢ‖) and ``<out>/equal_norm.json``: per form the
headline counts of :func:`diag.study.summary.summarize` (E-RMSE below θ_ftᵀ's while keeping ≥ 90 % of
its accuracy) with the Wilson 95 % interval of the headline share, the means of E-RMSE and accuracy
(raw and ÷ θ_ftᵀ) ± their standard errors over pairs, and the paired difference against
``paper@0.7`` (same pairs and images) ± its standard error over pairs and a two-way (source × target)
cluster-bootstrap 95 % interval (pairs share domains: the standard error over pairs is optimistic).

    python scripts/equal_norm.py --store DIR --out DIR [--preset default] [--seed 0]
        [--variants from-ft from-ft-raw] [--domains ...] [--no-controls]

A missing artifact (θ_ft* of a variant, the from-ft twin) is built first through the zoo (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diag.constants import PAPER_ALPHA, PAPER_LAMBDA2  # noqa: E402
from diag.runtime.context import Context, Workspace  # noqa: E402
from diag.stats import wilson_interval  # noqa: E402
from diag.study.summary import mean_se, summarize  # noqa: E402
from diag.table import add_normalised, write_table  # noqa: E402
from diag.transfer.evaluate import evaluate_pair  # noqa: E402
from train.datasets import MINISUITE  # noqa: E402
from train.store import check_variant  # noqa: E402
from train.tensorio import atomic_write_bytes  # noqa: E402

REFERENCE = "paper@0.7"
N_BOOT = 2000


def matched_lambda2(reference: Workspace, ws: Workspace, source: str, lambda2: float = PAPER_LAMBDA2) -> float:
    """λ with ‖λ · τ*ˢ(``ws``)‖ = ‖``lambda2`` · τ*ˢ(``reference``)‖ (the two runs' explainability vectors)."""
    return lambda2 * reference.vector(source, "star").norm() / ws.vector(source, "star").norm()


def score_forms(paper: Workspace, variants: list[str], domains: list[str], lambda2: float = PAPER_LAMBDA2,
                controls: bool = True) -> pd.DataFrame:
    """One row per ordered pair and form (module docstring), scored on each target's test split."""
    runs = {v: paper.for_run(variant=check_variant(v)) for v in variants}
    rows = []
    for source in domains:
        norm_p = paper.vector(source, "star").norm()
        forms = [(REFERENCE, paper, lambda2, norm_p)]
        for v, ws in runs.items():
            norm_v = ws.vector(source, "star").norm()
            forms += [(f"{v}@{lambda2:g}", ws, lambda2, norm_v),
                      (f"{v}@norm", ws, matched_lambda2(paper, ws, source, lambda2), norm_v)]
        for target in domains:
            if target == source:
                continue
            for form, ws, lam, norm in forms:
                res = evaluate_pair(ws, source, target, lambda2s=[lam], controls=controls, candidates=domains)[0]
                rows.append({"form": form, "norm_star": norm, "norm_step": lam * norm, **res.to_row()})
    return pd.DataFrame(rows)


def two_way_ci(df: pd.DataFrame, column: str, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``column`` under a source × target cluster bootstrap."""
    x = df[column].to_numpy(float)
    src = {d: i for i, d in enumerate(sorted(df["source"].unique()))}
    tgt = {d: i for i, d in enumerate(sorted(df["target"].unique()))}
    si, ti = df["source"].map(src).to_numpy(), df["target"].map(tgt).to_numpy()
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        w = (np.bincount(rng.integers(0, len(src), len(src)), minlength=len(src))[si]
             * np.bincount(rng.integers(0, len(tgt), len(tgt)), minlength=len(tgt))[ti])
        if w.sum() > 0:
            reps.append(float((w * x).sum() / w.sum()))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


def summarize_forms(df: pd.DataFrame, n_boot: int = N_BOOT) -> dict:
    """Per form: headline counts, means ± SE over pairs, paired differences against :data:`REFERENCE`."""
    df = add_normalised(df)
    ref = df[df["form"] == REFERENCE].set_index(["source", "target"])
    out = {}
    for form, g in df.groupby("form", sort=False):
        s = summarize(g.drop(columns="lambda2"), lambda2=float("nan"))
        lo, hi = wilson_interval(s.n_better_keep90, s.n_pairs)
        rec = {"n_pairs": s.n_pairs, "headline": s.n_better_keep90, "headline_share_ci95": [lo, hi],
               "lower_ermse": s.n_lower_ermse, "keep90": s.n_keep90,
               "lambda2": mean_se(g["lambda2"]), "norm_step": mean_se(g["norm_step"]),
               "ermse": mean_se(g["ermse"]), "accuracy": mean_se(g["accuracy"]),
               "ermse_norm": [s.mean_ermse_norm, s.mean_ermse_norm_se],
               "acc_norm": [s.mean_acc_norm, s.mean_acc_norm_se],
               "wins": {"random": s.n_beat_random, "meanmap": s.n_beat_meanmap, "other_rescaled": s.n_beat_other_rescaled},
               "n_controls": s.n_controls}
        if form != REFERENCE:
            paired = g.set_index(["source", "target"])
            diff = pd.DataFrame({m: paired[m] - ref.loc[paired.index, m] for m in ("ermse_norm", "acc_norm")})
            diff = diff.reset_index()
            rec["minus_paper"] = {m: {"mean_se": mean_se(diff[m]), "ci95_two_way": two_way_ci(diff, m, n_boot)}
                                  for m in ("ermse_norm", "acc_norm")}
        out[form] = rec
    return out


def render(summary: dict) -> str:
    """The summary as a Markdown table (mean ± SE over pairs; differences with the two-way bootstrap CI)."""
    lines = ["| form | λ2 | ‖λ2·τ*‖ | headline (95 % CI of share) | E-RMSE | accuracy | E-RMSE ÷ θ_ftᵀ | acc ÷ θ_ftᵀ "
             "| Δ E-RMSE÷ vs paper [CI] | Δ acc÷ vs paper [CI] |", "|" + " --- |" * 10]
    for form, r in summary.items():
        def pm(v):
            return f"{v[0]:.3f} ± {v[1]:.3f}"
        cells = [form, pm(r["lambda2"]), pm(r["norm_step"]),
                 f"{r['headline']}/{r['n_pairs']} [{r['headline_share_ci95'][0]:.2f}, {r['headline_share_ci95'][1]:.2f}]",
                 pm(r["ermse"]), pm(r["accuracy"]), pm(r["ermse_norm"]), pm(r["acc_norm"])]
        for m in ("ermse_norm", "acc_norm"):
            d = r.get("minus_paper", {}).get(m)
            cells.append(f"{d['mean_se'][0]:+.3f} ± {d['mean_se'][1]:.3f} [{d['ci95_two_way'][0]:+.3f}, "
                         f"{d['ci95_two_way'][1]:+.3f}]" if d else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0, help="training seed of every vector and φ")
    p.add_argument("--alpha", type=float, default=PAPER_ALPHA)
    p.add_argument("--lambda2", type=float, default=PAPER_LAMBDA2, help="the paper variant's λ2 (and the norm matched)")
    p.add_argument("--variants", nargs="+", default=["from-ft", "from-ft-raw"])
    p.add_argument("--domains", nargs="+", default=list(MINISUITE))
    p.add_argument("--no-controls", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    ctx = Context(args.store, preset=args.preset, progress=not args.quiet, workers=1)
    ctx.ensure(args.domains, (args.alpha,), variants=("paper", *args.variants), seeds=(args.seed,))
    paper = ctx.workspace(args.alpha, seed=args.seed, variant="paper")
    df = score_forms(paper, args.variants, args.domains, args.lambda2, controls=not args.no_controls)
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(df, args.out / "equal_norm.csv")
    summary = summarize_forms(df)
    atomic_write_bytes(args.out / "equal_norm.json", (json.dumps(summary, indent=1) + "\n").encode())
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
