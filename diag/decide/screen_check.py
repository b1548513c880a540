"""Does the screen's verdict hold on the test split? Leave one target out, over the seeds of a study.

For every training seed of a study table (plain eq. 8 rows of one variant, with the λ2 grid) and
every target T, the pair predictor (:func:`diag.decide.predictor.fit_pair_predictor`, tier-2
features) is fitted on the λ2 = 0.7 pairs involving T neither as target nor as source, exactly as
``rank-sources`` and ``screen`` fit it for a new target. Each held-out pair (s, T) then gets the
two verdicts ``diag screen`` prints, computed from what the screen itself reads — T's ``val``
accuracies on the λ2 grid with their paired standard errors, the exact risk and gᵀτ, the
predictions — never a test number:

* ``plain``: :func:`diag.decide.rules.screen_verdict` for plain eq. 8 at λ2 = 0.7;
* ``recommended``: :func:`diag.decide.rules.method_verdict` for plain eq. 8 at the λ2 chosen on
  val (:func:`diag.decide.recommend.plain_from_grid`; the screen's other methods need the vectors,
  not just the table).

With ``every_lambda``, the plain verdict is also given at every other λ2 of the grid, as
``diag screen --lambda2 λ`` gives it (the val drop measured at 0.7, scaled by (λ/0.7)² with its
se), and scored at that λ2: at small λ2 "go" is common enough for its precision to be measured.

Each verdict is scored against the measured test outcome at its λ2: a *success* keeps the
accuracy within the budget (1 − acc/acc(θ_ftᵀ) ≤ budget) and explains better than θ_ftᵀ
(E-RMSE below θ_ftᵀ's). A verdict with no safe λ2 is scored at the smallest λ2 of the grid.
Reported: the confusion table (verdict × outcome), the precision of "go" (share of go verdicts
that succeed) and the recall of "no-go" (share of failures called no-go), each with its Wilson
interval (pairs taken as independent; those of one target are not, so the intervals are
somewhat narrow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diag.constants import DEFAULT_MAX_ACC_DROP, PAPER_LAMBDA2, PREDICTION_LEVEL
from diag.decide.predictor import RANKER, fit_pair_predictor, tier_features
from diag.decide.record import MIN_TRAINING_PAIRS, training_pairs
from diag.decide.recommend import plain_from_grid, predicted_gain
from diag.decide.rules import method_verdict, screen_verdict
from diag.stats import wilson_interval
from diag.table import at_lambda, lam_key, with_run_columns
from train.errors import DataError

__all__ = ["VERDICTS", "ScreenCheck", "validate_screen"]

VERDICTS = ("go", "caution", "no-go")
KINDS = ("plain", "recommended")


@dataclass(frozen=True)
class ScreenCheck:
    """The verdicts of one kind against the test outcome.

    Attributes:
        kind: ``plain`` (eq. 8 at ``lambda2``) or ``recommended`` (eq. 8 at the λ2 chosen on val).
        confusion: verdict → {"success": n, "failure": n}.
        go_precision, go_precision_ci: share of "go" that succeeded, Wilson interval (NaN: no go).
        nogo_recall, nogo_recall_ci: share of the failures called "no-go" (NaN: no failure).
        n: scored pairs; n_seeds: training seeds.
        lambda2: the plain verdict's λ2 (None for ``recommended``).
    """

    kind: str
    confusion: dict
    go_precision: float
    go_precision_ci: tuple[float, float]
    nogo_recall: float
    nogo_recall_ci: tuple[float, float]
    n: int
    n_seeds: int
    lambda2: float | None = PAPER_LAMBDA2

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lambda2": self.lambda2, "confusion": self.confusion,
                "go_precision": self.go_precision, "go_precision_ci": list(self.go_precision_ci),
                "nogo_recall": self.nogo_recall, "nogo_recall_ci": list(self.nogo_recall_ci), "n": self.n,
                "n_seeds": self.n_seeds}

    @property
    def what(self) -> str:
        return f"plain eq. 8 at λ2 = {self.lambda2:g}" if self.kind == "plain" else "plain eq. 8 at the λ2 chosen on val"

    def line(self) -> str:
        """One line: the verdicts' success/failure counts and the two rates."""
        conf = "; ".join(f"{v} {self.confusion[v]['success']}/{self.confusion[v]['failure']}" for v in VERDICTS)
        return (f"{self.what}: {conf} (success/failure); precision of go "
                f"{_rate(self.go_precision, self.go_precision_ci)}, recall of no-go "
                f"{_rate(self.nogo_recall, self.nogo_recall_ci)}")

    def lines(self) -> list[str]:
        """The confusion table and the two rates, in plain lines."""
        what = self.what
        out = [f"screen verdicts for {what}, leave one target out over {self.n_seeds} seed(s), {self.n} pairs "
               "(success: test accuracy within the budget and E-RMSE below θ_ftᵀ's)",
               f"  {'verdict':8s} {'success':>8s} {'failure':>8s}"]
        out += [f"  {v:8s} {self.confusion[v]['success']:8d} {self.confusion[v]['failure']:8d}" for v in VERDICTS]
        out.append(f"  precision of go {_rate(self.go_precision, self.go_precision_ci)}; "
                   f"recall of no-go {_rate(self.nogo_recall, self.nogo_recall_ci)} (95 % Wilson)")
        return out


