"""``diag similarity``, ``diag study``, ``diag ceilings`` and ``diag correlate``."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from diag.commands.options import (add_alpha_option, add_bootstrap_seed_option, add_common, add_domains_option,
                                   add_lambda_options, add_study_option, add_train_seed_option, add_train_seeds_option,
                                   add_variant_option, context_from, curvature_settings, N_IMAGES, N_RESAMPLE,
                                   positive_int, seed, writable_dir)
from diag.commands.output import emit_json
from diag.constants import LAMBDA_GRID, PAPER_ALPHA, PAPER_LAMBDA2
from diag.features.similarity import similarity_matrices, VectorSpec
from diag.runtime.distributed import is_distributed, rank_and_world
from diag.stats import appendix_c_over_seeds, correlate_appendix_c
from diag.study import figures
from diag.study.ceilings import ceilings, MAX_IMAGES
from diag.study.kernelshap_budget import kernelshap_budget, KS_BUDGETS, KS_FILE
from diag.study.methods_report import method_report, tradeoff_frame
from diag.study.parallel import complete_study
from diag.study.report import study_report
from diag.study.run import run_study, StudySettings
from diag.study.summary import figure2_frame, summarize
from diag.study.verify import untrusted_tables, verify_study
from diag.transfer.methods import METHODS
from diag.table import (at_lambda, DEFAULT_STUDY, load_study, merge_shards, of_method, PAIRS_FILE, parse_shard,
                        may_write, select_run, VECTORS_FILE, write_table)
from train.errors import DataError
from train.losses import check_alpha
from train.vectors import check_scale


def register(sub) -> None:
    """The four subcommands' options. Long because it is one flat list of argparse declarations."""
    s = sub.add_parser("similarity", help="cosine matrices of τ_ft and τ* across domains, with heatmaps")
    add_common(s)
    add_domains_option(s, help="default: the whole suite")
    s.add_argument("--by", choices=("global", "block"), default="global", help="also per transformer block")
    add_alpha_option(s)
    s.add_argument("--out", type=writable_dir, default=None,
                   help="folder for the heatmaps (default: <store>/studies/similarity)")
    s.set_defaults(func=run_similarity)

    p = sub.add_parser("study", help="every ordered (source, target) pair: eq. 8, controls, diagnostics")
    add_common(p)
    add_domains_option(p, help="default: the whole suite")
    add_lambda_options(p, repeatable=True)
    add_alpha_option(p)
    p.add_argument("--shard", default=None, metavar="I/N", help="only pairs with index %% N == I (default under torchrun: rank/world)")
    p.add_argument("--no-curvature", action="store_true", help="skip the R columns (cosines and norms only)")
    p.add_argument("--no-controls", action="store_true", help="skip the control columns")
    p.add_argument("--fresh", action="store_true", help="recompute pairs already in the table")
    p.add_argument("--verify", action="store_true",
                   help="re-check a table refused as untrusted (no or a damaged check file): recompute its rows "
                        "with these settings and re-certify it if every row agrees (nothing is written otherwise)")
    p.add_argument("--kernelshap-budget", action="store_true",
                   help="also Figure 5: Kernel SHAP with P = 50 … 1000 vs the proposed model")
    p.add_argument("--ks-images", type=N_IMAGES, default=32, help="test images per target for --kernelshap-budget")
    p.add_argument("--ks-budgets", type=N_IMAGES, nargs="*", default=None, help="Kernel SHAP perturbation budgets")
    add_train_seeds_option(p, help="training seeds (each: that seed's θ_ft, φ, θ_ft*; also seeds the controls); "
                                   "default 0")
    add_variant_option(p)
    p.add_argument("--out", type=writable_dir, default=None, help="study folder (default: <store>/studies/allpairs)")
    p.add_argument("--methods", nargs="+", default=["plain"], metavar="METHOD",
                   choices=METHODS,
                   help="transfer methods per pair (default plain = eq. 8); each method's knob is chosen "
                        "on the target's val split; several → pareto.png and the method study report")
    p.set_defaults(func=run_study_cmd)

    g = sub.add_parser("ceilings", help="noise ceilings: cos τ*/τ_ft across seeds, Kernel SHAP run-to-run E-RMSE")
    add_common(g)
    add_domains_option(g, help="default: the whole suite")
    add_train_seeds_option(g)
    add_variant_option(g, help="θ_ft* variant of τ* (default paper)")
    add_alpha_option(g)
    g.add_argument("--n-images", type=N_IMAGES, default=MAX_IMAGES,
                   help=f"test images of the Kernel SHAP ceiling (≤ {MAX_IMAGES})")
    g.add_argument("--shap-seeds", type=seed, nargs=2, default=[101, 202], metavar=("A", "B"),
                   help="the two Kernel SHAP generator seeds (must differ)")
    g.add_argument("--ks-samples", type=positive_int(100_000), nargs="+", default=[], metavar="N",
                   help="also measure the Kernel SHAP ceiling at N samples per image (first seed's θ_ft)")
    g.set_defaults(func=run_ceilings)

    c = sub.add_parser("correlate", help="Appendix C / Figure 6: correlations with bootstrap CIs and permutation p")
    add_common(c)
    add_study_option(c, help="study folder to read (default: <store>/studies/allpairs, run first when empty)")
    c.add_argument("--extend", action="store_true", help="run the study into --study when it has no table")
    add_domains_option(c, help="domains if the study must be run first")
    add_lambda_options(c, lambda1=False)
    c.add_argument("--n-boot", type=N_RESAMPLE, default=2000)
    c.add_argument("--n-perm", type=N_RESAMPLE, default=2000)
    add_bootstrap_seed_option(c)
    add_variant_option(c, default=None, help="θ_ft* variant of the rows (default paper)")
    add_train_seed_option(c, default=None, alias=False,
                          help="training seed of the rows (default: the smallest in the study); one run per analysis")
    c.add_argument("--all-seeds", action="store_true",
                   help="every training seed of the study, one analysis each, then each r's mean ± sd over seeds")
    c.set_defaults(func=run_correlate)


