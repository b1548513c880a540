"""``diag rank-sources`` and ``diag screen``: decisions before deploying an explainability vector."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from diag.commands.openworld import run_rank_folder
from diag.commands.options import (add_alpha_option, add_budget_option, add_common, add_curvature_options,
                                   add_domains_option, add_lambda_options, add_level_option, add_study_option,
                                   add_train_seed_option, add_variant_option, context_from, curvature_settings,
                                   domain_name, FRACTION, N_RESAMPLE)
from diag.commands.output import emit_json
from diag.constants import PAPER_LAMBDA2
from diag.decide.ceiling import ranking_ceiling
from diag.decide.evaluation import evaluate_rankers, loto_coverage
from diag.decide.screen_check import validate_screen
from diag.decide.cache import rank_cached
from diag.decide.predictor import RANKER
from diag.decide.ranking import rank_for_target
from diag.decide.recommend import TIER_METHODS
from diag.curvature.risk import loss_model
from diag.decide.rules import method_verdict, screen_verdict
from diag.stats.paired import UPPER_Z
from diag.features.pair_features import Diagnostics
from diag.study.parallel import complete_study
from diag.study.run import StudySettings
from diag.table import at_lambda, DEFAULT_STUDY, lam_key, load_study, merge_shards, of_method, select_run
from train.errors import TvdiagError
from train.losses import check_alpha
from train.vectors import check_scale


def _suite_options(p) -> None:
    add_domains_option(p, help="the suite of known domains the ranker learns from (default: the mini-suite + --data)")
    add_curvature_options(p, batch_size=False, n_images_help="target images of Hᵀ",
                          k_help="eigenpairs of the Hessian card", keep_probes=True)
    add_study_option(p, help="study folder of the known pairs, read only (default: the store's 'allpairs', run on "
                             "demand)")
    p.add_argument("--extend", action="store_true", help="compute missing pairs into --study instead of only reading it")


def register(sub) -> None:
    r = sub.add_parser("rank-sources", help="rank source explainability vectors for a target, by data-access tier")
    add_common(r)
    r.add_argument("--target", required=False, type=domain_name)
    r.add_argument("--tier", default="auto", choices=("auto", "0", "1", "2"),
                   help="0: weights only; 1: + the target's Hessian card; 2: + labelled target images (auto: highest available)")
    add_budget_option(r, help="accuracy-drop budget relative to θ_ftᵀ")
    add_alpha_option(r)
    r.add_argument("--model", default=None, choices=("ridge", "gbr", "record"),
                   help="the predictor of E-RMSE ÷ θ_ftᵀ's and of the accuracy drop: record (each source's effect on "
                        "the known pairs without the target, at every training seed the study holds; no feature of "
                        "the pair; the best data-free ranker leave one target out on the mini-suite; a source with "
                        "no known pair gets the mean), or ridge or boosted trees on the tier's features. Default: "
                        "record for the suite's sources, ridge for a folder of sources (--sources)")
    r.add_argument("--evaluate", action="store_true", help="leave-one-target-out evaluation of the rankers")
    r.add_argument("--coverage", action="store_true",
                   help="leave-one-target-out coverage and bias of the prediction intervals over every training seed "
                        "of the study (--study, default the store's; --variant; --tier, default 2: every feature the "
                        "table has)")
    add_level_option(r)
    r.add_argument("--n-boot", type=N_RESAMPLE, default=1000)
    add_variant_option(r, default=None, help="--evaluate with --study: the θ_ft* variant of the rows (default paper)")
    add_train_seed_option(r, default=None, alias=False,
                          help="--evaluate with --study: the training seed of the rows (default the smallest)")
    r.add_argument("--all-seeds", action="store_true",
                   help="--evaluate: every training seed of the study, one evaluation each, then each ranker's mean "
                        "± sd over the seeds")
    r.add_argument("--target-model", type=Path, default=None,
                   help="open world: the target's θ_ft checkpoint (no target images; tier 0, or 1 with --card)")
    r.add_argument("--card", type=Path, default=None, help="open world: the target's Hessian card (diag card)")
    r.add_argument("--sources", type=Path, default=None, help="open world: folder of source vectors, one sub-folder each")
    r.add_argument("--max-loss-increase", type=FRACTION, default=0.05,
                   help="open world with --card: cap λ2 so that the card's loss model λ2·gᵀτ + ½ λ2² R_card stays "
                        "within this target loss increase")
    r.add_argument("--methods", nargs="+", default=None, choices=TIER_METHODS[max(TIER_METHODS)],
                   help="transfer methods a recommendation may use (default: all the tier allows)")
    _suite_options(r)
    r.set_defaults(func=run_rank)

    s = sub.add_parser("screen", help="go / caution / no-go verdict for adding τ*ˢ to a target model")
    add_common(s)
    s.add_argument("--source", required=True, type=domain_name)
    s.add_argument("--target", required=True, type=domain_name)
    add_lambda_options(s, lambda1=False)
    add_budget_option(s)
    add_alpha_option(s)
    add_level_option(s)
    _suite_options(s)
    s.set_defaults(func=run_screen)


def _suite(ctx, args) -> list[str]:
    return [ctx.check_domain(d) for d in (args.domains or ctx.domains())]


def _study_table(ctx, args, study=None):
    """The all-pairs study of the suite at λ2 = 0.7: a given ``--study`` is read (``study``: its table, already
    read at λ2 = 0.7); the store's is run or resumed."""
    domains = _suite(ctx, args)
    merge_shards(args.study or ctx.store.study_dir(DEFAULT_STUDY), write=False)  # a damaged table: refused first
    store = ctx.ensure(domains, (args.alpha,))
    ws = ctx.workspace(args.alpha)
    if args.study and not args.extend:  # one run (variant, seed): a pair counted once
        run = select_run(load_study(args.study, lambda2=PAPER_LAMBDA2) if study is None else study,
                         getattr(args, "variant", None), getattr(args, "train_seed", None))
        return store, ws, run
    table = complete_study(ctx, domains, StudySettings(alpha=args.alpha, curvature_settings=curvature_settings(args)),
                           workspace=ws, out_dir=args.study)
    return store, ws, at_lambda(of_method(table))  # the predictor learns eq. 8's pairs