def _rate(value: float, ci: tuple[float, float]) -> str:
    return "n/a (none)" if not math.isfinite(value) else f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _val_grid(pair: pd.DataFrame) -> pd.DataFrame:
    """The pair's val accuracy grid as ``accuracy_grid`` gives it (acc_drop relative to θ_ftᵀ's val accuracy)."""
    base = pair["accuracy_val_ft_target"].astype(float).clip(lower=1e-12)
    return pd.DataFrame({"lambda2": pair["lambda2"].astype(float).to_numpy(),
                         "acc_drop": (1.0 - pair["accuracy_val"].astype(float) / base).to_numpy(),
                         "acc_drop_se": pd.to_numeric(pair.get("acc_drop_val_se"), errors="coerce").to_numpy(),
                         "n_val": 0})


def _outcome(row, budget: float) -> bool:
    """Test success at the row's λ2: accuracy within the budget and E-RMSE below θ_ftᵀ's."""
    drop = 1.0 - float(row["accuracy"]) / max(float(row["accuracy_ft_target"]), 1e-12)
    return drop <= budget + 1e-12 and float(row["ermse"]) < float(row["ermse_ft_target"])


def _pair_verdicts(pair: pd.DataFrame, pred, at07: pd.DataFrame, target: str, budget: float,
                   every_lambda: bool = False) -> dict:
    """Both verdicts of one held-out pair and their test outcomes (``every_lambda``: also the plain verdict at
    every other λ2 of the pair's grid, ``plain@<λ2>`` and ``plain@<λ2>_success``)."""
    by_lam = {lam_key(v): r for v, (_, r) in zip(pair["lambda2"], pair.iterrows())}
    ref = by_lam[lam_key(PAPER_LAMBDA2)]
    grid = _val_grid(pair)
    rec = plain_from_grid(grid, budget)
    at = grid[grid["lambda2"].map(lam_key) == lam_key(PAPER_LAMBDA2)].iloc[0]
    row = {**ref.to_dict(), **pred, "lambda2": float(rec["method_param"]) if rec["safe"] else 0.0,
           "measured_acc_drop": float(at["acc_drop"]), "measured_acc_drop_se": float(at["acc_drop_se"]),
           "measured_n_val": 0}
    plain, _ = screen_verdict(row, at07, target, PAPER_LAMBDA2, budget)
    others = {}
    for lam in (sorted(by_lam) if every_lambda else []):
        if lam != lam_key(PAPER_LAMBDA2):
            others[f"plain@{lam:g}"] = screen_verdict(row, at07, target, lam, budget)[0]
            others[f"plain@{lam:g}_success"] = _outcome(by_lam[lam], budget)
    gain, lo, hi = predicted_gain(pred["predicted_ermse_norm"], pred["predicted_ermse_norm_lo"],
                                  pred["predicted_ermse_norm_hi"], rec["size_ratio"], rec["safe"])
    recommended, _ = method_verdict({**rec, "predicted_gain": gain, "predicted_gain_lo": lo, "predicted_gain_hi": hi},
                                    budget)
    return {"plain": plain, "plain_success": _outcome(ref, budget), "recommended": recommended,
            "recommended_success": _outcome(by_lam[lam_key(float(rec["method_param"]))], budget),
            "recommended_lambda2": float(rec["method_param"]) if rec["safe"] else 0.0, **others}


