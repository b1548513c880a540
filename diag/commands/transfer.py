"""``diag transfer`` and ``diag zoo``."""

from __future__ import annotations

from diag.commands.options import (add_alpha_option, add_budget_option, add_common, add_domains_option,
                                   add_lambda_options, add_study_option, add_train_seed_option, add_train_seeds_option,
                                   add_variant_option, ALPHA, context_from, curvature_settings, domain_name)
from diag.commands.output import check_finite_result, emit_json
from diag.constants import PAPER_ALPHA
from diag.decide.recommend import study_gains
from diag.features.pair_features import Diagnostics
from diag.runtime.shards import build_domains
from diag.table import DEFAULT_STUDY, merge_shards
from diag.transfer.evaluate import transfer
from diag.transfer.methods import METHODS, RANKED_METHODS
from train.losses import check_alpha
from train.store import VARIANTS
from train.vectors import check_scale


def register(sub) -> None:
    p = sub.add_parser("transfer", help="Table-1-style comparison for one source → target transfer (eq. 8)")
    add_common(p)
    p.add_argument("--source", required=True, type=domain_name)
    p.add_argument("--target", required=True, type=domain_name)
    add_lambda_options(p)
    add_alpha_option(p)
    p.add_argument("--no-controls", action="store_true", help="skip the control rows")
    add_train_seed_option(p, help="training seed of the vectors and φ; also seeds the controls, per (seed, source, "
                                  "target)")
    add_variant_option(p)
    add_domains_option(p, help="domains the 'τ* of other source' control is drawn from (default: the suite); "
                               "the same list as a study's --domains gives that study's rows")
    p.add_argument("--method", default="plain",
                   choices=METHODS,
                   help="plain: eq. 8; project / precondition / blocks: τ*ˢ changed by the target's curvature "
                        "(Hᵀ on its train images); mix: uniform mix of the other domains' τ*; mix-ranked: their mix "
                        "weighted by the ranker's predicted gain (fitted on --study without the target); mix-matched: "
                        "the uniform mix at plain eq. 8's step ‖λ2·τ*ˢ‖ (no knob); mix-ranked-matched: the ranker's mix at "
                        "that step — each method's hyper-parameter "
                        "chosen on the target's val split")
    add_study_option(p, help="mix-ranked(-matched): study folder of the known pairs the ranker learns from (default the store's "
                             "'allpairs')")
    add_budget_option(p, help="val-accuracy budget of the method's choice, relative to θ_ftᵀ")
    p.set_defaults(func=run_transfer)

    z = sub.add_parser("zoo", help="build (or resume) every artifact of the suite: θ_base, θ_ft, φ, θ_ft*")
    add_common(z)
    add_domains_option(z)
    z.add_argument("--alpha", type=ALPHA, action="append", default=None,
                   help=f"α of θ_ft* (repeatable; default {PAPER_ALPHA:g})")
    add_train_seeds_option(z)
    z.add_argument("--variant", choices=VARIANTS, action="append", default=None,
                   help="θ_ft* variant (repeatable; default paper)")
    z.set_defaults(func=run_zoo)


def run_transfer(args) -> int:
    ctx = context_from(args, default_domain=args.target)
    check_alpha(args.alpha)
    check_scale("lambda1", args.lambda1)
    check_scale("lambda2", args.lambda2)
    source, target = ctx.check_domain(args.source), ctx.check_domain(args.target)
    candidates = [ctx.check_domain(d) for d in args.domains] if args.domains is not None else ctx.domains()
    if args.method in RANKED_METHODS:  # a damaged study table is refused before anything is built
        merge_shards(args.study or ctx.store.study_dir(DEFAULT_STUDY), write=False)
    ctx.ensure([source, target], (args.alpha,), variants=(args.variant,), seeds=(args.train_seed,))
    # the "τ* of another source" control uses a domain already in the store (nothing extra is built)
    ws = ctx.workspace(args.alpha, seed=args.train_seed, variant=args.variant)
    curvature = None
    if args.method in ("project", "precondition", "blocks"):
        curvature = Diagnostics(ws, settings=curvature_settings(args), progress=ctx.progress).curvature(
            target, need_operator=args.method == "blocks")
    gains = None
    if args.method in RANKED_METHODS:
        gains, _ = study_gains(args.study or ctx.store.study_dir(DEFAULT_STUDY), target, args.train_seed, args.variant)
    result = transfer(ws, source, target, args.lambda1, args.lambda2, controls=not args.no_controls,
                      candidates=candidates, method=args.method, curvature=curvature, max_acc_drop=args.max_acc_drop,
                      gains=gains)
    check_finite_result(result.to_dict(), "transfer result")
    emit_json(result.to_dict()) if args.json else print(result.table())
    return 0


def run_zoo(args) -> int:
    """``diag zoo``: build or resume every artifact; under torchrun the domains are split over the ranks."""
    ctx = context_from(args)
    domains = list(dict.fromkeys(ctx.check_domain(d) for d in (args.domains or ctx.domains())))
    alphas = tuple(check_alpha(a) for a in (args.alpha or [PAPER_ALPHA]))
    variants = tuple(dict.fromkeys(args.variant or ["paper"]))
    report = build_domains(ctx, domains, alphas, True, variants, args.seeds, zero_shot=True)
    times, zero_shot = report["seconds"], report["zero_shot_accuracy"]
    vectors = ctx.provenance(domains, alphas, variants=variants, seeds=tuple(args.seeds))  # built or imported
    if args.json:
        emit_json({"store": str(ctx.store.folder), "seconds": times, "zero_shot_accuracy": zero_shot,
                   "stage_ranks": report["stage_ranks"], "built": report["built"], "workers": report.get("workers", 1),
                   "idle_seconds": report["idle_seconds"], "waited_seconds": report["waited_seconds"],
                   "vectors": vectors})
        return 0
    for row in vectors:
        if row["origin"] == "imported":
            print(f"{row['what']}: imported (sha256 {row['sha256']}), kept")
    n_procs = len(report["built"])  # torchrun ranks or --workers processes
    print(f"zoo ready in {ctx.store.folder}" + (f" (domains split over {n_procs} processes)" if n_procs > 1 else ""))
    for k, v in times.items():
        print(f"  {k:12s} {v:8.1f} s")
    if n_procs > 1:
        print("  idle per process (waiting for a prerequisite or for the others): "
              + ", ".join(f"{s:.1f} s" for s in report["idle_seconds"]))
    print("zero-shot accuracy of θ_base (test split; chance = 1/classes):")
    for d, acc in zero_shot.items():
        print(f"  {d:12s} {acc:.3f}   (chance {1 / ctx.zoo(args.seeds[0]).domain(d).num_classes:.3f})")
    return 0
