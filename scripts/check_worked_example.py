"""Check the output of scripts/worked_example.sh (run by .ci/run beside the test suite).

    bash scripts/worked_example.sh WORK > WORK.out && python scripts/check_worked_example.py WORK WORK.out

The example writes ~8 GB and takes minutes of CPU at ViT-B/32 size, so it is a CI step of its
own rather than a test inside the suite's 10-minute budget. Exit 1 with the failed check named.
"""

import sys
from pathlib import Path


def check(work: Path, out: str) -> list[str]:
    """The failed checks (empty: the example did what the README says)."""
    from diag.curvature.kfac import load_any_card

    failed = []
    if out.count(" imported: ") != 5:  # θ_base, then θ_ft and θ_ft* (or τ*) of two sources
        failed.append(f"expected 5 imports, saw {out.count(' imported: ')}")
    store = work / "tvdiag-store" / "ViT-B-32-ckpt-base"
    names = {p.name for p in (store / "vectors").iterdir()} if (store / "vectors").is_dir() else set()
    if names != {"dtd", "resisc45"}:
        failed.append(f"store vectors {sorted(names)} != ['dtd', 'resisc45']")
    card = load_any_card(work / "card.safetensors")  # the default form: K-FAC, trace-scaled, with g
    if not (getattr(card, "form", None) == "kfac" and card.dim == 87_849_216 and card.gradient is not None
            and card.layer_scales is not None and card.provenance["n_images_used"] == "2"):
        failed.append(f"card form={getattr(card, 'form', 'eig')} dim={card.dim} "
                      f"images={card.provenance.get('n_images_used')}")
    if "tier 1" not in out:
        failed.append("the ranking is not tier 1")
    ranked = [line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit() and "  " in line]
    if sorted(ranked) != ["dtd", "resisc45"]:
        failed.append(f"ranked sources {ranked}")
    for note in ("ranked by cos(τ_ft) alone", "λ2 capped by the card"):
        if note not in out:
            failed.append(f"missing note {note!r}")
    return failed


if __name__ == "__main__":
    work = Path(sys.argv[1])
    failed = check(work, Path(sys.argv[2]).read_text())
    for f in failed:
        print(f"worked example check failed: {f}", file=sys.stderr)
    print("worked example: every check passed" if not failed else "", end="\n" if not failed else "")
    sys.exit(1 if failed else 0)