def _every_seed(ctx, args, study=None):
    """The study's plain eq. 8 pairs at λ2 = 0.7 at every training seed (of the run's variant); ``study``: the
    table already read at λ2 = 0.7."""
    if study is None:
        study = load_study(args.study or ctx.store.study_dir(DEFAULT_STUDY), lambda2=PAPER_LAMBDA2)
    return of_method(select_run(study, getattr(args, "variant", None), "all"))


def _given(args):
    """A given ``--study``'s table at λ2 = 0.7, read once for every use (None: the store's study, run or resumed)."""
    return load_study(args.study, lambda2=PAPER_LAMBDA2) if args.study and not args.extend else None


def _known(ctx, args, model: str, study=None):
    """The record's known pairs: the study at every training seed when it holds several (else None: the run's);
    ``study``: the table already read (:func:`_given`)."""
    every_seed = _every_seed(ctx, args, study) if model == "record" else None
    return every_seed if every_seed is not None and every_seed["seed"].nunique() > 1 else None


def _budget(value: float) -> float:
    if not (0.0 < value < 1.0):
        raise TvdiagError(f"--max-acc-drop must be in (0, 1), got {value}")
    return value


def _ci_word(ci) -> str:
    lo, hi = ci
    return "above 0" if lo > 0 else "below 0" if hi < 0 else "spans 0"