def validate_screen(table: pd.DataFrame, budget: float = DEFAULT_MAX_ACC_DROP, level: float = PREDICTION_LEVEL,
                    model: str = RANKER, seed: int = 0, every_lambda: bool = False
                    ) -> tuple[list[ScreenCheck], pd.DataFrame]:
    """The screen's verdicts against the test outcome, leave one target out (module docstring).

    Args:
        table: plain eq. 8 rows of one variant, every seed, with the λ2 grid and the val columns
            (``accuracy_val``, ``accuracy_val_ft_target``, ``acc_drop_val_se``).

    Returns:
        (one :class:`ScreenCheck` per kind, then with ``every_lambda`` one per other λ2 of the grid in
        ascending order; the scored pairs: seed, target, source, plain, plain_success, recommended,
        recommended_success, recommended_lambda2, and ``plain@<λ2>``, ``plain@<λ2>_success``).

    Raises:
        DataError: no val accuracies, no λ2 = 0.7 rows, or no target with enough known pairs.
    """
    if not {"accuracy_val", "accuracy_val_ft_target"} <= set(table.columns):
        raise DataError("the study table has no val accuracies (accuracy_val): rerun `diag study` to add them")
    runs = with_run_columns(table)
    rows = []
    for run_seed, run in runs.groupby("seed"):
        at07 = at_lambda(run, PAPER_LAMBDA2)
        for target in sorted(at07["target"].unique()):
            train = training_pairs(at07, target)
            if len(train) < MIN_TRAINING_PAIRS:
                continue
            pred = fit_pair_predictor(train, tier_features(train, 2), model, level, seed)
            held = at07[(at07["target"] == target) & (at07["source"] != target)].reset_index(drop=True)
            p = pred.predict(held)
            for i, source in enumerate(held["source"]):
                pair = run[(run["target"] == target) & (run["source"] == source)]
                rows.append({"seed": int(run_seed), "target": target, "source": source,
                             **_pair_verdicts(pair, p.iloc[i].to_dict(), at07, target, budget, every_lambda)})
    scored = pd.DataFrame(rows)
    if scored.empty:
        raise DataError(f"no target with {MIN_TRAINING_PAIRS} or more known pairs without it: no screen to validate")
    grid = sorted({float(c[len("plain@"):]) for c in scored.columns if c.startswith("plain@") and
                   not c.endswith("_success")})
    return ([_check(kind, scored) for kind in KINDS]
            + [_check("plain", scored, f"plain@{lam:g}", lam) for lam in grid]), scored


def _check(kind: str, scored: pd.DataFrame, column: str | None = None, lambda2: float = PAPER_LAMBDA2) -> ScreenCheck:
    column = column or kind
    ok = scored[column].notna()  # a pair without that λ2 in its grid is not scored there
    verdict, success = scored.loc[ok, column], scored.loc[ok, f"{column}_success"].astype(bool)
    confusion = {v: {"success": int(((verdict == v) & success).sum()), "failure": int(((verdict == v) & ~success).sum())}
                 for v in VERDICTS}
    go = confusion["go"]
    n_go = go["success"] + go["failure"]
    failures = int((~success).sum())
    caught = confusion["no-go"]["failure"]
    return ScreenCheck(kind, confusion,
                       go["success"] / n_go if n_go else math.nan,
                       wilson_interval(go["success"], n_go) if n_go else (math.nan, math.nan),
                       caught / failures if failures else math.nan,
                       wilson_interval(caught, failures) if failures else (math.nan, math.nan),
                       int(ok.sum()), int(np.unique(scored.loc[ok, "seed"]).size),
                       lambda2 if kind == "plain" else None)
