"""``diag hessian``, ``diag spectrum``, ``diag risk`` and ``diag bench``."""

from __future__ import annotations

import json

from diag.bench.curvature import bench_main, BENCH_MODELS
from diag.bench.estimators import STORE_BENCH_IMAGES
from diag.bench.ranking import bench_rank
from diag.commands.options import (add_alpha_option, add_common, add_curvature_options, add_lambda_options,
                                   add_probe_seed_option, CHECK_T, context_from, curvature_settings, domain_name,
                                   finite_float, int_range, ITERS, K, PROBES, REPEATS, writable_file)
from diag.commands.output import check_finite_result, emit_json
from diag.curvature.backends import pyhessian_trace_and_top_eig
from diag.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from diag.curvature.hutchpp import hutchpp_trace
from diag.curvature.lanczos import lanczos_topk, slq_density
from diag.constants import CHECK_IMAGES, CHOICE_SPLIT
from diag.curvature.risk import eigen_contributions, quadratic_check
from diag.decide.loss_model import CONSISTENT_Z
from diag.decide.rules import predicted_loss_increase
from diag.features.pair_features import Diagnostics
from train.errors import TvdiagError
from train.losses import check_alpha
from train.store import content_key
from train.tensorio import save_tensors


def _curvature_options(p, card: bool = False, keep_probes: bool = True) -> None:
    """What every curvature command shares: the data of the Hessian, its engine, the probe seed and α
    (``card``: also ``--probes`` and ``--k`` of the Hessian card, as ``rank-sources`` and ``card`` have them;
    ``keep_probes``: ``--keep-probes``, for the commands that build the store's diagonal of Hᵀ)."""
    add_curvature_options(p, card=card, n_images_help="target images the Hessian averages over",
                          keep_probes=keep_probes)
    p.add_argument("--params", nargs="*", default=None, help="parameter name globs, e.g. 'visual.transformer.resblocks.3.*'")
    p.add_argument("--engine", default="auto", choices=("auto", "fwd-rev", "double-backward"))
    add_probe_seed_option(p)
    add_alpha_option(p)