def _evaluate(ctx, args) -> int:
    """``rank-sources --evaluate``: every ranker leave one target out beside the test-retest ceiling, for one
    training seed or (``--all-seeds``) each seed of the study and the mean ± sd over them."""
    given = _given(args)
    _, _, table = _study_table(ctx, args, given)
    every_seed = _every_seed(ctx, args, given)
    ceiling = ranking_ceiling(every_seed)
    runs = ({int(s): evaluate_rankers(g, n_boot=args.n_boot, every_seed=every_seed) for s, g in every_seed.groupby("seed")}
            if args.all_seeds else
            {int(table["seed"].iloc[0]): evaluate_rankers(table, n_boot=args.n_boot, every_seed=every_seed)})
    rows = [dict(r, seed=seed, fraction_of_ceiling=ceiling.fraction(r["mean_spearman"]) if ceiling else None,
                 ci_excludes_0=_ci_word(r["ci95"]) != "spans 0") for seed, rs in runs.items() for r in rs]
    summary = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        v = np.array([r["mean_spearman"] for r in mine], dtype=float)
        summary.append({"name": name, "tier": mine[0]["tier"], "n_seeds": len(mine), "mean_spearman": float(v.mean()),
                        "sd_spearman": float(v.std(ddof=1)) if len(v) > 1 else None,
                        "fraction_of_ceiling": ceiling.fraction(float(v.mean())) if ceiling else None,
                        "seeds_ci_above_0": sum(r["ci95"][0] > 0 for r in mine)})
    if args.json:
        emit_json({"n_pairs": int(len(table)), "seeds": list(runs), "predictors": rows, "summary": summary,
                   "ceiling": ceiling.to_dict() if ceiling else None}, nan_as_null=True)
        return 0
    print(ceiling.sentence() if ceiling else "test-retest ceiling: needs a study with ≥ 2 training seeds "
          "(diag study --seeds 0 1)")
    for seed, rs in runs.items():
        n = int((every_seed["seed"] == seed).sum()) if args.all_seeds else len(table)
        print(f"Leave-one-target-out evaluation, training seed {seed}, over {n} pairs (E-RMSE of the chosen source; "
              "lower is better)")
        print(f"{'predictor':28s} {'mean Spearman':>13s} {'95% CI':>18s} {'CI':>8s} {'top-1 regret':>12s} "
              f"{'random regret':>13s} {'pooled r':>9s} {'÷ ceiling':>9s}")
        for r in (r for r in rows if r["seed"] == seed):
            ci, pooled, frac = r["ci95"], r.get("pooled_r"), r["fraction_of_ceiling"]
            print(f"{r['name']:28s} {r['mean_spearman']:13.3f} [{ci[0]:7.3f}, {ci[1]:7.3f}] {_ci_word(ci):>8s} "
                  f"{r['mean_top1_regret']:12.4f} {r['random_top1_regret']:13.4f} "
                  f"{pooled if pooled is not None else float('nan'):9.3f} {frac if frac is not None else float('nan'):9.2f}")
    if len(runs) > 1:
        print(f"Over training seeds {', '.join(map(str, runs))}: mean Spearman ± sd, its fraction of the ceiling, "
              "and the seeds whose 95 % CI lies above 0")
        for m in summary:
            frac = "" if m["fraction_of_ceiling"] is None else f", {m['fraction_of_ceiling']:.2f} of the ceiling"
            print(f"  {m['name']:28s} {m['mean_spearman']:+.3f} ± {m['sd_spearman']:.3f}{frac}; CI above 0 in "
                  f"{m['seeds_ci_above_0']} of {m['n_seeds']} seeds")
    print("Spearman between predicted and actual E-RMSE across sources, per target, averaged; CI by bootstrap over "
          "targets. cos τ* (oracle) needs the target's explanation vector: a reference, not a ranker.")
    return 0


def run_rank(args) -> int:
    if args.target_model is not None or args.sources is not None or args.card is not None:
        return run_rank_folder(args)
    ctx = context_from(args, default_domain=args.target)
    check_alpha(args.alpha)
    budget = _budget(args.max_acc_drop)
    if args.coverage:
        return _coverage(ctx, args)
    if args.evaluate:
        return _evaluate(ctx, args)
    if not args.target:
        raise TvdiagError("--target is required (or use --evaluate)")
    target = ctx.check_domain(args.target)
    given = _given(args)
    store, ws, table = _study_table(ctx, args, given)
    ctx.ensure([target], (args.alpha,), explain=False)  # the target's prediction-only θ_ft is all we need
    tier = 2 if args.tier == "auto" else int(args.tier)
    sources = [d for d in _suite(ctx, args) if d != target]
    diag = Diagnostics(ws, settings=curvature_settings(args), progress=ctx.progress, keep_probes=args.keep_probes)
    model = args.model or RANKER
    ranking = rank_cached(diag, table, target, sources, tier, budget, model=model, methods=args.methods,
                          level=args.level, known=_known(ctx, args, model, given))
    emit_json(ranking.to_dict(), nan_as_null=True) if args.json else print(ranking.table())
    return 0


def _coverage(ctx, args) -> int:
    """``rank-sources --coverage``: :func:`diag.decide.evaluation.loto_coverage` over every seed of one variant."""
    folder = args.study or ctx.store.study_dir(DEFAULT_STUDY)
    table = select_run(load_study(folder), getattr(args, "variant", None), "all")
    tier = 2 if args.tier == "auto" else int(args.tier)
    summaries, scored = loto_coverage(table, tier=tier, level=args.level, model=args.model or RANKER)
    checks = _screen_checks(table, args)
    if args.json:
        emit_json({"study": str(folder), "tier": tier, "level": args.level, "n_seeds": int(scored["seed"].nunique()),
                   "quantities": [c.to_dict() for c in summaries],
                   "screen": [c.to_dict() for c in checks] if checks else None}, nan_as_null=True)
        return 0
    print(f"Coverage of the {args.level:.0%} prediction intervals, leave one target out, over seeds "
          f"{sorted(scored['seed'].unique().tolist())} of {folder} (tier {tier}; test split)")
    print(f"{'quantity':12s} {'n':>5s} {'coverage':>9s} {'95% CI (Wilson)':>17s} {'bias (pred − meas.)':>21s}  per seed")
    for c in summaries:
        seeds = ", ".join(f"{v:.2f}" for v in c.per_seed.values())
        print(f"{c.quantity:12s} {c.n:5d} {c.coverage:9.3f} [{c.ci[0]:6.3f}, {c.ci[1]:6.3f}] "
              f"{c.bias:+10.4f} ± {c.bias_se:.4f}  {seeds}")
    print("Wilson intervals take the pairs as independent (those of one target are not); the gain is scored at every "
          "λ2 of the table.")
    if checks is None:
        print("screen validation: needs a study on the λ2 grid with val accuracies (diag study --lambda-grid)")
    main = [c for c in checks or [] if c.kind != "plain" or c.lambda2 == PAPER_LAMBDA2]
    for check in main:
        print()
        print("\n".join(check.lines()))
    others = [c for c in checks or [] if c not in main]
    if others:
        print()
        print("screen verdicts at the other λ2 of the grid (as `diag screen --lambda2 λ` gives them), scored at that λ2:")
        print("\n".join(f"  {c.line()}" for c in others))
    return 0


