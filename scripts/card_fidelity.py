"""How close each Hessian-card form comes to the exact risk R(τ*ˢ; Hᵀ) = τ*ˢᵀ Hᵀ τ*ˢ, and at what size.

For every (target, training seed) of a study table the script rebuilds, from the store and on the
images the study's card used (the target's first ``n_images`` train images at θ_ftᵀ), the
Kronecker-factored card (:func:`diag.curvature.kfac.build_kfac_cards`: type-2 GGN factors per
linear layer, tokens expanded — and the "reduce" convention beside it — with the store's Hutchinson
diagonal on the uncovered parameters and the eig card's gradient g), and scores every source's τ*ˢ
with it next to the table's ``risk_exact``, ``risk_card`` (top-k eigenpairs + residual diagonal)
and ``risk_diag``. Variants: the hybrid adds the eig card's top-k correction to K-FAC,
``R_hyb = R_kfac + Σ_i (l_i − v_iᵀ K v_i)(v_iᵀ τ)²`` (K the K-FAC card's matrix); "diag→H diag" replaces
K's diagonal by the Hutchinson diagonal; "trace-scaled" scales each layer's block to the Hutchinson trace on
its entries (:func:`diag.curvature.kfac.trace_scales`, the form ``diag card --card-form kfac`` writes).
With ``--ggn`` the references: the exact GGN, its covered-layer part, that part's block diagonal (what any
per-layer card is capped by) and a per-image reduced form.

Per form it prints the share of pairs with R_form / R_exact within ×1.5, the median ratio, the
Spearman correlation with R_exact (all pairs, and the mean of per-(target, seed) correlations),
the same after a leave-one-target-out calibration (scale = median R_exact / R_form over the other
targets' pairs), and the card's size in MB at the store's backbone and at ViT-B/32 (from shapes:
float32 factors as packed triangles, float64 eigenvectors and diagonals, a float32 gradient).

The store is only read: the K-FAC cards are written under ``--out``; a (target, seed) whose
curvature the study has not cached is refused rather than built.

    TVDIAG_STORE=/work/store python scripts/card_fidelity.py --study /work/out/allpairs --out OUT [--json]

Without ``--study`` (a study still running), ``--targets`` and ``--seeds`` name the pairs and risk_exact is
computed from the store the way the study computes it (one HVP on the curvature's images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from diag.constants import PAPER_ALPHA  # noqa: E402
from diag.curvature import GGNOperator, risk_diagonal, risk_exact  # noqa: E402
from diag.curvature.kfac import build_kfac_cards, card_bytes, covered_layers, KfacCard, trace_scales  # noqa: E402
from diag.curvature.kfac.factors import class_gradients, layer_passes  # noqa: E402
from diag.features.pair_features import CurvatureSettings, Diagnostics  # noqa: E402
from diag.runtime.context import Context  # noqa: E402
from diag.table import load_study, select_run  # noqa: E402
from train.errors import ArtifactError  # noqa: E402

WITHIN = 1.5
VITB32 = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}}


def _store_files(folder: Path) -> dict[str, tuple[float, int]]:
    return {str(p): (p.stat().st_mtime, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def _changed(before: dict, after: dict) -> list[str]:
    """Store files added, removed or rewritten between two listings."""
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def _kfac_cards(diag: Diagnostics, target: str, seed: int, out: Path, approxes: list[str]):
    """The K-FAC cards of (target, seed), loaded from ``out`` or built on the card's images and saved there."""
    paths = {ap: out / "cards" / f"seed{seed}" / f"{target}-kfac-{ap}.safetensors" for ap in approxes}
    if all(p.is_file() for p in paths.values()):
        return {ap: KfacCard.load(p) for ap, p in paths.items()}
    curv, op = diag.curvature(target), diag.operator(target)
    cards = build_kfac_cards(op.model, op.data, params=list(op.param_names), hessian_diag=curv.diag,
                             gradient=curv.card.gradient, approxes=tuple(approxes),
                             provenance={"target": target, "seed": seed, "key": diag._curvature_key(target),
                                         "point": "theta_ft of the target", "n_images": diag.settings.n_images})
    for ap, p in paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        cards[ap].save(p)
    return cards