# ------------------------------------------------------------------------------ helpers


def _domains(ctx, given):
    domains = [ctx.check_domain(d) for d in (given or ctx.domains())]
    domains = list(dict.fromkeys(domains))
    if len(domains) < 2:
        raise DataError(f"need at least 2 domains, got {domains}")
    return domains


def _fmt_matrix(df, title: str) -> str:
    names = [str(c) for c in df.columns]
    w = max(8, max(len(n) for n in names) + 1)
    lines = [title, " " * w + "".join(f"{n:>{w}s}" for n in names)]
    for idx, row in df.iterrows():
        cells = "".join(f"{'nan':>{w}s}" if not math.isfinite(v) else f"{v:>{w}.3f}" for v in row.to_numpy(float))
        lines.append(f"{str(idx):<{w}s}{cells}")
    return "\n".join(lines)


def _matrix_json(df) -> dict:
    return {str(i): {str(c): (None if not math.isfinite(v) else float(v)) for c, v in row.items()}
            for i, row in df.iterrows()}


def _clean(obj):
    """JSON-safe copy (NaN/inf → null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):
        return _clean(obj.item())
    return obj


# ------------------------------------------------------------------------- similarity


def run_similarity(args) -> int:
    ctx = context_from(args)
    alpha = check_alpha(args.alpha)
    domains = _domains(ctx, args.domains)
    store = ctx.ensure(domains, (alpha,))
    out = args.out or store.study_dir("similarity")
    ft = similarity_matrices({d: VectorSpec(store.vector_path(d, "ft")) for d in domains}, by=args.by)
    star = similarity_matrices({d: VectorSpec(store.vector_path(d, "ftx", alpha), store.vector_path(d, "ft"))
                                for d in domains}, by=args.by)
    written = []
    for kind, mats, label in (("ft", ft, "cos(τ_ftˢ, τ_ftᵀ)"), ("star", star, f"cos(τ*ˢ, τ*ᵀ), α={alpha:g}")):
        for group, df in mats.items():
            name = f"cos_{kind}.png" if group == "global" else f"blocks/cos_{kind}_{group}.png"
            title = label if group == "global" else f"{label} — {group}"
            written.append(str(figures.plot_similarity_heatmap(df, Path(out) / name, title=title)))
    if args.json:
        emit_json({"domains": domains, "by": args.by, "alpha": alpha,
                          "ft": {g: _matrix_json(m) for g, m in ft.items()},
                          "star": {g: _matrix_json(m) for g, m in star.items()}, "figures": written})
        return 0
    print(_fmt_matrix(ft["global"], "cos(τ_ftˢ, τ_ftᵀ) — global"))
    print()
    print(_fmt_matrix(star["global"], f"cos(τ*ˢ, τ*ᵀ) — global (α={alpha:g})"))
    if args.by == "block":
        for kind, mats in (("τ_ft", ft), ("τ*", star)):
            for group, df in mats.items():
                if group != "global":
                    print()
                    print(_fmt_matrix(df, f"cos({kind}ˢ, {kind}ᵀ) — {group}"))
    print(f"\nheatmaps: {Path(out)}")
    return 0


# ------------------------------------------------------------------------------ study


def _study_settings(args) -> StudySettings:
    """The science settings of ``diag study``'s command line."""
    lambda2s = list(args.lambda2 or [PAPER_LAMBDA2])
    if args.lambda_grid:
        lambda2s = list(dict.fromkeys([*lambda2s, *LAMBDA_GRID]))
    return StudySettings(alpha=check_alpha(args.alpha), lambda1=args.lambda1, lambda2s=tuple(lambda2s),
                         seeds=tuple(args.seeds), variant=args.variant, controls=not args.no_controls,
                         curvature=not args.no_curvature, curvature_settings=curvature_settings(args),
                         methods=tuple(args.methods))


