"""Choosing an explainability vector for a target, by data-access tier, and the pre-deployment screen.

Tiers (what the target owner gives us):

* tier 0 — weights only: θ_ftᵀ (the prediction-only model), hence cos(τ_ftˢ, τ_ftᵀ) globally
  and per block, and norms;
* tier 1 — a published Hessian card of the target: adds card-R and diag-R;
* tier 2 — target images with labels (never target explanations): adds exact R and a quick
  labelled accuracy check of the transferred model over a λ2 grid.

One predictor per quantity, fitted on known pairs of the suite (never pairs that involve the
target, neither as target nor as source), turns the diagnostics into the predicted E-RMSE ÷
θ_ftᵀ's and accuracy drop, each with a jackknife+ interval over held-out targets
(:mod:`diag.decide.predictor`); :func:`diag.decide.evaluation.evaluate_rankers` measures its ranking and
:func:`diag.decide.evaluation.loto_coverage` its intervals, leave-one-target-out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diag.constants import DEFAULT_MAX_ACC_DROP, PAPER_LAMBDA1, PAPER_LAMBDA2, PREDICTION_LEVEL
from diag.decide import record, recommend
from diag.decide.predictor import QUANTITIES, RANKER, fit_pair_predictor, rank_sources, tier_features
from diag.decide.record import MIN_TRAINING_PAIRS, distinct_pairs, training_pairs
from diag.decide.rules import lambda2_from_predicted_drop
from diag.features.pair_features import Diagnostics, pair_features
from diag.transfer.budget import accuracy_grid, drop_at, recommend_lambda2
from train.errors import ArtifactError, DataError

TIER_NAMES = {0: "tier 0 (weights only)", 1: "tier 1 (published Hessian card)", 2: "tier 2 (labelled target images)"}
#: Features that need the target's explanation labels: never an input of a ranking.
NOT_RANKING_INPUTS = ("cos_star",)
#: The predicted quantities of a ranking row, each with its interval: ``predicted_<q>`` and ``_lo``/``_hi``.
PREDICTED = ("ermse_norm", "acc_drop", "gain")


def _val(v):
    """A float for JSON: NaN, ±∞ and None as None."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def prediction_fields(row, predictable: dict[str, bool] | None = None) -> dict:
    """The predictions of one ranking row as reported everywhere (``rank-sources`` JSON and table, ``screen``).

    ``predicted_<q>`` and ``predicted_<q>_interval`` = [lo, hi] for q in :data:`PREDICTED` (None: not
    available, or an unbounded side). A quantity ``predictable`` marks False gets None: the training
    mean stands for every source and is reported once (:meth:`SourceRanking.headline`).
    """
    out = {}
    for q in PREDICTED:
        shown = (predictable or {}).get(q, True)
        out[f"predicted_{q}"] = _val(row.get(f"predicted_{q}")) if shown else None
        out[f"predicted_{q}_interval"] = ([_val(row.get(f"predicted_{q}_lo")), _val(row.get(f"predicted_{q}_hi"))]
                                          if shown else None)
    return out