def ggn_covered(model, data, layers: list, taus: list[dict]) -> tuple[torch.Tensor, ...]:
    """``(full, block-diagonal, per-image reduced)`` GGN risks of each τ restricted to the covered layers:
    with ``u_ncl = Σ_t g_ntcᵀ T_l a_nt`` (exact: the layer's part of the logits' derivative along τ, seen
    through S_nᵀ), full = (1/N) Σ_nc (Σ_l u_ncl)² and block-diagonal = (1/N) Σ_ncl u_ncl², from the factors'
    own pass; per-image reduced replaces u_ncl by ``(Σ_t g_ntc)ᵀ T_l mean_t(a_nt)`` (what a card of per-image
    reduced activations and gradients would score, cross-layer terms kept)."""
    S = len(taus)
    full, block, n = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64), 0
    reduced = torch.zeros(S, dtype=torch.float64)
    blocks = [torch.stack([sp.block(t) for t in taus]) for sp in layers]  # (S, out, a_dim)
    for logits, outs in layer_passes(model, data, layers):
        B = logits.shape[0]
        P = [torch.einsum("ri,soi->sro", a, blocks[j].to(a.dtype)) for j, a, _ in outs]
        Pbar = [p.reshape(S, B, -1, p.shape[-1]).mean(2) for p in P]  # T_l mean_t a_nt
        for grads in class_gradients(layers, logits, outs):
            total = torch.zeros(S, B, dtype=torch.float64)
            red = torch.zeros(S, B, dtype=torch.float64)
            for p, pb, g in zip(P, Pbar, grads):
                if g is not None:
                    u = torch.einsum("sro,ro->sr", p, g).reshape(S, B, -1).sum(-1).double()
                    total += u
                    block += u.pow(2).sum(1)
                    red += torch.einsum("sbo,bo->sb", pb, g.reshape(B, -1, g.shape[-1]).sum(1)).double()
            full += total.pow(2).sum(1)
            reduced += red.pow(2).sum(1)
        n += B
    return full / n, block / n, reduced / n


def _ggn_rows(diag: Diagnostics, target: str, seed: int, sources: list[str], out: Path, layers: list
              ) -> dict[str, dict]:
    """source → the GGN references of τ*ˢ on (target, seed): the exact GGN (one product), its covered-layer part,
    that part's block diagonal and the per-image reduced form (:func:`ggn_covered`); cached under ``out``."""
    path = out / "ggn" / f"seed{seed}" / f"{target}.csv"
    cached = pd.read_csv(path).set_index("source").to_dict("index") if path.is_file() else {}
    todo = [s for s in sources if s not in cached]
    if todo:
        op = diag.operator(target)
        G = GGNOperator(op.model, op.data)
        taus = [diag.vector(src, "star").tensors for src in todo]
        full, block, red = ggn_covered(op.model, op.data, layers, taus)
        for i, (src, tau) in enumerate(zip(todo, taus)):
            t = G.flatten(tau)
            cached[src] = {"risk_ggn": float(t.double() @ (G @ t).double()), "risk_ggn_covered": float(full[i]),
                           "risk_ggn_covered_blockdiag": float(block[i]), "risk_per_image_reduced": float(red[i])}
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame.from_dict(cached, orient="index").rename_axis("source").reset_index().to_csv(path, index=False)
    return {s: cached[s] for s in sources}