def run_study_cmd(args) -> int:
    ctx = context_from(args)
    settings = _study_settings(args)
    shard = parse_shard(args.shard) if args.shard else None
    alpha, lambda1, lambda2s, seeds = settings.alpha, settings.lambda1, list(settings.lambda2s), list(settings.seeds)
    if args.ks_images < 1:
        raise DataError(f"--ks-images must be positive, got {args.ks_images}")
    domains = _domains(ctx, args.domains)
    out = Path(args.out) if args.out else ctx.store.study_dir(DEFAULT_STUDY)
    if args.verify:
        return _verify(args, ctx, domains, settings, out)
    if not args.fresh:
        merge_shards(out, write=False)  # a damaged or untrusted table is refused before anything is built
    may_write(out / VECTORS_FILE)  # so is a table there that tvdiag did not write
    ctx.ensure(domains, (alpha,), variants=(args.variant,), seeds=tuple(seeds))
    rank, world = rank_and_world()
    merged_rank0 = is_distributed() and world > 1 and rank == 0
    ws = ctx.workspace(alpha, seed=seeds[0], variant=args.variant)
    df = complete_study(ctx, domains, settings, workspace=ws, shard=shard, resume=not args.fresh, out_dir=out)
    shard = shard or (rank, world)  # what run_study used
    if is_distributed() and not merged_rank0:
        return 0  # under torchrun only rank 0 (which merged every shard) reports
    if merged_rank0:
        shard = (0, 1)
    report: dict = {"study": str(out), "shard": list(shard), "n_rows": int(len(df)), "seeds": seeds,
                    "variant": args.variant, "alpha": alpha, "figures": {}}
    vectors = ctx.provenance(domains, (alpha,), variants=(args.variant,), seeds=tuple(seeds))
    write_table(pd.DataFrame(vectors), out / VECTORS_FILE)  # per domain: each vector built or imported, sha256
    report["vectors"] = vectors
    main_l2 = PAPER_LAMBDA2 if PAPER_LAMBDA2 in lambda2s else lambda2s[0]
    every, df = df, of_method(df)
    first = df[df["seed"] == seeds[0]]
    summary = summarize(first, main_l2)
    report["summary"] = summary.to_dict()
    full = study_report(df, main_l2)
    report["report"] = full.to_dict()
    if shard[1] == 1:
        report["figures"]["figure2"] = str(figures.figure2(figure2_frame(df, main_l2), out / "figure2.png"))
        if len(lambda2s) > 1:
            report["figures"]["figure3"] = str(figures.figure3(first, out / "figure3.png", seed=seeds[0]))
    methods = _methods_part(every, main_l2, out, report, shard)
    if args.kernelshap_budget:
        ks = _kernelshap_part(args, ws, domains, out, lambda1, main_l2, figures)
        report["figures"].update(ks.pop("figures"))
        report.update(ks)
    if args.json:
        emit_json(_clean(report))
        return 0
    _print_study(report, summary, out, alpha, lambda1, shard)
    print()
    print(full.table())
    if methods is not None:
        print()
        print(methods.table())
    return 0


def _verify(args, ctx, domains, settings, out) -> int:
    """``diag study --verify``: recompute and re-certify the untrusted tables of ``out``."""
    if args.fresh or args.shard:
        raise DataError("--verify re-checks the existing tables: it takes neither --fresh nor --shard")
    if not untrusted_tables(out):
        checks = []
    else:
        store = ctx.ensure(domains, (settings.alpha,), variants=(settings.variant,), seeds=tuple(settings.seeds))
        checks = verify_study(store, domains, settings, out, progress=ctx.progress, data=ctx.data,
                              workspace=ctx.workspace(settings.alpha, seed=settings.seeds[0], variant=settings.variant))
    if args.json:
        emit_json({"study": str(out), "tables": [c.to_dict() for c in checks]})
        return 0
    if not checks:
        print(f"study {out}: every table checks out against its check file; nothing to verify")
    for c in checks:
        print(f"study table {c.path}: all {c.rows} rows agree with their recomputation; check file rewritten")
    return 0