def register(sub) -> None:
    h = sub.add_parser("hessian", help="trace / diagonal / Hessian card of L_cls at a domain's θ_ft")
    add_common(h)
    h.add_argument("--domain", required=True, type=domain_name)
    h.add_argument("--what", choices=("trace", "diag", "card"), default="trace")
    h.add_argument("--probes", type=int_range(2, 100_000), default=None, help="fixed number of Hutchinson probes")
    h.add_argument("--rel-stderr", type=finite_float(0.0, 1.0, lo_open=True), default=None,
                   help="stop once the relative standard error is below this")
    h.add_argument("--max-probes", type=int_range(2, 100_000), default=200)
    h.add_argument("--k", type=K, default=None, help="eigenpairs on the card (default: the preset's)")
    h.add_argument("--resume", action="store_true", help="checkpoint running sums and resume a killed run")
    h.add_argument("--backend", choices=("ours", "pyhessian"), default="ours",
                   help="pyhessian: also run PyHessian's trace/top eigenvalue on the first batch, side by side")
    _curvature_options(h)
    h.set_defaults(func=run_hessian)

    s = sub.add_parser("spectrum", help="top-k Hessian eigenpairs (Lanczos) and the spectral density (SLQ)")
    add_common(s)
    s.add_argument("--domain", required=True, type=domain_name)
    s.add_argument("--k", type=K, default=5)
    s.add_argument("--probes", type=PROBES, default=4, help="SLQ probes")
    s.add_argument("--iters", type=ITERS, default=30, help="Lanczos steps per SLQ probe")
    s.add_argument("--out", default=None, type=writable_file,
                   help="PNG of the density (default: store curvature folder)")
    _curvature_options(s, keep_probes=False)
    s.set_defaults(func=run_spectrum)

    r = sub.add_parser("risk", help="R(τ*ˢ; Hᵀ) exact, diagonal and card side by side, with the quadratic check")
    add_common(r)
    r.add_argument("--source", required=True, type=domain_name)
    r.add_argument("--target", required=True, type=domain_name)
    add_lambda_options(r, lambda1=False)
    r.add_argument("--check", nargs="*", type=CHECK_T, default=[0.25, 0.5, 0.7, 1.0],
                   help="t values of the loss-model check: L(θ+tτ)−L(θ) measured on the target's val images vs "
                        "t·gᵀτ + ½t²R with g and H from its train images (cross-fitted)")
    _curvature_options(r, card=True)
    r.set_defaults(func=run_risk)

    b = sub.add_parser("bench", help="benchmarks: `diag bench curvature`, `diag bench rank`")
    b.add_argument("what", choices=("curvature", "rank"))
    b.add_argument("--n-params", type=int, default=None, help="rank: synthetic size (default: the ViT-B/32 tower)")
    b.add_argument("--n-sources", type=int, default=8, help="rank: source vectors")
    b.add_argument("--k", type=int, default=2, help="rank: eigenpairs of the synthetic card (0: no card)")
    b.add_argument("--quick", action="store_true", help="small models and batches: a quick run on a CPU")
    b.add_argument("--repeats", type=REPEATS, default=None)
    b.add_argument("--probes", type=int_range(2, 100_000), default=None,
                   help="also time an N-probe Hutchinson trace and the top eigenvalue against PyHessian's")
    b.add_argument("--models", nargs="+", default=None, help="bench models (default: all)")
    b.add_argument("--domain", default=None,
                   help="curvature: also the estimators (--probes) on the store's θ_ft of this domain, on its first "
                        f"{STORE_BENCH_IMAGES} val images (built first when missing)")
    add_common(b)  # --store, --preset, ... for --domain
    b.set_defaults(func=run_bench)


def _diagnostics(args, ctx, domains, explain):
    check_alpha(args.alpha)
    ctx.ensure(domains, (args.alpha,), explain=explain)
    settings = curvature_settings(args, seed=args.probe_seed, engine=args.engine,
                                  params=tuple(args.params) if args.params else None)
    return Diagnostics(ctx.workspace(args.alpha), settings=settings, progress=ctx.progress,
                       keep_probes=getattr(args, "keep_probes", False))


def run_hessian(args) -> int:
    """``diag hessian``: trace, diagonal or card of the Hessian of L_cls at a domain's θ_ft."""
    ctx = context_from(args, default_domain=args.domain)
    domain = ctx.check_domain(args.domain)
    if args.probes is None and args.rel_stderr is None:
        args.probes = 32
    if args.probes is not None and args.probes < 2:
        raise TvdiagError(f"--probes must be at least 2, got {args.probes}")
    diag = _diagnostics(args, ctx, [domain], explain=args.what == "card")
    out: dict = {"domain": domain, "what": args.what, "point": "θ_ft", "n_images": diag.settings.n_images}
    if args.what == "card":
        out["card"] = diag.curvature(domain).card.to_dict()
        out["path"] = str(diag.card_path(domain))
    else:
        op = diag.operator(domain)
        out.update(_hessian_estimates(args, ctx, diag, domain, op))
        if args.backend == "pyhessian":
            out.update(_pyhessian_side_by_side(args, diag, domain, op))
    if args.json:
        emit_json(out)
    else:
        _print_hessian(out, domain, diag.settings.n_images)
    return 0


def _settings_key(args, n_images: int) -> dict:
    """What a Hutchinson run's result depends on (keys its files in the store)."""
    return {"what": args.what, "seed": args.probe_seed, "n_images": n_images, "probes": args.probes,
            "rel_stderr": args.rel_stderr, "max_probes": args.max_probes,
            "params": list(args.params) if args.params else None}