def target_rows(diag: Diagnostics, target: str, seed: int, sources: list[str], out: Path,
                approxes: list[str], ggn: bool) -> list[dict]:
    """One row per source: every form's risk of τ*ˢ on Hᵀ of (target, seed)."""
    for path in (diag.card_path(target), diag.diag_path(target)):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the study has not cached {target}'s curvature for seed {seed} "
                                "(this script reads the store, it never builds into it)")
    curv = diag.curvature(target)
    cards = _kfac_cards(diag, target, seed, out, approxes)
    V, lam = curv.card.eigvecs.double(), curv.card.eigvals.double()
    corr = {ap: torch.tensor([float(lam[i]) - c.risk(V[:, i]) for i in range(len(lam))], dtype=torch.float64)
            for ap, c in cards.items()}
    dcorr = {ap: curv.diag.double() - c.diagonal() for ap, c in cards.items()}
    scales = {ap: trace_scales(c, curv.diag).tolist() for ap, c in cards.items()}
    ref = _ggn_rows(diag, target, seed, sources, out, list(cards[approxes[0]].layers)) if ggn else {}
    rows = []
    for source in sources:
        tau = curv.card.layout.flatten(diag.vector(source, "star").tensors, dtype=torch.float64)
        a2 = (V.T @ tau).pow(2)
        row = {"source": source, "target": target, "seed": seed, "risk_card_recomputed": curv.card.risk(tau),
               "risk_diag_recomputed": risk_diagonal(curv.diag, tau)}
        for ap, c in cards.items():
            kf, fb = c.risk_parts(tau)
            row[f"risk_kfac_{ap}"] = kf + fb
            row[f"risk_kfac_{ap}_fallback"] = fb
            row[f"risk_hybrid_{ap}"] = kf + fb + float((corr[ap] * a2).sum())
            row[f"risk_kfac_{ap}_diagcorr"] = kf + fb + float((dcorr[ap] * tau.pow(2)).sum())
            row[f"risk_kfac_{ap}_tracescaled"] = fb + sum(a * b for a, b in zip(scales[ap], c.layer_risks(tau)))
        row.update(ref.get(source, {}))
        rows.append(row)
    return rows


def _loto(df: pd.DataFrame, col: str) -> pd.Series:
    """``col`` scaled per target by the median R_exact / R_form of the other targets' pairs."""
    ratio = df["risk_exact"] / df[col]
    scale = {t: float(ratio[df["target"] != t].median()) for t in df["target"].unique()}
    return df[col] * df["target"].map(scale)


def fidelity(df: pd.DataFrame, values: pd.Series) -> dict:
    """Within-×1.5 share, median ratio, Spearman with R_exact (all pairs; mean per (target, seed))."""
    ratio = values / df["risk_exact"]
    per = [spearmanr(values[g.index], g["risk_exact"]).statistic
           for _, g in df.groupby(["target", "seed"]) if len(g) >= 3]
    return {"within_1.5": float(((ratio >= 1 / WITHIN) & (ratio <= WITHIN)).mean()),
            "median_ratio": float(ratio.median()),
            "spearman": float(spearmanr(values, df["risk_exact"]).statistic),
            "spearman_per_target": float(np.nanmean(per)) if per else float("nan")}


def sizes(model_dim: int, layers: list, k: int) -> dict[str, float]:
    """MB per card of each form (float32 gradient on every form)."""
    g = model_dim * 4
    kfac = card_bytes(layers, model_dim)
    eig = model_dim * k * 8 + k * 8
    covered = sum(sp.out_dim * sp.a_dim for sp in layers)
    return {"eig+diag": (eig + model_dim * 8 + g) / 1e6, "diag": (model_dim * 8 + g) / 1e6,
            "kfac": kfac / 1e6, "hybrid": (kfac + eig) / 1e6, "kfac+fulldiag": (kfac + covered * 8) / 1e6,
            "gradient": g / 1e6}


def vitb32_shapes() -> tuple[int, list]:
    """(D, covered layers) of the ViT-B/32 vision tower, built on the meta device (no memory, no weights)."""
    from open_clip.model import _build_vision_tower  # defer: only for the size table

    with torch.device("meta"):
        visual = _build_vision_tower(VITB32["embed_dim"], VITB32["vision_cfg"])
    return sum(p.numel() for p in visual.parameters()), covered_layers(visual)


def forms(approxes: list[str], ggn: bool) -> dict[str, tuple[str, str]]:
    """Form name → (table column, size key)."""
    out = {"eig8+diag (today)": ("risk_card", "eig+diag"), "diag alone": ("risk_diag", "diag")}
    for ap in approxes:
        out[f"kfac-{ap}+diag"] = (f"risk_kfac_{ap}", "kfac")
        out[f"kfac-{ap}+eig8 hybrid"] = (f"risk_hybrid_{ap}", "hybrid")
        out[f"kfac-{ap}, diag→H diag"] = (f"risk_kfac_{ap}_diagcorr", "kfac+fulldiag")
        out[f"kfac-{ap} trace-scaled"] = (f"risk_kfac_{ap}_tracescaled", "kfac")
    if ggn:
        out["exact GGN (reference)"] = ("risk_ggn", None)
        out["exact GGN, covered layers"] = ("risk_ggn_covered", None)
        out["exact GGN, covered, blockdiag"] = ("risk_ggn_covered_blockdiag", None)
        out["per-image reduced (covered)"] = ("risk_per_image_reduced", None)
    return out