def _interval_text(lo, hi, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return "[" + ", ".join("—" if v is None else format(v, f) for v in (lo, hi)) + "]"


@dataclass
class SourceRanking:
    """Ranked candidate sources for one target."""
    target: str
    tier: int
    max_acc_drop: float
    rows: pd.DataFrame
    n_training_pairs: int
    notes: list[str] = field(default_factory=list)
    #: Multi-source candidates beside the sources (:func:`diag.decide.recommend.recommend_mixes`), empty if none.
    mixes: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: Level of every interval (jackknife+ over held-out targets).
    level: float = PREDICTION_LEVEL
    #: Per predicted quantity (:meth:`diag.decide.predictor.PairPredictor.summary`); empty: no predictor (proxy).
    predictions: dict = field(default_factory=dict)

    def _predictable(self) -> dict[str, bool]:
        """Per quantity, whether each source gets its own number (the gain always does: it scales with the size)."""
        return {q: bool(d.get("predictable", True)) for q, d in self.predictions.items()}

    def headline(self) -> list[str]:
        """The lines above the table: a quantity replaced by its training mean; no gain interval above zero."""
        lines = []
        for q, d in self._predictions_shown().items():
            if "training_mean" in d:
                what = "the sources' record" if d.get("requested") == "record" else "the features"
                lines.append(f"{QUANTITIES[q]} is not predictable from {what} (leave-one-out R² = "
                             f"{d['loto_r2']:.3g} ≤ 0): training mean {d['training_mean']:.3f} "
                             f"{_interval_text(*d['training_mean_interval'])} ({self.level:.0%}) for every source")
        if self.no_source_beyond_noise():
            lines.append(f"no source is predicted to help beyond noise: no source's {self.level:.0%} gain interval "
                         "lies above 0")
        return lines

    def _predictions_shown(self) -> dict:
        """:attr:`predictions`; an unpredictable quantity adds its ``training_mean`` and ``training_mean_interval``."""
        first = self.rows.iloc[0] if len(self.rows) else {}
        return {q: d if d.get("predictable", True) else {
            **d, "training_mean": _val(first.get(f"predicted_{q}")),
            "training_mean_interval": [_val(first.get(f"predicted_{q}_{b}")) for b in ("lo", "hi")]}
            for q, d in self.predictions.items()}

    def no_source_beyond_noise(self) -> bool | None:
        """True when no safe source's gain interval lies above 0 (None: a ranking without gain intervals)."""
        if "predicted_gain_lo" not in self.rows.columns:
            return None
        safe = self.rows["safe"].astype(bool) if "safe" in self.rows.columns else True
        lo = pd.to_numeric(self.rows["predicted_gain_lo"], errors="coerce").fillna(-math.inf)
        return not bool(((lo > 0) & safe).any())

    def to_dict(self) -> dict:
        """The ranking as plain values: one dict per source (NaN as None; risks beyond the tier as None)."""
        val = _val
        shown = self._predictable()
        sources = []
        for _, r in self.rows.iterrows():
            sources.append({
                "source": r["source"], "rank": int(r["rank"]), "cos_ft": val(r.get("cos_ft")),
                "risk_diag": val(r.get("risk_diag")) if self.tier >= 1 else None,
                "risk_card": val(r.get("risk_card")) if self.tier >= 1 else None,
                "risk_card_calibrated": val(r.get("risk_card_calibrated")) if self.tier >= 1 else None,
                "risk_exact": val(r.get("risk_exact")) if self.tier >= 2 else None,
                **prediction_fields(r, shown),
                "measured_acc_drop": val(r.get("measured_acc_drop")),
                "measured_acc_drop_se": val(r.get("measured_acc_drop_se")),
                "grad_dot_tau": val(r.get("grad_dot_tau")) if self.tier >= 1 else None,
                "lambda2": val(r.get("lambda2")),
                "method": r.get("method"), "method_param": r.get("method_param"),
                "method_scale": val(r.get("method_scale")), "method_acc_drop": val(r.get("method_acc_drop")),
                "drop_measured": None if r.get("drop_measured") is None else bool(r.get("drop_measured")),
                "method_acc_drop_se": val(r.get("method_acc_drop_se")), "method_n_val": val(r.get("method_n_val")),
                "safe": None if r.get("safe") is None else bool(r.get("safe")),
            })
        mixes = []
        for r in self.mixes.to_dict(orient="records"):
            m = {k: (val(v) if isinstance(v, float) else v) for k, v in r.items() if not k.startswith("predicted_gain")}
            mixes.append({**m, **{k: v for k, v in prediction_fields(r).items() if k.startswith("predicted_gain")}})
        return {"target": self.target, "tier": self.tier, "tier_name": TIER_NAMES[self.tier],
                "max_acc_drop": self.max_acc_drop, "n_training_pairs": self.n_training_pairs, "level": self.level,
                "predictions": self._predictions_shown(), "no_source_beyond_noise": self.no_source_beyond_noise(),
                "headline": self.headline(), "sources": sources, "mixes": mixes, "notes": self.notes}

    def to_json(self) -> str:
        """Everything needed to rebuild this ranking (rows as records; NaN and ±∞ as null)."""
        def records(df):
            df = df.replace([math.inf, -math.inf], math.nan)
            return df.astype(object).where(df.notna(), None).to_dict(orient="records")

        return json.dumps({"target": self.target, "tier": self.tier, "max_acc_drop": self.max_acc_drop,
                           "n_training_pairs": self.n_training_pairs, "notes": self.notes, "level": self.level,
                           "predictions": self.predictions, "columns": list(self.rows.columns),
                           "rows": records(self.rows), "mix_columns": list(self.mixes.columns),
                           "mixes": records(self.mixes)}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, path: Path) -> "SourceRanking":
        try:
            d = json.loads(text)
            if int(d["tier"]) not in TIER_NAMES:
                raise ValueError(f"tier {d['tier']!r} is none of {sorted(TIER_NAMES)}")
            rows = pd.DataFrame(d["rows"], columns=d["columns"]).fillna(math.nan)
            mixes = pd.DataFrame(d.get("mixes", []), columns=d.get("mix_columns", [])).fillna(math.nan)
            return cls(d["target"], int(d["tier"]), float(d["max_acc_drop"]), rows, int(d["n_training_pairs"]),
                       list(d["notes"]), mixes, float(d["level"]), dict(d["predictions"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"cached ranking {path} is damaged ({exc}); delete it to recompute") from None

    def table(self) -> str:
        """The ranking as text: the headline, one line per source, the multi-source candidates, then the notes."""
        lines = [f"Sources for target '{self.target}' — {TIER_NAMES[self.tier]}; predictor fitted on "
                 f"{self.n_training_pairs} known pairs without '{self.target}'; budget: accuracy drop ≤ "
                 f"{self.max_acc_drop:.0%} of θ_ftᵀ; intervals {self.level:.0%}"]
        lines += [f"* {h}" for h in self.headline()] + [""]
        head = (f"{'rank':>4s}  {'source':12s} {'cos_ft':>7s} {'R_card':>9s} {'R_exact':>9s} {'pred E-RMSE÷θ_ftᵀ':>24s} "
                f"{'λ2 eq.8':>7s}  {'recommended (method, knob, scale)':34s} {'Δacc':>6s} {'pred gain [interval]':>27s}")
        lines += [head, "-" * len(head)]

        def fmt(v, w, p=3):
            return f"{'—':>{w}s}" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{w}.{p}g}"

        for s in self.to_dict()["sources"]:
            if s.get("method") is None:  # no recommendation (the cos proxy of an open-world ranking)
                rec, gain = "", ""
            elif not s["safe"]:
                rec, gain = "no safe transfer", "—"
            else:
                rec = f"{s['method']}, {s['method_param']}, {s['method_scale']:.3g}"
                gain = _gain_text(s)
            ratio = ("—" if s["predicted_ermse_norm"] is None
                     else f"{s['predicted_ermse_norm']:.3f} {_interval_text(*s['predicted_ermse_norm_interval'])}")
            drop = fmt(-s["method_acc_drop"] if s.get("method_acc_drop") is not None else None, 6, 2)
            lines.append(f"{s['rank']:4d}  {s['source']:12s} {fmt(s['cos_ft'], 7)} {fmt(s['risk_card'], 9)} "
                         f"{fmt(s['risk_exact'], 9)} {ratio:>24s} "
                         + ("   none" if s["lambda2"] == 0 else fmt(s["lambda2"], 7, 2))
                         + f"  {rec:34s} {drop} {gain:>27s}")
        lines += self._mix_lines()
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def _mix_lines(self) -> list[str]:
        """The multi-source candidates beside the top single source (same columns as the sources)."""
        if self.mixes.empty:
            return []
        out = ["", "multi-source candidates (never the target's τ*; weights from this ranking's predicted gains):"]
        for m in self.to_dict()["mixes"]:
            rec = (f"{m['method']}, {m['method_param']}, {m['method_scale']:.3g}" if m["safe"]
                   else f"no safe transfer ({m['method_param']})")
            gain = _gain_text(m) if m["safe"] else "—"
            drop = "—" if m["method_acc_drop"] is None else f"{-m['method_acc_drop']:.2g}"
            out.append(f"      {m['candidate']:14s} {rec:40s} Δacc {drop:>6s}  gain {gain:>27s}   weights "
                       f"{m['weights'] or '—'}")
        top = self.to_dict()["sources"][0]
        if top["safe"]:
            out.append(f"      top single source {top['source']}: gain {_gain_text(top)}")
        return out


def _gain_text(d: dict) -> str:
    """``+0.008 [-0.031, +0.047]`` from :func:`prediction_fields`' gain."""
    return f"{d['predicted_gain']:+.3f} {_interval_text(*d['predicted_gain_interval'], signed=True)}"


def _source_quality(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("ermse_star_source", "accuracy_ft_source") if c in table.columns]
    return table.groupby("source")[cols].mean() if cols else pd.DataFrame()


def candidate_rows(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int) -> pd.DataFrame:
    """Features of every (source, target) candidate at ``tier`` (:func:`diag.features.pair_features.pair_features`).

    The same function computes the study's feature columns; ``cos_star`` (target explanation
    labels) is dropped, and each source's own quality comes from the known pairs' table.
    """
    quality = _source_quality(table)
    rows = []
    for source in sources:
        feats = pair_features(diag, source, target, curvature=tier >= 1, exact=tier >= 2)
        row = {"source": source, "target": target, **feats.values}
        for name in NOT_RANKING_INPUTS:
            row.pop(name, None)
        if source in quality.index:
            row.update(quality.loc[source].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def rank_for_target(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int,
                    max_acc_drop: float = DEFAULT_MAX_ACC_DROP, model: str = RANKER,
                    accuracy_check: bool | None = None, lambda1: float = PAPER_LAMBDA1,
                    methods: Sequence[str] | None = None, level: float = PREDICTION_LEVEL,
                    known: pd.DataFrame | None = None) -> SourceRanking:
    """Rank candidate sources for ``target`` by the explanation gain predicted at each one's recommendation.

    One predictor per quantity, fitted on pairs without the target
    (:func:`diag.decide.predictor.fit_pair_predictor`), predicts each source's E-RMSE ÷ θ_ftᵀ's and
    accuracy drop at λ2 = 0.7, each with its jackknife+ interval at ``level``. Per source,
    :mod:`diag.decide.recommend` picks the method and scale the tier allows (``methods`` restricts
    them) that transfer the most within the accuracy budget — measured on the target's ``val``
    split with the tier-2 accuracy check, else predicted by the quadratic model; sources are ranked
    by the gain predicted at that recommendation (its interval: the E-RMSE ratio's, mapped through
    the gain), and a source with no safe recommendation is listed last as "no safe transfer".
    ``lambda2`` stays plain eq. 8's λ2. ``known``: the pairs the predictors are fitted on (default
    ``table``'s; e.g. the study at every training seed), never those that involve the target.

    ``accuracy_check`` (default: ``tier >= 2``) measures plain eq. 8's accuracy over the λ2 grid on
    the target's ``val`` images (:func:`diag.decide.rules.accuracy_grid`).

    Raises:
        DataError: no source, or fewer than :data:`diag.decide.record.MIN_TRAINING_PAIRS` known pairs
            without the target.
    """
    if not sources:
        raise DataError(f"No candidate source vectors for target '{target}'")
    train = training_pairs(table if known is None else known, target)
    n_known = distinct_pairs(train)
    if n_known < MIN_TRAINING_PAIRS:
        raise DataError(f"Only {n_known} known pairs without '{target}'; need at least {MIN_TRAINING_PAIRS} to fit "
                        "a predictor")
    cands = candidate_rows(diag, table, target, sources, tier)
    check = tier >= 2 if accuracy_check is None else accuracy_check
    grid = accuracy_grid(diag.ws, target, sources, lambda1) if check else None
    if grid is not None:
        cands["accuracy_val_ft_target"] = grid.attrs["accuracy_ft_target"]  # val, as in the study table
    features = [f for f in tier_features(train, tier) if f in cands.columns]
    notes = [f"features: {', '.join(features)}", record.record_note(train, sources)]
    if known is not None and "seed" in known:
        notes.append(f"predictors fitted on the known pairs at training seeds "
                     f"{', '.join(map(str, sorted(known['seed'].unique())))} ({len(train)} rows)")
    predictor = fit_pair_predictor(train, features, model=model, level=level)
    cands = rank_sources(cands, predictor)
    notes += predictor.notes()
    if grid is not None:
        per = {s: grid[grid["source"] == s] for s in sources}
        cands["lambda2"] = [recommend_lambda2(per[s], max_acc_drop) for s in cands["source"]]
        cands["measured_acc_drop"] = [drop_at(per[s], PAPER_LAMBDA2) for s in cands["source"]]
        cands["measured_acc_drop_se"] = [drop_at(per[s], PAPER_LAMBDA2, "acc_drop_se") for s in cands["source"]]
        cands["measured_n_val"] = [drop_at(per[s], PAPER_LAMBDA2, "n_val") for s in cands["source"]]
        notes.append("λ2 (plain eq. 8): largest grid value whose measured accuracy drop on labelled target val "
                     "images is within budget")
    else:
        cands["lambda2"] = [lambda2_from_predicted_drop(d, max_acc_drop) for d in cands["predicted_acc_drop"]]
        cands["measured_acc_drop"] = math.nan
        notes.append("λ2 (plain eq. 8): from the predicted drop at λ2 = 0.7 scaled by the quadratic model (drop ∝ λ2²)")
    cands, mixes = _recommend(diag, cands, target, tier, max_acc_drop, grid, lambda1, methods, notes)
    notes.append("E-RMSE is per patch; unrelated z-scored maps score √2 ≈ 1.414")
    return SourceRanking(target, tier, max_acc_drop, cands, len(train), notes, mixes, level, predictor.summary())


def _recommend(diag: Diagnostics, cands: pd.DataFrame, target: str, tier: int, budget: float, grid, lambda1: float,
               methods, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each source's recommendation (:mod:`diag.decide.recommend`), its predicted gain and interval, the ranking by that
    gain, and (two sources or more) the multi-source candidates beside them."""
    allowed = recommend.tier_methods(tier, methods)
    curv = None
    if tier >= 1 and len(allowed) > 1:
        full = diag.curvature(target, need_operator=tier >= 2 and "blocks" in allowed)
        curv = full if tier >= 2 else full.card  # tier 1: the card alone (what a target owner ships)
        if "project" in allowed and full.eig is None:  # the K-FAC card has no eigenvectors to project off
            allowed = tuple(m for m in allowed if m != "project")
            notes.append("project (off the top eigenvectors) not tried: it needs the eigenpair card (--card-form eig)")
    recs = []
    for _, r in cands.iterrows():
        s = r["source"]
        if grid is not None:
            rec = recommend.recommend_measured(diag.ws, target, s, grid[grid["source"] == s], budget, curv,
                                               allowed if curv is not None else ("plain",), lambda1)
        else:
            tau = diag.vector(s, "star")
            rec = recommend.recommend_predicted(float(r["predicted_acc_drop"]), budget, tau.norm(), curv, tau,
                                                allowed)
        gain, lo, hi = recommend.predicted_gain(float(r["predicted_ermse_norm"]), float(r["predicted_ermse_norm_lo"]),
                                                float(r["predicted_ermse_norm_hi"]), rec["size_ratio"], rec["safe"])
        recs.append({**rec, "predicted_gain": gain, "predicted_gain_lo": lo, "predicted_gain_hi": hi})
    cands = pd.concat([cands.reset_index(drop=True), pd.DataFrame(recs)], axis=1)
    # a source with no safe recommendation is listed last as "no safe transfer", never ranked above a safe one
    cands = cands.assign(_unsafe=~cands["safe"].astype(bool), _gain=-cands["predicted_gain"])
    cands = cands.sort_values(["_unsafe", "_gain", "rank"], kind="stable").drop(columns=["_unsafe", "_gain"])
    cands = cands.reset_index(drop=True)
    cands["rank"] = range(1, len(cands) + 1)
    how = "measured on the target's val split" if grid is not None else "predicted by the quadratic model"
    notes.append(f"methods tried per source ({TIER_NAMES[tier]}): {', '.join(allowed)}; drop {how}; the recommendation "
                 "transfers the largest size ⟨Δ, τ*ˢ⟩/‖τ*ˢ‖ within the budget")
    notes.append("ranked by the explanation gain predicted at the recommendation: (1 − predicted E-RMSE ÷ θ_ftᵀ at "
                 "λ2 = 0.7) × its size ÷ eq. 8's at 0.7, its interval the ratio's mapped alike; sources without a "
                 "safe recommendation last ('no safe transfer')")
    mixes = pd.DataFrame()
    if len(cands) >= 2:
        mixes = recommend.recommend_mixes(diag.ws, target, cands, budget, grid is not None,
                                          curv if tier >= 1 else None, lambda1)
    return cands, mixes
