"""The preprint's figures from tidy tables (seaborn on matplotlib's Agg canvas, no pyplot state).

Every function takes a DataFrame and an output path, writes the figure (format from the
suffix) and returns the path.

* :func:`figure6` — Appendix C: cos(τ*) vs E-RMSE, cos(τ*) vs cos(τ_ft), cos(τ_ft) vs E-RMSE.
* :func:`figure2` — normalised accuracy vs normalised E-RMSE per (source, target) pair.
* :func:`pareto` — the same trade-off per transfer method, the Pareto front marked.
* :func:`figure3` — normalised E-RMSE, IoU@10 and accuracy over λ2, per target.
* :func:`figure5` — Kernel SHAP E-RMSE and IoU@1 over the number of perturbations P against
  the proposed model's single forward pass, with wall times.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diag.stats import APPENDIX_C, complete_pairs, pearson, with_normalised
from train.errors import DataError

LABELS = {
    "cos_star": r"cos($\tau_*^S$, $\tau_*^T$)",
    "cos_ft": r"cos($\tau_{ft}^S$, $\tau_{ft}^T$)",
    "ermse": "E-RMSE",
    "ermse_norm": "normalised E-RMSE",
    "acc_norm": "normalised accuracy",
    "iou10_norm": "normalised IoU@10",
    "iou10": "IoU@10",
    "iou1": "IoU@1",
    "lambda2": r"$\lambda_2$",
}


def _new_figure(ncols: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what} needs column(s) {', '.join(missing)}; the table has {', '.join(map(str, df.columns))}")


def figure6(df: pd.DataFrame, path: str | Path, reports: Sequence | None = None) -> Path:
    """Figure 6(a–c): the three Appendix C scatter plots with least-squares lines.

    Each panel's title gives Pearson r, its naive p-value and n; when ``reports`` (the
    :class:`diag.stats.CorrelationReport` list of :func:`diag.stats.correlate_appendix_c`) is
    given, also the pair-bootstrap CI, the permutation p and the paper's r.

    Args:
        df: pair table with ``cos_star``, ``cos_ft`` and ``ermse`` (NaN rows dropped per panel).
        path: output file.
        reports: optional correlation reports matching :data:`diag.stats.APPENDIX_C`.
    """
    import seaborn as sns

    _require(df, ["source", "target", "cos_star", "cos_ft", "ermse"], "figure6")
    by_xy = {(r.x, r.y): r for r in (reports or [])}
    fig, axes = _new_figure(3)
    for ax, (x, y, paper_r), letter in zip(axes, APPENDIX_C, "abc"):
        pairs = complete_pairs(df, x, y)
        if len(pairs) < 3:
            ax.set_title(f"({letter}) n={len(pairs)}: too few pairs")
        else:
            sns.regplot(data=pairs, x=x, y=y, ax=ax, ci=None, scatter_kws={"s": 18, "color": "tab:blue"},
                        line_kws={"color": "purple", "lw": 1.5})
        ax.set_xlabel(LABELS.get(x, x))
        ax.set_ylabel(LABELS.get(y, y))
        if len(pairs) < 3:
            continue
        rep = by_xy.get((x, y))
        if rep is not None:
            title = (f"({letter}) r={rep.pearson_r:+.2f} (p={rep.pearson_p:.1g}), n={rep.n_pairs}\n"
                     f"CI [{rep.ci95[0]:+.2f}, {rep.ci95[1]:+.2f}], perm p={rep.perm_p:.2g}; paper r={paper_r:+.2f}")
        else:
            p = pearson(pairs[x], pairs[y])
            title = f"({letter}) r={p.statistic:+.2f} (p={p.pvalue:.1g}), n={p.n}; paper r={paper_r:+.2f}"
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def figure2(df: pd.DataFrame, path: str | Path, variant_col: str = "row") -> Path:
    """Figure 2: normalised accuracy (y, higher is better) vs normalised E-RMSE (x, lower is better).

    Normalised by θ_ftᵀ (``acc_norm`` = accuracy / accuracy_ft_target, ``ermse_norm`` =
    ermse / ermse_ft_target, derived when absent).  Colour = source, marker = target.  The red
    dotted lines mark θ_ftᵀ (both 1).  If ``variant_col`` (the ``row`` label of
    :func:`diag.study.summary.figure2_frame`; not the study's θ_ft* ``variant``) is present, rows whose label is not
    ``proposed`` are controls (random vector, mean-φ prior, random source) and are drawn as
    grey markers shaped by variant; if ``acc_norm_zeroshot`` / ``ermse_norm_zeroshot`` columns
    exist, their means are drawn as grey dashed lines (θ_base).
    """
    import seaborn as sns

    df = with_normalised(df)
    _require(df, ["source", "target", "acc_norm", "ermse_norm"], "figure2")
    fig, axes = _new_figure(1, width=6.4, height=4.8)
    ax = axes[0]
    main, controls = df, df.iloc[0:0]
    if variant_col in df.columns:
        is_main = df[variant_col].isna() | (df[variant_col] == "proposed")
        main, controls = df[is_main], df[~is_main]
    main = main.dropna(subset=["acc_norm", "ermse_norm"])
    if len(main):
        sns.scatterplot(data=main, x="ermse_norm", y="acc_norm", hue="source", style="target", s=50, ax=ax)
    controls = controls.dropna(subset=["acc_norm", "ermse_norm"])
    groups = controls.groupby(variant_col) if variant_col in controls.columns else []
    for (variant, rows), marker in zip(groups, ("v", "^", "<", ">", "D", "P", "*")):
        ax.scatter(rows["ermse_norm"], rows["acc_norm"], marker=marker, s=30, facecolors="none",
                   edgecolors="0.45", label=f"control: {variant}")
    ax.axhline(1.0, color="red", ls=":", lw=1.2)
    ax.axvline(1.0, color="red", ls=":", lw=1.2, label=r"$\theta_{ft}^T$")
    for col, line in (("acc_norm_zeroshot", ax.axhline), ("ermse_norm_zeroshot", ax.axvline)):
        if col in df.columns and df[col].notna().any():
            line(float(df[col].mean()), color="0.5", ls="--", lw=1.0)
    ax.set_xlabel(LABELS["ermse_norm"] + r" ($\downarrow$)")
    ax.set_ylabel(LABELS["acc_norm"] + r" ($\uparrow$)")
    if ax.get_legend() is not None:
        ax.legend(fontsize=6, ncol=2, loc="best")
    return _save(fig, path)


def pareto(frame: pd.DataFrame, path: str | Path) -> Path:
    """Normalised accuracy (y, ↑) vs normalised E-RMSE (x, ↓) per transfer method, Pareto front marked.

    Args:
        frame: :func:`diag.study.methods_report.tradeoff_frame` — one point per (method, pair, seed) with
            ``method``, ``acc_norm``, ``ermse_norm`` and ``pareto`` (non-dominated over every method).
        path: output file.

    Colour = method; front points are ringed in black and joined by a step line (the best
    accuracy reachable at each E-RMSE); the red dotted lines mark θ_ftᵀ (both 1).
    """
    import seaborn as sns

    _require(frame, ["method", "acc_norm", "ermse_norm", "pareto"], "pareto")
    pts = frame.dropna(subset=["acc_norm", "ermse_norm"])
    if pts.empty:
        raise DataError("pareto: no point has both a normalised accuracy and a normalised E-RMSE")
    fig, axes = _new_figure(1, width=6.4, height=4.8)
    ax = axes[0]
    sns.scatterplot(data=pts, x="ermse_norm", y="acc_norm", hue="method", s=36, alpha=0.8, ax=ax)
    front = pts[pts["pareto"].astype(bool)].sort_values("ermse_norm")
    ax.scatter(front["ermse_norm"], front["acc_norm"], s=90, facecolors="none", edgecolors="black", lw=1.2,
               label="Pareto front")
    ax.step(front["ermse_norm"], front["acc_norm"], where="post", color="black", lw=0.8)
    ax.axhline(1.0, color="red", ls=":", lw=1.2)
    ax.axvline(1.0, color="red", ls=":", lw=1.2, label=r"$\theta_{ft}^T$")
    ax.set_xlabel(LABELS["ermse_norm"] + r" ($\downarrow$)")
    ax.set_ylabel(LABELS["acc_norm"] + r" ($\uparrow$)")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def figure3(df_lambda: pd.DataFrame, path: str | Path, seed: int = 0) -> Path:
    """Figure 3: normalised E-RMSE, IoU@10 and accuracy over λ2, one line per target.

    Normalisation divides by θ_ftᵀ (``iou10`` by ``iou10_ft_target`` when present, else raw
    IoU@10 is shown).  Several rows per (target, λ2) — seeds or α values — give the mean line
    and a 95 % bootstrap CI band (seaborn, ``seed`` fixed).
    """
    import seaborn as sns

    df = with_normalised(df_lambda)
    _require(df, ["target", "lambda2", "ermse_norm", "acc_norm"], "figure3")
    iou_col = None
    if "iou10" in df.columns:
        if "iou10_ft_target" in df.columns:
            df["iou10_norm"] = df["iou10"] / df["iou10_ft_target"]
            iou_col = "iou10_norm"
        else:
            iou_col = "iou10"
    panels = ["ermse_norm"] + ([iou_col] if iou_col else []) + ["acc_norm"]
    fig, axes = _new_figure(len(panels))
    for i, (ax, col, letter) in enumerate(zip(axes, panels, "abc")):
        sns.lineplot(data=df, x="lambda2", y=col, hue="target", marker="o", errorbar=("ci", 95), n_boot=200,
                     seed=seed, ax=ax, legend=(i == len(panels) - 1))
        if col.endswith("_norm"):
            ax.axhline(1.0, color="red", ls=":", lw=1.0)
        ax.set_xlabel(LABELS["lambda2"])
        ax.set_ylabel(LABELS.get(col, col))
        ax.set_title(f"({letter})")
    if axes[-1].get_legend() is not None:
        axes[-1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def figure5(df_ks: pd.DataFrame, path: str | Path, seed: int = 0) -> Path:
    """Figure 5: E-RMSE and IoU@1 of Kernel SHAP over P perturbations vs the proposed model.

    Args:
        df_ks: rows with ``method`` (``"kernelshap"`` or ``"proposed"``), ``n_perturbations``
            (P; ignored for ``proposed``), ``ermse``, ``iou1`` and optionally ``wall_s``
            (seconds per image batch) and ``target`` (several targets → mean and 95 % CI band).
        path: output file.
        seed: seed of seaborn's bootstrap.

    The proposed model is a horizontal line (its mean) with its wall time in the legend; each
    Kernel SHAP point is annotated with its mean wall time.
    """
    import seaborn as sns

    _require(df_ks, ["method", "ermse", "iou1"], "figure5")
    ks = df_ks[df_ks["method"] == "kernelshap"]
    prop = df_ks[df_ks["method"] == "proposed"]
    if ks.empty:
        raise DataError("figure5 needs rows with method == 'kernelshap'")
    _require(ks, ["n_perturbations"], "figure5")
    has_wall = "wall_s" in df_ks.columns
    fig, axes = _new_figure(2)
    for ax, col, letter in zip(axes, ("ermse", "iou1"), "ab"):
        sns.lineplot(data=ks, x="n_perturbations", y=col, marker="o", errorbar=("ci", 95), n_boot=200, seed=seed,
                     ax=ax, label="Kernel SHAP", color="tab:blue")
        if has_wall:
            means = ks.groupby("n_perturbations")[[col, "wall_s"]].mean()
            for p_, row in means.iterrows():
                ax.annotate(f"{row['wall_s']:.2g}s", (p_, row[col]), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, color="tab:blue")
        if not prop.empty:
            val = float(prop[col].mean())
            label = "proposed (1 forward pass"
            if has_wall and prop["wall_s"].notna().any():
                label += f", {float(prop['wall_s'].mean()):.2g}s"
            ax.axhline(val, color="tab:red", ls="--", lw=1.5, label=label + ")")
            if len(prop) > 1:
                se = float(prop[col].std(ddof=1) / np.sqrt(len(prop)))
                ax.axhspan(val - 1.96 * se, val + 1.96 * se, color="tab:red", alpha=0.12)
        ax.set_xlabel("Kernel SHAP perturbations P")
        ax.set_ylabel(LABELS.get(col, col) + (r" ($\downarrow$)" if col == "ermse" else r" ($\uparrow$)"))
        ax.set_title(f"({letter})")
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_similarity_heatmap(df: pd.DataFrame, path: str | Path, title: str | None = None, fmt: str = ".2f") -> Path:
    """Annotated seaborn heatmap of a similarity matrix, saved to ``path`` (PNG/PDF by suffix)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(df.index), 1)
    fig = Figure(figsize=(1.5 + 0.75 * n, 0.8 + 0.65 * n))  # no pyplot: no global figure state
    ax = fig.subplots()
    vals = df.to_numpy(dtype=float)
    off = vals[~np.eye(*vals.shape, dtype=bool)] if vals.shape[0] == vals.shape[1] else vals.ravel()
    off = off[np.isfinite(off)]
    vmax = max(float(np.max(np.abs(off))) if off.size else 1.0, 1e-6)  # colour scale from off-diagonal cosines
    sns.heatmap(df.astype(float), annot=True, fmt=fmt, cmap="vlag", center=0.0, vmin=-vmax, vmax=vmax,
                square=True, cbar_kws={"label": "cosine similarity"}, ax=ax, annot_kws={"fontsize": 8})
    ax.set_title(title or "cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