def summarize(df: pd.DataFrame, approxes: list[str], ggn: bool, tiny: dict, vitb: dict) -> dict:
    out = {}
    for name, (col, size) in forms(approxes, ggn).items():
        out[name] = {**fidelity(df, df[col]), "loto_calibrated": fidelity(df, _loto(df, col)),
                     "mb_store_backbone": tiny.get(size), "mb_vitb32": vitb.get(size)}
    return out


def render(summary: dict) -> str:
    head = (f"{'form':30s} {'×1.5':>6s} {'median':>7s} {'ρ all':>6s} {'ρ/tgt':>6s} | {'LOTO ×1.5':>9s} "
            f"{'median':>7s} {'ρ all':>6s} | {'MB tiny':>8s} {'MB B/32':>8s}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        c = s["loto_calibrated"]
        mb = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"{name:30s} {s['within_1.5']:6.2f} {s['median_ratio']:7.3f} {s['spearman']:6.3f} "
                     f"{s['spearman_per_target']:6.3f} | {c['within_1.5']:9.2f} {c['median_ratio']:7.3f} "
                     f"{c['spearman']:6.3f} | {mb(s['mb_store_backbone']):>8s} {mb(s['mb_vitb32']):>8s}")
    return "\n".join(lines)


def _has_star(diag: Diagnostics, domain: str) -> bool:
    try:
        diag.vector(domain, "star")
        return True
    except ArtifactError:
        return False


def cards_only(ctx: Context, args) -> int:
    """Build the K-FAC cards of the (target, seed)s whose curvature is cached; skip the others."""
    for seed in args.seeds or [0]:
        diag = Diagnostics(ctx.workspace(PAPER_ALPHA, seed=seed, variant=args.variant), settings=CurvatureSettings(card_form="eig"),
                           data_parallel=False)
        domains = args.targets or ctx.store.vector_domains()
        for target in domains:
            try:
                ready = diag.card_path(target).is_file() and diag.diag_path(target).is_file()
            except ArtifactError:  # its θ_ft of this seed is not built yet
                ready = False
            if ready:
                cards = _kfac_cards(diag, target, seed, args.out, args.approx)
                if args.ggn:
                    sources = [d for d in domains if d != target and _has_star(diag, d)]
                    _ggn_rows(diag, target, seed, sources, args.out, list(cards[args.approx[0]].layers))
                print(f"seed {seed} {target}: K-FAC cards ready", file=sys.stderr, flush=True)
    return 0


def store_table(ctx: Context, seeds: list[int], targets: list[str], variant: str, out: Path) -> pd.DataFrame:
    """What a study table would say, without one: per ordered pair among ``targets`` whose target curvature is
    cached, risk_exact (one HVP on the curvature's images, :func:`diag.curvature.risk_exact`, as the study does;
    cached under ``out``), risk_card and risk_diag from the cached card and diagonal."""
    rows = []
    for seed in seeds:
        diag = Diagnostics(ctx.workspace(PAPER_ALPHA, seed=seed, variant=variant), settings=CurvatureSettings(card_form="eig"),
                           data_parallel=False)
        for target in targets:
            try:
                ready = diag.card_path(target).is_file() and diag.diag_path(target).is_file()
            except ArtifactError:
                ready = False
            if not ready:
                continue
            path = out / "exact" / f"seed{seed}" / f"{target}.csv"
            cached = pd.read_csv(path).set_index("source")["risk_exact"].to_dict() if path.is_file() else {}
            curv, op = diag.curvature(target), None
            for source in [d for d in targets if d != target and _has_star(diag, d)]:
                tau = curv.card.layout.flatten(diag.vector(source, "star").tensors, dtype=torch.float64)
                if source not in cached:
                    op = op or diag.operator(target)
                    cached[source] = risk_exact(op, tau.to(op.dtype))
                rows.append({"source": source, "target": target, "seed": seed, "alpha": PAPER_ALPHA,
                             "risk_exact": cached[source], "risk_card": curv.card.risk(tau),
                             "risk_diag": risk_diagonal(curv.diag, tau)})
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.Series(cached, name="risk_exact").rename_axis("source").reset_index().to_csv(path, index=False)
    return pd.DataFrame(rows)