def _screen_checks(table, args):
    """:func:`diag.decide.screen_check.validate_screen` of the table's plain rows; None without a λ2 grid."""
    plain = of_method(table)
    if plain["lambda2"].map(lam_key).nunique() < 2 or "accuracy_val" not in plain:
        return None
    return validate_screen(plain, budget=_budget(args.max_acc_drop), level=args.level,
                           model=getattr(args, "model", None) or RANKER, every_lambda=True)[0]


def _finite_or_none(value) -> float | None:
    """``value`` as a float, or None when missing or not finite."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def run_screen(args) -> int:
    ctx = context_from(args, default_domain=args.target)
    check_alpha(args.alpha)
    lam = check_scale("lambda2", args.lambda2)
    budget = _budget(args.max_acc_drop)
    source, target = ctx.check_domain(args.source), ctx.check_domain(args.target)
    if source == target:
        raise TvdiagError(f"source and target are both '{source}'")
    given = _given(args)
    store, ws, table = _study_table(ctx, args, given)
    ctx.ensure([source], (args.alpha,))
    ctx.ensure([target], (args.alpha,), explain=False)
    diag = Diagnostics(ws, settings=curvature_settings(args), progress=ctx.progress, keep_probes=args.keep_probes)
    ranking = rank_for_target(diag, table, target, [source], 2, budget, level=args.level, known=_known(ctx, args, RANKER, given))
    row = ranking.rows.iloc[0]
    plain_verdict, plain_reasons = screen_verdict(row, table, target, lam, budget)
    verdict, reasons = method_verdict(row, budget)  # the verdict is the recommended method's; eq. 8 at --lambda2 beside it
    reasons += [f"plain eq. 8 at λ2={lam:g}: {plain_verdict}"] + [f"plain eq. 8: {r}" for r in plain_reasons]
    shown = ranking.to_dict()  # the predictions exactly as rank-sources reports them
    out = {"source": source, "target": target, "lambda2": lam, "max_acc_drop": budget, "verdict": verdict,
           "plain_verdict": plain_verdict, "method": row["method"], "method_param": row["method_param"],
           "method_scale": float(row["method_scale"]), "method_acc_drop": float(row["method_acc_drop"]),
           "level": shown["level"], "predictions": shown["predictions"], "headline": shown["headline"],
           **{k: v for k, v in shown["sources"][0].items() if k.startswith("predicted_")},
           "method_acc_drop_se": _finite_or_none(row.get("method_acc_drop_se")),
           "method_acc_drop_upper95": _finite_or_none(row["method_acc_drop"] + UPPER_Z * row.get("method_acc_drop_se",
                                                                                                 math.nan)),
           "n_val": int(row.get("method_n_val", 0) or 0),
           "measured_acc_drop": _finite_or_none(row.get("measured_acc_drop")),
           "measured_acc_drop_se": _finite_or_none(row.get("measured_acc_drop_se")),
           "reasons": reasons, "recommended_lambda2": float(row["lambda2"]),
           "risk_exact": float(row.get("risk_exact", math.nan)),
           "grad_dot_tau": _finite_or_none(row.get("grad_dot_tau")),
           "predicted_loss_increase": loss_model(lam, float(row.get("risk_exact", math.nan)),
                                                 _finite_or_none(row.get("grad_dot_tau"))),
           "cos_ft": float(row["cos_ft"])}
    if args.json:
        emit_json(out, nan_as_null=True)
    else:
        print(f"screen {source} → {target}, recommended {row['method']} ({row['method_param']}): {verdict.upper()}")
        for line in shown["headline"]:
            print(f"  * {line}")
        for reason in reasons:
            print(f"  - {reason}")
    return 1 if verdict == "no-go" else 0