def _methods_part(df, lambda2, out, report, shard):
    """With several methods in the table: the method study report and (unsharded) pareto.png beside the table."""
    if df["method"].nunique() < 2:
        return None
    rep = method_report(df, lambda2)
    report["methods"] = rep.to_dict()
    if shard[1] == 1:
        report["figures"]["pareto"] = str(figures.pareto(tradeoff_frame(df, lambda2), out / "pareto.png"))
    return rep


def _kernelshap_part(args, ws, domains, out, lambda1, lambda2, figures) -> dict:
    """Figure 5 over every target with imagenette (else the first domain) as source."""
    import pandas as pd


    source = "imagenette" if "imagenette" in domains else domains[0]
    budgets = args.ks_budgets or list(KS_BUDGETS)
    parts = [kernelshap_budget(ws, t, source, budgets, n_images=args.ks_images, lambda1=lambda1,
                               lambda2=lambda2, seed=ws.seed) for t in domains if t != source]
    ks = pd.concat(parts, ignore_index=True)
    ks.to_csv(out / KS_FILE, index=False)
    return {"figures": {"figure5": str(figures.figure5(ks, out / "figure5.png", seed=ws.seed))},
            "kernelshap_budget": (ks.groupby(["method", "n_perturbations"], dropna=False)[["ermse", "iou1", "wall_s"]]
                                  .mean().reset_index().to_dict(orient="records"))}


