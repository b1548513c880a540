"""Transfer evaluation (eq. 8): θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ, scored on the target test split.

:func:`evaluate_pair` is the one place a (source, target, λ1, λ2) is scored: ``diag
transfer``, the study's pair table and the notebooks all call it. Its rows follow Table 1 of
the paper (zero-shot θ_base, θ_ftˢ, θ_ft*ˢ, θ_ftᵀ, the proposed model, θ_ft*ᵀ as upper
bound), followed by controls that separate transferred domain knowledge from a generic prior:

* ``control: random τ (τ*ˢ norms)``: a Gaussian vector with τ*ˢ's per-tensor norms added with
  the same λ2, averaged over :data:`~diag.constants.RANDOM_DRAWS` draws (``spread`` holds the
  standard deviation of every metric over the draws);
* ``control: τ* of other source``: τ* of another domain, as is, and rescaled to ‖τ*ˢ‖;
* the data-free "always the mean φ map" explanations of the source (and of the target, an
  oracle prior).

Seeding is one rule (:func:`pair_seed`): every random choice of a pair is seeded by a stable
hash of (seed, source, target, purpose), so the same pair and seed give the same rows
whichever command computes them and in whatever order. The seed is the workspace's training
seed (:class:`~diag.runtime.context.Workspace`): one number picks the vectors, φ and the controls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace


from diag.constants import (DEFAULT_MAX_ACC_DROP, PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2, PAPER_TABLE1,
                            RANDOM_DRAWS)
from diag.runtime.context import TargetSet, Workspace
from diag.transfer.eq8 import evaluate_state, mean_scores, pair_seed, other_source, transferred_state
from diag.transfer.metrics import METRICS, paired_corr_difference, PairedDifference, Scores, score
from diag.transfer.methods import MATCHED_METHODS, MIX_METHODS, RANKED_METHODS
from diag.transfer.select import method_mixes, select_repair
from train.errors import DataError
from train.vectors import TaskVector, check_scale

CONTROL_RANDOM = "control: random τ (τ*ˢ norms)"
CONTROL_OTHER = "control: τ* of other source"
CONTROL_OTHER_RESCALED = "control: τ* of other source (‖τ*ˢ‖)"
CONTROL_MEAN_S = "control: mean φ map (source)"
CONTROL_MEAN_T = "oracle: mean φ map (target)"
#: beside a curvature-aware method's "proposed" row: plain eq. 8 at the same λ2 (the methods' reference)
PLAIN_ROW = "plain eq. 8 (same λ2)"
#: Row label → column suffix of the study table ("" = the proposed model).
ROW_SUFFIX = {
    "zero-shot θ_base": "zeroshot", "θ_ftˢ": "ft_source_on_target", "θ_ft*ˢ": "ftx_source_on_target",
    "θ_ftᵀ": "ft_target", "proposed": "", "θ_ft*ᵀ (upper bound)": "ftx_target",
    CONTROL_RANDOM: "random", CONTROL_OTHER: "other", CONTROL_OTHER_RESCALED: "other_rescaled",
    CONTROL_MEAN_S: "meanmap", CONTROL_MEAN_T: "meanmap_target", PLAIN_ROW: "plain",
}


# ------------------------------------------------------------------------------- results


@dataclass
class TransferResult:
    """A Table-1-style comparison for one (source, target, λ1, λ2) of one run (α, seed, variant).

    Attributes:
        seed: training seed of every vector and φ, and the seed of the controls.
        variant: variant of θ_ft* and τ* (:data:`train.store.VARIANTS`).
        rows: :class:`~diag.transfer.metrics.Scores` per model row (see :data:`ROW_SUFFIX`).
        spread: row label → ``<metric>_sd`` over the random control's draws.
        other_source: the domain of the "τ* of other source" control (None without controls).
        n_random: draws of the random control.
    """

    source: str
    target: str
    lambda1: float
    lambda2: float
    alpha: float
    seed: int = 0
    variant: str = "paper"
    rows: list[Scores] = field(default_factory=list)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    other_source: str | None = None
    n_random: int = 0
    method: str = "plain"
    repair: dict = field(default_factory=dict)

    def row(self, model: str) -> Scores:
        for r in self.rows:
            if r.model == model:
                return r
        raise KeyError(model)

    def verdicts(self) -> list[str]:
        """Plain statements on whether the transfer beats the controls."""
        names = {r.model for r in self.rows}
        prop, ft_t = self.row("proposed"), self.row("θ_ftᵀ")
        out = [f"E-RMSE {prop.ermse:.3f} vs θ_ftᵀ {ft_t.ermse:.3f}; accuracy kept "
               f"{prop.accuracy / max(ft_t.accuracy, 1e-12):.1%} of θ_ftᵀ",
               f"image-specific correlation ρ̄ {prop.corr_img:+.3f} ± {prop.corr_img_se:.3f} vs θ_ftᵀ "
               f"{ft_t.corr_img:+.3f} (chance and any fixed prior 0; "
               + ("its 95% CI excludes 0)" if abs(prop.corr_img) > 1.96 * prop.corr_img_se else
                  "its 95% CI includes 0: no image-specific signal shown)")]
        for label, diff in self.paired().items():
            name = "τ* of another source at ‖τ*ˢ‖" if label == CONTROL_OTHER_RESCALED else label
            if diff is not None:
                lo, hi = diff.ci95()
                verdict = "higher" if lo > 0 else "lower" if hi < 0 else "not different (95% CI includes 0)"
                out.append(f"ρ̄ paired over {diff.n} images, proposed − {name}: {diff.mean:+.3f} ± {diff.se:.3f}: "
                           f"{verdict}")
        for ctrl in (CONTROL_RANDOM, CONTROL_MEAN_S, CONTROL_OTHER, CONTROL_OTHER_RESCALED):
            if ctrl in names:
                c = self.row(ctrl)
                verb = "beats" if prop.ermse < c.ermse else "does NOT beat"
                out.append(f"proposed {verb} '{ctrl}' on E-RMSE ({prop.ermse:.3f} vs {c.ermse:.3f})")
        if PLAIN_ROW in names:
            out += self._method_verdicts(prop, ft_t, self.row(PLAIN_ROW))
        return out

    def _method_verdicts(self, prop: Scores, ft_t: Scores, plain: Scores) -> list[str]:
        """The method study's statements: accuracy kept and E-RMSE reduction kept, against plain eq. 8."""
        gain_plain, gain = ft_t.ermse - plain.ermse, ft_t.ermse - prop.ermse
        kept = f"{gain / gain_plain:.0%}" if gain_plain > 0 else "n/a (plain eq. 8 does not reduce E-RMSE)"
        r = self.repair
        return [f"method '{self.method}' ({r.get('param')}, scale {r.get('scale', float('nan')):.3g}; chosen on the "
                f"target's val split): accuracy kept {prop.accuracy / max(ft_t.accuracy, 1e-12):.1%} of θ_ftᵀ "
                f"(plain {plain.accuracy / max(ft_t.accuracy, 1e-12):.1%}); E-RMSE reduction kept {kept} of plain's",
                (f"predicted loss increase ½λ²R = {r['predicted_loss_increase']:.3g} ({r.get('risk_source')})"
                 if r.get("predicted_loss_increase") is not None else "no curvature given: ½λ²R not predicted")
                + f"; measured test accuracy change {prop.accuracy - ft_t.accuracy:+.3f}"]

    def to_dict(self) -> dict:
        return {"source": self.source, "target": self.target, "lambda1": self.lambda1, "lambda2": self.lambda2,
                "alpha": self.alpha, "seed": self.seed, "variant": self.variant, "other_source": self.other_source,
                "n_random": self.n_random, "rows": [r.to_dict() for r in self.rows],
                "spread": self.spread, "verdicts": self.verdicts(),
                **({"method": self.method, "repair": self.repair} if self.method != "plain" else {})}

    def to_row(self) -> dict:
        """The study-table columns of this result: ``<metric><_suffix>`` per row, plus spreads."""
        out: dict = {"source": self.source, "target": self.target, "alpha": float(self.alpha),
                     "lambda1": float(self.lambda1), "lambda2": float(self.lambda2), "seed": int(self.seed),
               "variant": self.variant,
                     "other_source": self.other_source, "n_random": int(self.n_random)}
        for r in self.rows:
            suffix = ROW_SUFFIX[r.model]
            out.update({(f"{m}_{suffix}" if suffix else m): float(getattr(r, m)) for m in METRICS})
        for label, sds in self.spread.items():
            out.update({f"{k.removesuffix('_sd')}_{ROW_SUFFIX[label]}_sd": v for k, v in sds.items()})
        out.update(self.paired_columns())
        if self.method != "plain":  # plain rows keep the study table's schema unchanged
            out["method"] = self.method
            out["repair_choice"] = str(self.repair.get("param"))
            out.update({f"repair_{k}": float(v) for k, v in self.repair.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
            out["repair_safe"] = float(bool(self.repair.get("safe")))
        return out

    def paired(self) -> dict[str, PairedDifference]:
        """Row label → the paired per-image ρ̄ difference of the proposed model against it, for τ* of
        another source at ‖τ*ˢ‖ and θ_ftᵀ (rows present with per-image values only)."""
        names = {r.model for r in self.rows}
        if "proposed" not in names:
            return {}
        out = {}
        for label in (CONTROL_OTHER_RESCALED, "θ_ftᵀ"):
            diff = paired_corr_difference(self.row("proposed"), self.row(label)) if label in names else None
            if diff is not None:
                out[label] = diff
        return out

    def paired_columns(self) -> dict[str, float]:
        """Study-table columns ``corr_img_vs_<row suffix>`` and ``…_se`` of :meth:`paired`."""
        out = {}
        for label, diff in self.paired().items():
            out[f"corr_img_vs_{ROW_SUFFIX[label]}"] = diff.mean
            out[f"corr_img_vs_{ROW_SUFFIX[label]}_se"] = diff.se
        return out

    def table(self) -> str:
        ks = self.rows[0].ks if self.rows else (1, 5, 10)
        head = (f"{'model':38s} {'acc':>6s} {'E-RMSE':>7s} {'img':>6s} {'ρ̄':>6s} {'kendall':>8s} "
                f"{'IoU@' + str(ks[0]):>7s} {'IoU@' + str(ks[1]):>7s} {'IoU@' + str(ks[2]):>7s}   paper acc/E-RMSE")
        lines = [f"transfer {self.source} → {self.target}  (λ1={self.lambda1:g}, λ2={self.lambda2:g}, α={self.alpha:g}, "
                 f"seed {self.seed}, variant {self.variant}; "
                 f"IoU@K with K={ks}; the paper's K=1/5/10 at M=49 scaled to this grid)", head, "-" * len(head)]
        for r in self.rows:
            ref = PAPER_TABLE1.get(r.model)
            ref_s = f"   {ref[0]:.3f} / {ref[1]:.3f}" if ref else ""
            sd = self.spread.get(r.model)
            sd_s = f"   (± {sd['ermse_sd']:.3f} E-RMSE sd over {self.n_random} draws)" if sd else ""
            lines.append(f"{r.model:38s} {r.accuracy:6.3f} {r.ermse:7.3f} {r.ermse_img:6.3f} {r.corr_img:+6.3f} "
                         f"{r.kendall:8.3f} "
                         f"{r.iou1:7.3f} {r.iou5:7.3f} {r.iou10:7.3f}{ref_s}{sd_s}")
        lines.append("E-RMSE is per patch: unrelated z-scored maps score √2 ≈ 1.414. 'img': image-specific E-RMSE "
                     "(maps minus their mean map; a fixed prior scores 1); ρ̄: mean per-image correlation of those "
                     "centred maps (chance and a fixed prior 0). Paper: ViT-B/32, mean of 10 targets.")
        lines += [f"- {v}" for v in self.verdicts()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- evaluate_pair


def _reference_rows(ws: Workspace, tset: TargetSet, source: str, target: str) -> list[Scores]:
    """θ_base, θ_ftˢ, θ_ft*ˢ, θ_ftᵀ (and θ_ft*ᵀ when the store has it) on the target test set."""
    rows = [evaluate_state(ws, tset, ws.base, "zero-shot θ_base"),
            evaluate_state(ws, tset, ws.state(ws.vector(source, "ft")), "θ_ftˢ"),
            evaluate_state(ws, tset, ws.state(ws.vector(source, "ftx")), "θ_ft*ˢ"),
            evaluate_state(ws, tset, ws.state(ws.vector(target, "ft")), "θ_ftᵀ")]
    if ws.has(target, "ftx"):
        rows.append(evaluate_state(ws, tset, ws.state(ws.vector(target, "ftx")), "θ_ft*ᵀ (upper bound)"))
    return rows


def _mean_map_rows(ws: Workspace, tset: TargetSet, source: str, target: str, ft_accuracy: float) -> list[Scores]:
    """The data-free mean-φ-map predictions of the source (control) and of the target (oracle).

    Both maps are of the workspace's seed; the image-specific E-RMSE of a constant map is 1.
    """
    rows = []
    for name, domain in ((CONTROL_MEAN_S, source), (CONTROL_MEAN_T, target)):
        mean_map = ws.mean_map(domain)
        if mean_map.shape[0] != tset.phi.shape[1]:
            raise DataError(f"the mean φ map of '{domain}' has {mean_map.shape[0]} patches, the target "
                            f"'{target}' {tset.phi.shape[1]}: the two come from different grids")
        # pred_mean = the map itself: its centred map is exactly 0, so its image-specific E-RMSE is 1
        rows.append(score(name, None, tset.y, mean_map.expand_as(tset.phi), tset.phi, accuracy=ft_accuracy,
                          true_mean=ws.mean_map(target), pred_mean=mean_map))
    return rows


def _random_vectors(ws: Workspace, source: str, target: str, n: int) -> list[TaskVector]:
    """``n`` Gaussian vectors with τ*ˢ's per-tensor norms, draw k seeded by ``pair_seed(ws.seed, …, "random{k}")``."""
    star, seed = ws.vector(source, "star"), ws.seed
    return [ws.cached(("random", source, target, k, *ws.run),
                      lambda k=k: star.random_like(pair_seed(seed, source, target, f"random{k}"))) for k in range(n)]


def evaluate_pair(ws: Workspace, source: str, target: str, lambda1: float = PAPER_LAMBDA1,
                  lambda2s: Sequence[float] = (PAPER_LAMBDA2,), controls: bool = True,
                  candidates: Sequence[str] = (), n_random: int = RANDOM_DRAWS, method: str = "plain",
                  curvature=None, max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
                  gains: Mapping[str, float] | None = None) -> list[TransferResult]:
    """Every Table-1 row, the proposed model and the controls of one pair, for each λ2, of ``ws``'s run.

    With a curvature-aware ``method`` (:mod:`diag.transfer.repair`) the "proposed" row is that method's
    vector, its hyper-parameter chosen on the target's ``val`` split only
    (:func:`diag.transfer.select.select_repair`), and plain eq. 8 at the same λ2 is scored beside
    it (:data:`PLAIN_ROW`); the controls stay those of τ*ˢ.

    Args:
        ws: the workspace of the store (θ_base, vectors, image sets) for one (α, seed, variant):
            every vector and φ is that seed's, and the controls are seeded by :func:`pair_seed`
            of (``ws.seed``, S, T).
        source, target: S and T (S ≠ T).
        lambda1: scale of τ_ftᵀ; lambda2s: scales of τ*ˢ (one result each).
        controls: add the random, other-source and mean-map rows.
        candidates: domains the "other source" is drawn from (S and T excluded); none → no such row.
        n_random: draws of the random control (≥ 2 for a spread).
        method: ``plain`` (eq. 8) or one of ``project``, ``precondition``, ``blocks``, ``mix``, ``mix-ranked``,
            ``mix-matched``.
        curvature: the target's curvature (needed by ``project``, ``precondition``, ``blocks``).
        max_acc_drop: val-accuracy budget of the method's choice.
        gains: ``mix-ranked``: the ranker's predicted gain per source for ``target``
            (:func:`diag.decide.recommend.ranker_gains`).

    Returns:
        One :class:`TransferResult` per λ2, in the order given.

    Raises:
        DataError: S = T, or mean maps of different patch grids.
        ArtifactError / BaseMismatchError: missing, damaged or foreign artifacts.
    """
    lambda1 = check_scale("lambda1", lambda1)
    lambda2s = [check_scale("lambda2", v) for v in lambda2s]
    if source == target:
        raise DataError(f"source and target are both '{source}'")
    tset = ws.target_set(target, "test")
    fixed = _reference_rows(ws, tset, source, target)
    ft_acc = next(r.accuracy for r in fixed if r.model == "θ_ftᵀ")
    other = other_source(ws.seed, source, target, [d for d in candidates if ws.has(d, "star")]) if controls else None
    if controls:
        fixed += _mean_map_rows(ws, tset, source, target, ft_acc)
    ft_t, star_s = ws.vector(target, "ft"), ws.vector(source, "star")
    results = []
    for lam in lambda2s:
        res = TransferResult(source, target, lambda1, lam, ws.alpha, ws.seed, ws.variant, other_source=other)
        plain = transferred_state(ws, ft_t, star_s, lambda1, lam)
        res.rows = fixed[:4] + [evaluate_state(ws, tset, plain, "proposed")] + fixed[4:]
        if controls:
            _add_controls(ws, res, tset, ft_t, star_s, n_random)
        results.append(res)
    if method != "plain":
        results = [with_method(ws, r, method, curvature, candidates, max_acc_drop, gains) for r in results]
    return results


def with_method(ws: Workspace, plain: TransferResult, method: str, curvature=None, candidates: Sequence[str] = (),
                max_acc_drop: float = DEFAULT_MAX_ACC_DROP, gains: Mapping[str, float] | None = None) -> TransferResult:
    """``plain`` (eq. 8's result of a pair at one λ2) with a curvature-aware ``method``'s vector as "proposed".

    Only the method's own vector is scored (its choice on the target's ``val`` split, then one
    pass over the test set); every other row — the references and the controls of τ*ˢ — is
    ``plain``'s, and plain's proposed row becomes :data:`PLAIN_ROW`. A ``mix`` does not
    depend on the source: its choice and scores are computed once per (target, λ2, run) and shared
    (``mix-ranked``: per gains too; ``mix-matched``: per source, whose ‖τ*ˢ‖ sets its step).
    """
    lam, l1, target = plain.lambda2, plain.lambda1, plain.target

    def make():
        state, summary = _repaired(ws, target, ws.vector(plain.source, "star"), method, curvature,
                                   l1, lam, candidates, max_acc_drop, gains)
        return evaluate_state(ws, ws.target_set(target, "test"), state, "proposed"), summary
    if method in MIX_METHODS:
        pool = tuple(sorted(d for d in candidates if d != target))
        how = tuple(sorted((gains or {}).items())) if method in RANKED_METHODS else ()
        how += (plain.source,) if method in MATCHED_METHODS else ()
        prop, summary = ws.cached(("repair-" + method, target, lam, l1, max_acc_drop, pool, how, *ws.run), make)
    else:
        prop, summary = make()
    rows = []
    for r in plain.rows:
        rows += [prop, replace(r, model=PLAIN_ROW)] if r.model == "proposed" else [r]
    return replace(plain, rows=rows, spread=dict(plain.spread), method=method, repair=dict(summary))


def _repaired(ws: Workspace, target: str, star_s: TaskVector, method: str, curvature,
              lambda1: float, lambda2: float, candidates: Sequence[str], max_acc_drop: float, gains=None):
    """(θ of the chosen repaired vector, summary) — every choice on the target's val split."""
    mixes = None  # an unknown method is refused by select_repair's candidates()
    if method in MIX_METHODS:
        pool = [d for d in candidates if d != target and ws.has(d, "star")]
        if not pool:
            raise DataError(f"method '{method}' needs other domains with θ_ft* (pass --domains)")
        mixes = method_mixes(method, ws, target, pool, gains)
    choice = select_repair(ws, target, star_s, method, curvature, lambda1, lambda2, mixes=mixes,
                           max_acc_drop=max_acc_drop)
    return (transferred_state(ws, ws.vector(target, "ft"), choice.candidate.vector, lambda1, choice.candidate.scale),
            choice.summary())


def _add_controls(ws: Workspace, res: TransferResult, tset: TargetSet, ft_t: TaskVector, star_s: TaskVector,
                  n_random: int) -> None:
    """Random-direction control (mean and sd over draws) and the other source's τ* (as is and rescaled)."""
    lam, l1 = res.lambda2, res.lambda1
    draws = [evaluate_state(ws, tset, transferred_state(ws, ft_t, r, l1, lam), CONTROL_RANDOM)
             for r in _random_vectors(ws, res.source, res.target, n_random)]
    mean, spread = mean_scores(CONTROL_RANDOM, draws)
    res.rows.append(mean)
    res.spread[CONTROL_RANDOM] = spread
    res.n_random = n_random
    if res.other_source is not None:
        star_o = ws.vector(res.other_source, "star")
        res.rows.append(evaluate_state(ws, tset, transferred_state(ws, ft_t, star_o, l1, lam), CONTROL_OTHER))
        rescale = star_s.norm() / star_o.norm()
        res.rows.append(evaluate_state(ws, tset, transferred_state(ws, ft_t, rescale * star_o, l1, lam),
                                       CONTROL_OTHER_RESCALED))


def transfer(store_or_ws, source: str, target: str, lambda1: float = PAPER_LAMBDA1,
             lambda2: float = PAPER_LAMBDA2, alpha: float | None = None, controls: bool = True,
             seed: int | None = None, data=None, candidates: Sequence[str] = (),
             variant: str | None = None, method: str = "plain", curvature=None,
             max_acc_drop: float = DEFAULT_MAX_ACC_DROP, gains: Mapping[str, float] | None = None) -> TransferResult:
    """:func:`evaluate_pair` at one λ2 for the run (α, seed, variant), with a transfer ``method``.

    A store is wrapped in a :class:`Workspace` (defaults α = 0.8, seed 0, ``paper``); a
    workspace is used for the run given (``None`` keeps the workspace's).
    """
    if isinstance(store_or_ws, Workspace):
        ws = store_or_ws.for_run(alpha=alpha, seed=seed, variant=variant)
    else:
        ws = Workspace(store_or_ws, PAPER_ALPHA if alpha is None else alpha, {target: data} if data else None,
                       seed=seed or 0, variant=variant or "paper")
    return evaluate_pair(ws, source, target, lambda1, (lambda2,), controls, candidates, method=method,
                         curvature=curvature, max_acc_drop=max_acc_drop, gains=gains)[0]
