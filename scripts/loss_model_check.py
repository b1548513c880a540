"""The loss model λ·gᵀτ + ½λ²R against the measured loss change, with g and H from two kinds of images.

For every ordered pair (s, T) of the suite and training seed, g and R = τ*ˢᵀ Hᵀ τ*ˢ of the target loss
at θ_ftᵀ are estimated on

* ``train``: the first 256 of T's train images — the images θ_ftᵀ was fine-tuned on (what the study's
  Hᵀ and the suite's cards use), and
* ``val``: T's val images — labelled images θ_ftᵀ never trained on (what a card built on held-out
  images would hold),

and the loss change L(θ_ftᵀ + λτ*ˢ) − L(θ_ftᵀ) is measured on T's test images, which neither estimate
saw (cross-fitted), at small and large λ, with the measurement's paired standard error and its two
alternate-image halves (the measurement's own test–retest), gᵀτ's standard error (and the gated model
that keeps λ·gᵀτ only where |gᵀτ| ≥ 2 se), the logit-space model (the logits' second-order expansion
along τ under the exact cross-entropy, :mod:`diag.curvature.operators.logit_taylor`) with the range it
declares valid on its own images, and, as a reference no predictor from those images could beat by
much, the change measured directly on the estimating images. The rows are written as a checked table (``OUT/loss_model.csv``)
that ``scripts/results_report.py`` summarises with :func:`diag.decide.loss_model.calibrate` when it is
committed under ``results/``.

    python scripts/loss_model_check.py --store S --seeds 0 1 2 --out OUT [--domains ...]

Minutes per seed on 2 CPU cores; not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from diag.curvature.operators import HessianOperator  # noqa: E402
from diag.curvature.risk import loss_model, quadratic_check  # noqa: E402
from diag.decide.loss_model import (agreement, calibrate, calibration_text, gated_g_tau,  # noqa: E402
                                   logit_model_agreement)
from diag.features.pair_features import CurvatureSettings, Diagnostics  # noqa: E402
from diag.runtime.context import Workspace  # noqa: E402
from diag.study.provenance import code_version, record  # noqa: E402
from diag.table import ordered_pairs, write_table  # noqa: E402
from train.datasets import MINISUITE, model_inputs  # noqa: E402
from train.store import Store  # noqa: E402

STEPS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
ESTIMATES = ("train", "val")
BATCH = 128


def _batches(x, y):
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(y), BATCH)]


def target_operators(ws: Workspace, target: str) -> tuple[dict, list]:
    """The target's Hessian operators at θ_ftᵀ on train and on val images, and its test batches."""
    train = Diagnostics(ws, settings=CurvatureSettings()).operator(target)
    cfg = ws.backbone.config
    ops = {"train": train}
    xv, yv = model_inputs(cfg, target, "val", None, ws.data.get(target))
    ops["val"] = HessianOperator(train.model, _batches(xv, yv), params=list(train.param_names), engine=train.engine)
    xt, yt = model_inputs(cfg, target, "test", None, ws.data.get(target))
    return ops, _batches(xt, yt)


def check_seed(store: Store, seed: int, domains: list[str]) -> list[dict]:
    """Rows (seed, source, target, estimate, lambda2, g_tau, risk, predicted, predicted_second_order, measured)."""
    ws = Workspace(store, 0.8, seed=seed)
    rows = []
    current, ops, test = None, None, None
    for source, target in sorted(ordered_pairs(domains), key=lambda p: (p[1], p[0])):
        start = time.time()
        if target != current:
            current, (ops, test) = target, target_operators(ws, target)
        tau = ws.vector(source, "star").tensors
        for est in ESTIMATES:
            op = ops[est]
            for c in quadratic_check(op.model, op.data, tau, ts=STEPS, op=op, score_data=test):
                risk = 2.0 * c.second_order / c.t ** 2
                rows.append({"seed": seed, "source": source, "target": target, "estimate": est, "lambda2": c.t,
                             "g_tau": c.g_tau, "g_tau_se": c.g_tau_se, "risk": risk,
                             "predicted": loss_model(c.t, risk, c.g_tau),
                             "predicted_second_order": loss_model(c.t, risk, None),
                             "predicted_gated": loss_model(c.t, risk, gated_g_tau(c.g_tau, c.g_tau_se)),
                             "measured": c.measured, "measured_se": c.measured_se,
                             "measured_half_a": c.measured_half_a, "measured_half_b": c.measured_half_b,
                             "measured_on_estimate": c.estimate_measured, "predicted_logit": c.logit_predicted,
                             "predicted_logit_se": c.logit_predicted_se, "logit_valid": c.logit_valid,
                             "method": "plain"})
        print(f"seed {seed} {source}→{target}: {time.time() - start:.1f} s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="the store root ($TVDIAG_STORE)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--domains", nargs="+", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    store = Store(args.store, "tiny")
    domains = args.domains or sorted(MINISUITE)
    path = args.out / "loss_model.csv"
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for seed in args.seeds:
            rows += check_seed(store, seed, domains)
            write_table(pd.DataFrame(rows), path)  # what is done so far, checked
            record(path, f"seed={seed}", {"code": code_version(), "torch_threads": torch.get_num_threads(),
                                          "base_hash": Workspace(store, 0.8, seed=seed).base_hash,
                                          "steps": list(STEPS)})
    table = pd.DataFrame(rows)
    for est in ESTIMATES:
        part = table[table["estimate"] == est]
        print(f"g and H on {est} images, ΔL on test images:")
        print("\n".join("  " + line for line in calibration_text(calibrate(part), est, "test")))
        logit = logit_model_agreement(part)
        print(f"  logit-space model: {logit['consistent']:.0%} consistent, {logit['within']:.0%} within ×1.5; in the "
              f"range it declares valid ({logit['declared_share']:.0%} of rows): {logit['declared']['consistent']:.0%} "
              "consistent (per λ: " + ", ".join(f"{p['lambda2']:g}: {p['declared']['consistent']:.0%} of "
                                                f"{p['declared_share']:.0%}" for p in logit["per_lambda"]) + ")")
        ref = agreement(part["measured_on_estimate"], part["measured"], measured_se=part["measured_se"])
        print(f"  reference: the change itself measured on the {est} images, scored the same way: "
              f"{ref['within']:.0%} within ×1.5, {ref['consistent']:.0%} within ×1.5 or 1.96 se")
    return 0


if __name__ == "__main__":
    sys.exit(main())