def _print_study(report: dict, s, out, alpha, lambda1, shard) -> None:
    print(f"study {out}  ({s.n_pairs} pairs at λ2={s.lambda2:g}, α={alpha:g}, λ1={lambda1:g}, "
          f"variant {report['variant']}, seed {report['seeds'][0]} of {report['seeds']}"
          + (f", shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "") + ")")
    print(f"  mean normalised E-RMSE {s.mean_ermse_norm:.3f} ± {s.mean_ermse_norm_se:.3f}, "
          f"mean normalised accuracy {s.mean_acc_norm:.3f} ± {s.mean_acc_norm_se:.3f} (÷ θ_ftᵀ; se over pairs)")
    for ctrl, m in s.mean_ermse_norm_controls.items():
        print(f"  control {ctrl:8s} mean normalised E-RMSE {m:.3f}")
    for v in s.verdicts():
        print(f"  - {v}")
    print("  paper (ViT-B/32, Fig. 2): E-RMSE below θ_ftᵀ in most of 56 pairs at ~θ_ftᵀ accuracy")
    if shard[1] > 1:
        print(f"  shard table written; merge with diag.table.merge_shards({str(out)!r})")
    for name, path in report["figures"].items():
        print(f"  {name}: {path}")
    for row in report["vectors"]:  # the vectors the user brought (every row: vectors.csv beside the table)
        if row["origin"] == "imported":
            print(f"  {row['what']} seed {row['seed']}: imported (sha256 {row['sha256']})")
    if "kernelshap_budget" in report:
        print("  Kernel SHAP budget (mean over targets): method, P, E-RMSE, IoU@1, wall s")
        for r in report["kernelshap_budget"]:
            p = r["n_perturbations"]
            p = "-" if p is None or (isinstance(p, float) and not math.isfinite(p)) else int(p)
            print(f"    {r['method']:10s} {str(p):>5s} {r['ermse']:.3f} {r['iou1']:.3f} {r['wall_s']:.3g}")


# ---------------------------------------------------------------------------- ceilings


def run_ceilings(args) -> int:
    """``diag ceilings``: cos τ*/τ_ft across seeds and the Kernel SHAP noise ceiling, per domain."""
    ctx = context_from(args)
    alpha = check_alpha(args.alpha)
    domains = list(dict.fromkeys(ctx.check_domain(d) for d in (args.domains or ctx.domains())))
    seeds = list(dict.fromkeys(args.seeds))
    ctx.ensure(domains, (alpha,), variants=(args.variant,), seeds=tuple(seeds))
    result = ceilings(ctx.workspace(alpha, seed=seeds[0], variant=args.variant), domains, seeds,
                      n_images=args.n_images, shap_seeds=tuple(args.shap_seeds), ks_samples=args.ks_samples)
    if args.json:
        emit_json(_clean(result.to_dict()))
    else:
        print(result.table())
    return 0


# --------------------------------------------------------------------------- correlate


def run_correlate(args) -> int:
    ctx = context_from(args)
    lambda2 = check_scale("lambda2", args.lambda2)
    if args.n_boot < 1 or args.n_perm < 1:
        raise DataError("--n-boot and --n-perm must be positive")
    out = Path(args.study) if args.study else ctx.store.study_dir(DEFAULT_STUDY)
    if merge_shards(out, write=False).empty and (args.study is None or args.extend):
        domains = _domains(ctx, args.domains)
        store = ctx.ensure(domains, (PAPER_ALPHA,))
        run_study(store, domains, StudySettings(lambda2s=(lambda2,), curvature_settings=curvature_settings(args)),
                  out_dir=out, progress=ctx.progress, data=ctx.data, workspace=ctx.workspace())
    if args.all_seeds:
        return _correlate_seeds(args, out, lambda2)
    df = at_lambda(select_run(load_study(out), args.variant, args.train_seed), lambda2)
    reports = correlate_appendix_c(df, n_boot=args.n_boot, n_perm=args.n_perm, seed=args.bootstrap_seed)
    fig = figures.figure6(df, out / "figure6.png", reports=reports)
    n_pairs = int(len(df[df["source"] != df["target"]]))
    if args.json:
        emit_json(_clean({"n_pairs": n_pairs, "lambda2": lambda2, "study": str(out / PAIRS_FILE),
                          "variant": str(df["variant"].iloc[0]), "train_seed": int(df["seed"].iloc[0]),
                                 "figure": str(fig), "correlations": [r.to_dict() for r in reports]}))
        return 0
    print(f"Appendix C correlations over {n_pairs} pairs (λ2={lambda2:g}, variant {df['variant'].iloc[0]}, "
          f"training seed {df['seed'].iloc[0]}; paper: 56 pairs, ViT-B/32)")
    head = (f"{'x':10s} {'y':8s} {'r':>7s} {'p(naive)':>9s} {'rho':>7s} {'95% CI (src×tgt bootstrap)':>28s} "
            f"{'perm p':>8s} {'paper r':>8s}")
    print(head)
    print("-" * len(head))
    for r in reports:
        ci = f"[{r.ci95[0]:+.3f}, {r.ci95[1]:+.3f}]"
        paper = f"{r.paper_r:+.2f}" if r.paper_r is not None else "-"
        print(f"{r.x:10s} {r.y:8s} {r.pearson_r:+7.3f} {r.pearson_p:9.2g} {r.spearman_rho:+7.3f} {ci:>28s} "
              f"{r.perm_p:8.3g} {paper:>8s}")
    print("p(naive) treats pairs as independent (as the paper does); the CI resamples sources and targets and "
          "the permutation test relabels domains, so both respect that pairs share domains.")
    print(f"figure: {fig}")
    return 0


def _correlate_seeds(args, out, lambda2) -> int:
    """``correlate --all-seeds``: Appendix C per training seed, then each r's mean ± sd over the seeds."""
    every = select_run(load_study(out), args.variant, "all")
    per_seed, summary = appendix_c_over_seeds(
        {int(s): at_lambda(every[every["seed"] == s], lambda2) for s in sorted(every["seed"].unique())},
        n_boot=args.n_boot, n_perm=args.n_perm, seed=args.bootstrap_seed)
    if args.json:
        emit_json(_clean({"lambda2": lambda2, "study": str(out / PAIRS_FILE), "over_seeds": summary,
                          "per_seed": {str(s): [r.to_dict() for r in reports] for s, reports in per_seed.items()}}))
        return 0
    print(f"Appendix C over training seeds {sorted(per_seed)} (λ2={lambda2:g}; r per seed, then mean ± sd over seeds)")
    for k, row in enumerate(summary):
        cells = " ".join(f"{reports[k].pearson_r:+.3f}" for reports in per_seed.values())
        paper = f"{row['paper_r']:+.2f}" if row["paper_r"] is not None else "-"
        print(f"  {row['x']:10s} {row['y']:8s} {cells}   mean {row['mean_r']:+.3f} ± {row['sd_r']:.3f}   "
              f"95% CI excludes 0 on {row['seeds_ci_excludes_0']}/{row['n_seeds']} seeds   paper {paper}")
    return 0