def _hessian_estimates(args, ctx, diag, domain: str, op) -> dict:
    """Hutchinson (and Hutch++) trace, or the Hutchinson diagonal saved to the store."""
    out: dict = {"dim": op.shape[0], "engine": op.engine}
    ckpt = None
    if args.resume:
        ckpt = diag.store.curvature_path(domain, f"{args.what}-ckpt", _settings_key(args, diag.settings.n_images))
    kwargs = {"num_matvecs": args.probes, "rel_stderr": args.rel_stderr, "max_matvecs": args.max_probes,
              "seed": args.probe_seed, "checkpoint": ckpt, "progress": ctx.progress}
    if args.what == "trace":
        out["trace"] = hutchinson_trace(op, **kwargs).to_dict()
        n_hpp = max(12, 3 * ((args.probes or 24) // 3))
        out["hutchpp"] = hutchpp_trace(op, num_matvecs=n_hpp, seed=args.probe_seed).to_dict()
        return out

    est = hutchinson_diagonal(op, **kwargs)
    settings = {**_settings_key(args, diag.settings.n_images), "n_probes": est.n_probes}
    path = diag.store.curvature_path(domain, "diag-hutchinson", settings)
    key = content_key({**settings, "base": diag.base_hash, "ft": diag.vector(domain, "ft").provenance.get("key", "")})
    diag.store.decide(path, key, what=f"{domain} Hutchinson diagonal")  # refuses a file tvdiag did not write
    save_tensors(path, {"diag": est.mean, "stderr": est.stderr},
                 {"key": key, "domain": domain, "probes": est.n_probes, "probe_seed": args.probe_seed, "total": est.total,
                  "total_stderr": est.total_stderr, "base_hash": diag.base_hash})
    out["diag"] = est.to_dict()
    out["path"] = str(path)
    per_tensor = {name: float(est.mean[a:b].sum()) for name, (a, b) in op.layout.offsets().items()}
    out["per_tensor_top"] = dict(sorted(per_tensor.items(), key=lambda kv: -abs(kv[1]))[:8])
    return out


def _pyhessian_side_by_side(args, diag, domain: str, op) -> dict:
    """PyHessian's trace and top eigenvalue on the first batch, and ours on the same batch."""
    x, y = op.data[0]
    model = diag.model(domain)
    params = list(args.params) if args.params else None
    ph = pyhessian_trace_and_top_eig(model, x, y, params=params, seed=args.probe_seed)
    ours = hutchinson_trace(type(op)(model, [(x, y)], params=params, engine=op.engine),
                            num_matvecs=args.probes or 32, seed=args.probe_seed)
    return {"pyhessian_first_batch": ph.to_dict(), "ours_first_batch": ours.to_dict()}


def _print_hessian(out: dict, domain: str, n_images: int) -> None:
    print(f"Hessian of L_cls at θ_ft of '{domain}' on {n_images} train images")
    if "trace" in out:
        t, h = out["trace"], out["hutchpp"]
        lo, hi = t["ci95_low"], t["ci95_high"]
        print(f"  trace (Hutchinson, {t['n_matvecs']} probes): {t['value']:.6g} ± {t['stderr']:.2g}  "
              f"95% CI [{lo:.6g}, {hi:.6g}]")
        print(f"  trace (Hutch++, {h['n_matvecs']} products):  {h['value']:.6g} ± {h['stderr']:.2g}")
    if "diag" in out:
        d = out["diag"]
        print(f"  diagonal (Hutchinson, {d['n_matvecs']} probes): total {d['total']:.6g} ± "
              f"{d['total_stderr']:.2g}; saved {out['path']}")
        for name, val in out["per_tensor_top"].items():
            print(f"    {name:60s} {val: .4g}")
    if "card" in out:
        c = out["card"]
        if c.get("form") == "kfac":
            print(f"  K-FAC card ({c['layers']} layers, {c['uncovered']} parameters on the diagonal, "
                  f"{c['megabytes']:.1f} MB) saved to {out['path']}")
        else:
            print(f"  Hessian card k={c.get('k')} saved to {out['path']}")
            print(f"  top eigenvalues: {', '.join(f'{v:.4g}' for v in c.get('eigvals', []))}")
        if c.get("trace") is not None:
            print(f"  trace {c['trace']:.6g} ± {c.get('trace_stderr') or 0:.2g}")
    if "pyhessian_first_batch" in out:
        ph, ours = out["pyhessian_first_batch"], out["ours_first_batch"]
        print(f"  first batch: PyHessian trace {ph.get('trace_value')} ± {ph.get('trace_stderr')} "
              f"({ph.get('trace_n_probes')} probes; {ph.get('stop_rule')}), "
              f"top eig {ph.get('eigvals')}; ours {ours['value']:.6g} ± {ours['stderr']:.2g} "
              f"({ours['n_matvecs']} probes)")


def run_spectrum(args) -> int:
    ctx = context_from(args, default_domain=args.domain)
    domain = ctx.check_domain(args.domain)
    diag = _diagnostics(args, ctx, [domain], explain=False)
    op = diag.operator(domain)
    eig = lanczos_topk(op, args.k, seed=args.probe_seed)
    dens = slq_density(op, num_probes=args.probes, num_iters=args.iters, seed=args.probe_seed)
    out_png = args.out or str(diag.store.curvature_dir(domain) / "spectrum.png")
    _plot_density(dens, eig, out_png, domain)
    result = {"domain": domain, "top": eig.to_dict(), "density": dens.to_dict(), "figure": out_png}
    if args.json:
        emit_json(result)
        return 0
    print(f"Top-{args.k} Hessian eigenvalues at θ_ft of '{domain}' (Lanczos, {eig.n_matvecs} products):")
    for i, (val, res) in enumerate(zip(eig.eigvals.tolist(), eig.residuals.tolist())):
        print(f"  λ{i + 1} = {val:.6g}   residual ‖Hv − λv‖ = {res:.2g}")
    tr = dens.trace()
    print(f"SLQ density ({dens.n_probes} probes × {args.iters} steps): trace {tr.value:.6g} ± {tr.stderr:.2g}; "
          f"figure {out_png}")
    return 0


def _plot_density(dens, eig, path, domain) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(dens.grid.numpy(), dens.density.numpy(), label="SLQ density")
    if dens.stderr is not None:
        lo, hi = (dens.density - 1.96 * dens.stderr).numpy(), (dens.density + 1.96 * dens.stderr).numpy()
        ax.fill_between(dens.grid.numpy(), lo, hi, alpha=0.3, label="95% CI (probes)")
    for v in eig.eigvals.tolist():
        ax.axvline(v, color="C3", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectrum at θ_ft ({domain}); dashed: Lanczos top-k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_risk(args) -> int:
    ctx = context_from(args, default_domain=args.target)
    source, target = ctx.check_domain(args.source), ctx.check_domain(args.target)
    diag = _diagnostics(args, ctx, [source, target], explain=True)
    risks = diag.risks(source, target, exact=True)
    curv = diag.curvature(target, need_operator=True, need_eig=True)
    tau = curv.card.layout.flatten(diag.vector(source, "star").tensors, dtype=curv.operator.dtype)
    contrib, remainder = eigen_contributions(curv.eig.eigvals, curv.eig.eigvecs, tau.double())
    checks = []
    if args.check:  # cross-fitted: g and R on the curvature's (train) images, ΔL on the val images
        val = diag.ws.target_set(target, CHOICE_SPLIT, CHECK_IMAGES)
        score = [(val.x[i:i + 128], val.y[i:i + 128]) for i in range(0, len(val.y), 128)]
        checks = quadratic_check(curv.operator.model, curv.operator.data, tau, ts=tuple(args.check),
                                 op=curv.operator, score_data=score)
    lam = args.lambda2
    curved = {k: v for k, v in risks.items() if k.startswith("risk_") and k != "risk_diag_se"}
    out = {"source": source, "target": target, "alpha": args.alpha, "lambda2": lam, **risks,
           "predicted_loss_increase": predicted_loss_increase(curved, lam, risks.get("grad_dot_tau")),
           "eigen_contributions": contrib.tolist(), "eigvals": curv.eig.eigvals.tolist(),
           "quadratic_check": [c.to_dict() for c in checks]}
    check_finite_result({k: out[k] for k in ("predicted_loss_increase", "eigen_contributions")}, "risk")
    if args.json:
        emit_json(out)
        return 0
    print(f"R(τ*ˢ; Hᵀ) for {source} → {target} (Hᵀ at θ_ftᵀ, {diag.settings.n_images} target train images)")
    for name in ("risk_exact", "risk_card", "risk_diag"):
        se, half = risks.get(f"{name}_se"), 0.5 * lam ** 2
        pm, half_pm = ("", "") if se is None else (f" ± {se:.2g}", f" ± {half * se:.2g}")
        print(f"  {name:11s} {risks[name]: .6g}{pm}   λ2·gᵀτ + ½λ2²R at λ2={lam:g}: "
              f"{out['predicted_loss_increase'][name]: .4g}{half_pm}")
    print(f"  gᵀτ = {risks['grad_dot_tau']:.4g} (g on the target's train images, stored in the card)")
    print(f"  risk_card from the {diag.card_form} card; eigen-contributions λ_i a_i² on Hᵀ's top eigenpairs:")
    for i, (ev, c) in enumerate(zip(curv.eig.eigvals.tolist(), contrib.tolist())):
        print(f"    λ{i + 1}={ev:.4g}: {c:.4g}")
    print(f"    ‖τ outside the top-k eigenvectors‖² = {remainder:.4g} (the eig card's residual diagonal covers it)")
    if checks:
        print("  loss model check (ΔL on val images, g and R on train images)  t: measured ΔL ± paired se "
              "[the two halves of the images] | t·gᵀτ + ½t²R | rel. error | logit-space model ± se")
        for c in checks:
            d = c.to_dict()
            near = abs(d["predicted"] - d["measured"]) <= CONSISTENT_Z * d["measured_se"]
            print(f"    t={d['t']:<5g} {d['measured']: .5g} ± {d['measured_se']:.2g} [{d['measured_half_a']:.3g}, "
                  f"{d['measured_half_b']:.3g}] | {d['predicted']: .5g} | {d['rel_error']:.2f}"
                  f"{'  (holds)' if d.get('holds') else '  (within the measurement noise)' if near else ''}"
                  f" | {d['logit_predicted']: .5g} ± {d['logit_predicted_se']:.2g}"
                  f"{'' if d['logit_valid'] else '  (beyond its valid range)'}")
        print("    logit-space model: the logits' second-order expansion along τ under the exact cross-entropy; "
              "valid while it holds within ×1.5 on its own (train) images")
        print(f"    gᵀτ = {checks[0].g_tau:.4g} ± {checks[0].g_tau_se:.2g} (se over the train images)")
    return 0


def run_bench(args) -> int:
    if args.what == "rank":
        out = bench_rank(args.n_params, args.n_sources, args.k)
        if args.json:
            print(json.dumps(out))
            return 0
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in out.items() if not isinstance(v, dict)))
        for name, text in out.get("what", {}).items():  # what each time covers, one line each
            print(f"  {name}: {text}")
        return 0

    store_model = None
    if args.domain is not None:
        if not args.probes:
            raise TvdiagError("--domain times the estimators: give --probes N too")
        ctx = context_from(args, default_domain=args.domain)
        domain = ctx.check_domain(args.domain)
        ctx.ensure([domain], explain=False)
        store_model = (domain, ctx.workspace())
    return bench_main(quick=args.quick, json_out=args.json, repeats=args.repeats or 3, probes=args.probes,
                      models=tuple(args.models) if args.models else BENCH_MODELS, store_model=store_model)
