"""Every number of the README's committed results, regenerated from the tables under ``results/``.

``results/<run>/pairs.csv`` (with its check file and provenance side file) are study tables as
``diag study`` wrote them. This script reads them (validated: a table whose check file does not
agree is refused), computes the headline counts against every control, the image-level test
(ρ̄), Table 1's analog and Appendix C's correlations, and renders the Markdown block that sits
between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in README.md.

    python scripts/results_report.py            # print the block
    python scripts/results_report.py --check    # exit 1 when README.md's block differs
    python scripts/results_report.py --write    # rewrite README.md's block

The test suite runs ``--check`` (tests/test_results.py): the README's numbers are the tables'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from diag.constants import PAPER_LAMBDA2  # noqa: E402
from diag.stats import correlate_appendix_c  # noqa: E402
from diag.study.report import study_report  # noqa: E402
from diag.study.summary import summarize  # noqa: E402
from diag.study.methods_report import method_report  # noqa: E402
from diag.table import load_study, read_checked_csv, select_run, with_run_columns  # noqa: E402
from equal_norm import render as equal_norm_table, summarize_forms  # noqa: E402
from results_seeds import full_seeds_block, loss_model_block, outside_block, seeds_block  # noqa: E402

RESULTS = ROOT / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
N_RESAMPLE = 2000


def _runs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("*/pairs.csv"))


def _provenance(folder: Path) -> str:
    return _provenance_of(folder / "pairs.csv")


def _provenance_of(table: Path) -> str:
    side = table.with_name(table.name + ".provenance.json")
    if not side.is_file():
        return "provenance: none recorded"
    entries = json.loads(side.read_text())
    codes = sorted({(e["code"]["commit"][:10] + ("+dirty" if e["code"]["dirty"] else "")) for e in entries.values()})
    threads = sorted({str(e["torch_threads"]) for e in entries.values()})
    return f"commit {', '.join(codes)}, {', '.join(threads)} torch thread(s)"


def _block_of_run(folder: Path) -> list[str]:
    df = load_study(folder)
    lines = []
    for variant in sorted(df["variant"].unique()):
        seeds = sorted(int(s) for s in df[df["variant"] == variant]["seed"].unique())
        if len(seeds) > 1:
            lines += seeds_block(folder, select_run(df, variant, "all"), variant, seeds, _provenance(folder))
            continue
        for seed in seeds:
            run = select_run(df, variant, seed)
            lines += _block_of_one(folder, run, variant, seed)
    return lines


def _block_of_one(folder: Path, run, variant: str, seed: int) -> list[str]:
    s = summarize(run, PAPER_LAMBDA2)
    n, c, i = s.n_pairs, s.corr, s.image
    out = [f"**`results/{folder.name}`** — variant `{variant}`, training seed {seed}, λ2 = {PAPER_LAMBDA2:g}, "
           f"{n} ordered pairs ({_provenance(folder)}):", "",
           "| count (of the pairs) | value |", "| --- | --- |",
           f"| E-RMSE < θ_ftᵀ's with ≥ 90 % of its accuracy (headline) | {s.n_better_keep90} |",
           f"| E-RMSE < θ_ftᵀ's (any accuracy) | {s.n_lower_ermse} |",
           f"| accuracy ≥ 90 % of θ_ftᵀ's | {s.n_keep90} |"]
    for ctrl, label in (("random", "the random direction (τ*ˢ's norms)"), ("other_rescaled",
                        "τ* of another source at ‖τ*ˢ‖"), ("meanmap", "the source's mean-φ map")):
        if s.n_controls.get(ctrl):
            out.append(f"| E-RMSE below {label} | {getattr(s, f'n_beat_{ctrl}')} |")
    if i:
        out += [f"| ρ̄ > 0, 95 % CI over images | {i['signal']} |",
                f"| ρ̄ above τ* of another source at ‖τ*ˢ‖ (paired per-image test, 95 %) | {i['beats_other_rescaled']} |",
                f"| ρ̄ above θ_ftᵀ's (paired per-image test, 95 %) | {i['beats_ft_target']} |",
                f"| θ_ft*ᵀ (in-domain upper bound): ρ̄ > 0 | {i['upper_signal']} |"]
    out += ["", f"Mean normalised E-RMSE {s.mean_ermse_norm:.3f} ± {s.mean_ermse_norm_se:.3f} and accuracy "
            f"{s.mean_acc_norm:.3f} ± {s.mean_acc_norm_se:.3f} (÷ θ_ftᵀ; ± se over pairs, which share domains)."]
    if c:
        out.append(f"Mean image-specific correlation ρ̄ (chance and any fixed prior 0): proposed "
                   f"{c.get('proposed', float('nan')):+.3f}, θ_ftᵀ {c.get('ft_target', float('nan')):+.3f}, τ* of "
                   f"another source at ‖τ*ˢ‖ {c.get('other_rescaled', float('nan')):+.3f}, θ_ft*ᵀ upper bound "
                   f"{c.get('ftx_target', float('nan')):+.3f}.")
    if c and i:
        out.append(_reading(n, c, i))
    reports = correlate_appendix_c(run[run["lambda2"].round(6) == PAPER_LAMBDA2], n_boot=N_RESAMPLE,
                                   n_perm=N_RESAMPLE, seed=0)
    out.append("Appendix C (Pearson r over the pairs, two-way bootstrap 95 % CI; paper's r): " + "; ".join(
        f"{r.x} vs {r.y} {r.pearson_r:+.2f} [{r.ci95[0]:+.2f}, {r.ci95[1]:+.2f}]"
        + (f" (paper {r.paper_r:+.2f})" if r.paper_r is not None else "") for r in reports) + ".")
    report = study_report(run, PAPER_LAMBDA2)
    table = report.variants[0].table1 if report.variants else None
    if table is not None:
        cells = []
        for model, r in table.iterrows():
            cells.append(f"{model} {r['accuracy_mean']:.3f} / {r['ermse_mean']:.3f} / ρ̄ {r['corr_img_mean']:+.3f}"
                         if "corr_img_mean" in r else f"{model} {r['accuracy_mean']:.3f} / {r['ermse_mean']:.3f}")
        out.append(f"Table 1 analog (source {report.source}, mean over its targets; accuracy / E-RMSE / ρ̄): "
                   + "; ".join(cells) + ".")
    return out + [""]


def _reading(n: int, c: dict, i: dict) -> str:
    """The image-level conclusion, in words chosen by the numbers (so it is regenerated with them)."""
    prop, other, ft, upper = (c.get(k, float("nan")) for k in ("proposed", "other_rescaled", "ft_target", "ftx_target"))
    source_specific = i["beats_other_rescaled"] > n / 2
    words = ("**Reading:** the transfer carries image-level signal specific to its source (ρ̄ above τ* of another "
             "source at the same norm in most pairs)" if source_specific else
             "**Reading:** on this suite the transfer carries no source-specific image-level signal: ρ̄ of the "
             f"proposed model ({prop:+.3f}) is that of τ* of another source at the same norm ({other:+.3f}), above it "
             f"in only {i['beats_other_rescaled']} of {n} pairs")
    if ft < 0 < upper:
        words += (f"; it moves θ_ftᵀ's maps (ρ̄ {ft:+.3f}) toward a generic prior (ρ̄ 0), which is why it is 'above "
                  f"θ_ftᵀ' in {i['beats_ft_target']} pairs, while the in-domain θ_ft*ᵀ shows what is learnable "
                  f"({upper:+.3f}, above 0 in {i['upper_signal']} of {n})")
    return words + "."


def methods_block(path: Path) -> list[str]:
    """A method study (``diag study --methods ...``; no curvature): its report, a mix counted once per target."""
    table = with_run_columns(read_checked_csv(path))
    seeds = sorted(int(s) for s in table["seed"].unique())
    methods = sorted(table["method"].unique())
    report = method_report(table)
    return [f"**`results/{path.parent.name}/{path.name}`** — methods {', '.join(methods)}; seeds "
            f"{', '.join(map(str, seeds))}; {_provenance_of(path)} (`diag study --methods …`, its report):", "",
            "```text", *report.table().splitlines(), "```", ""]


def equal_norm_block(path: Path) -> list[str]:
    """``scripts/equal_norm.py``'s table: from-ft (against its twin, and raw) rescaled to the paper variant's step."""
    table = read_checked_csv(path)
    seeds = sorted(int(s) for s in table["seed"].unique())
    return [f"**`results/{path.parent.name}/{path.name}`** — from-ft against its α = 1 twin and raw, each rescaled "
            f"per source to ‖{PAPER_LAMBDA2:g}·τ*ˢ‖ of the paper variant, on the test split of every pair of seed "
            f"{', '.join(map(str, seeds))} (`scripts/equal_norm.py`; ± se over pairs; Δ paired against the paper "
            "variant at 0.7, source × target bootstrap 95 % CI):", "",
            *equal_norm_table(summarize_forms(table)).splitlines(), ""]


def render(results: Path = RESULTS) -> str:
    """The README's results block (between the markers), from every table under ``results``."""
    runs = _runs(results)
    lines = [BEGIN, "<!-- generated by scripts/results_report.py from results/: do not edit by hand -->", ""]
    if not runs:
        lines.append("No study table is committed under `results/` yet.")
    for folder in runs:
        lines += _block_of_run(folder)
    for path in sorted(results.glob("*/loss_model.csv")):
        lines += loss_model_block(path, _provenance_of(path) if path.with_name(path.name + ".provenance.json").is_file()
                                  else "")
    for path in sorted(results.glob("*/scored.csv")):
        lines += outside_block(path)
    for path in sorted(results.glob("*/methods.csv")):
        lines += methods_block(path)
    for path in sorted(results.glob("*/equal_norm.csv")):
        lines += equal_norm_block(path)
    for path in sorted(results.glob("*/full_seeds.csv")):
        lines += full_seeds_block(path, _provenance_of(path))
    return "\n".join(lines).rstrip() + "\n" + END


def current(readme: Path = README) -> str:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} … {END} block")
    return text[text.index(BEGIN):text.index(END) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's block differs")
    parser.add_argument("--write", action="store_true", help="rewrite README.md's block")
    args = parser.parse_args()
    block = render()
    if args.write:
        README.write_text(README.read_text().replace(current(), block))
        return 0
    if args.check:
        if current() != block:
            print("README.md's results block differs from `python scripts/results_report.py`; rerun with --write",
                  file=sys.stderr)
            return 1
        return 0
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