def _finite(obj):
    """The summary with NaN as null (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=None, help="study folder (pairs.csv)")
    p.add_argument("--cards-only", action="store_true",
                   help="only build the K-FAC cards (and with --ggn the GGN references against every source the store "
                        "has) of every (target, seed) whose curvature the store already caches (no study table "
                        "needed: --seeds and --targets say which), then stop")
    p.add_argument("--store", type=Path, default=os.environ.get("TVDIAG_STORE"), help="default $TVDIAG_STORE")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", required=True, type=Path, help="where K-FAC cards, pairs and the summary go")
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="default: every seed of the table")
    p.add_argument("--targets", nargs="*", default=None)
    p.add_argument("--variant", default="paper")
    p.add_argument("--approx", nargs="+", default=["expand", "reduce"], choices=("expand", "reduce"))
    p.add_argument("--ggn", action="store_true", help="also the exact GGN risk (one GGN product per pair)")
    p.add_argument("--name", default="card_fidelity", help="file names of the pairs table and summary under --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = Context(store_root=args.store, preset=args.preset, progress=False)
    if args.cards_only:
        return cards_only(ctx, args)
    if args.study is None and not args.targets:
        p.error("--study is required (unless --cards-only, or --targets for a table computed from the store)")
    table = (select_run(load_study(args.study), args.variant, "all").drop_duplicates(["source", "target", "seed"])
             if args.study is not None else store_table(ctx, args.seeds or [0], args.targets, args.variant, args.out))
    seeds = sorted(set(int(s) for s in table["seed"])) if args.seeds is None else args.seeds
    targets = sorted(table["target"].unique()) if args.targets is None else args.targets
    store_dir = ctx.store.folder
    before = _store_files(store_dir)
    rows = []
    for seed in seeds:
        ws = ctx.workspace(float(table["alpha"].iloc[0]), seed=seed, variant=args.variant)
        diag = Diagnostics(ws, settings=CurvatureSettings(card_form="eig"), data_parallel=False)
        for target in targets:
            sub = table[(table["seed"] == seed) & (table["target"] == target)]
            if len(sub):
                rows += target_rows(diag, target, seed, list(sub["source"]), args.out, args.approx, args.ggn)
                print(f"seed {seed} {target}: {len(sub)} sources", file=sys.stderr, flush=True)
    cols = ["source", "target", "seed", "risk_exact", "risk_card", "risk_diag"]
    df = pd.DataFrame(rows).merge(table[cols], on=["source", "target", "seed"]).reset_index(drop=True)
    df.to_csv(args.out / f"{args.name}_pairs.csv", index=False)

    model_card = KfacCard.load(next((args.out / "cards").rglob("*-kfac-expand.safetensors"), None)
                               or next((args.out / "cards").rglob("*.safetensors")))
    k = int(diag.settings.k)
    tiny = sizes(model_card.dim, list(model_card.layers), k)
    vitb = sizes(*vitb32_shapes(), k)
    summary = {"n_pairs": len(df), "seeds": seeds, "targets": targets, "forms": summarize(df, args.approx, args.ggn,
                                                                                           tiny, vitb),
               "uncovered": {"names": list(model_card.uncovered_names), "count": len(model_card.uncovered_index),
                             "dim": model_card.dim},
               "card_recomputed_max_rel_diff": float(((df["risk_card_recomputed"] - df["risk_card"]).abs()
                                                      / df["risk_card"].abs()).max()),
               "store_changed_during_run": _changed(before, _store_files(store_dir))}
    text = json.dumps(_finite(summary), indent=1, allow_nan=False)
    (args.out / f"{args.name}.json").write_text(text)
    print(text if args.json else render(summary["forms"]))
    if not args.json:
        print(f"{len(df)} pairs; K-FAC leaves {summary['uncovered']['count']} of {model_card.dim} parameters to the "
              f"diagonal; store files changed while it ran (by other writers: this script writes under --out only): "
              f"{summary['store_changed_during_run'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
