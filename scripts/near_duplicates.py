"""Near-duplicates in each mini-suite domain (or a folder), and what the grouped validation carve changes.

Per domain: the near-duplicate groups of the source's train split
(:func:`train.datasets.neardup.near_duplicate_groups`: RMS difference of centred 16x16 thumbnails over
their pooled spread at most the threshold, connected components); the val images that have a near-duplicate left in
train under the stratified carve (by labels alone) and under the grouped carve; whether the grouped
carve changes the split (a non-empty ``split_key``); val's size and how far its class counts move from
the stratified carve's; the test (and pool) images with a near-duplicate in the source's train split.

With ``--distances`` it also prints what the threshold was chosen from: quantiles of the distance
between random pairs of train images of one class, and of each train image's nearest other-class
train image (images of two classes are never duplicates of each other), beside each image's nearest
same-class neighbour.

    OMP_NUM_THREADS=1 python scripts/near_duplicates.py [--domains gtsrb dtd] [--data DIR] [--audit 0.2 0.3]
        [--distances] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from train.datasets import MINISUITE, carve_validation, load_domain
from train.datasets.neardup import distance, has_near_duplicate, near_duplicate_groups, thumbnails
from train.datasets.registry import NEAR_DUPLICATE_DISTANCE, NEAR_DUPLICATE_SIDE

QUANTILES = (0.0, 0.001, 0.01, 0.05, 0.5)


def _leaks(val, train, threshold: float) -> int:
    return int(has_near_duplicate(val.images, train.images, threshold).sum())


def domain_report(name: str, data: str | None, threshold: float, audit: tuple[float, ...] = ()) -> dict:
    """The near-duplicate numbers of one domain (module docstring)."""
    t0 = time.perf_counter()
    raw = load_domain(name, data=data, val_fraction=0)
    dups = near_duplicate_groups(raw.split("train").images, threshold)
    seconds = time.perf_counter() - t0
    out = {"domain": name, "train": len(raw.split("train")), **dups.to_dict(), "seconds_groups": round(seconds, 2)}
    k = raw.num_classes
    carves = {c: carve_validation(raw, carve=c, threshold=threshold) for c in ("stratified", "grouped")}
    strat_counts = carves["stratified"].split("val").class_counts(k).numpy()
    for c, d in carves.items():
        out[f"val_{c}"] = len(d.split("val"))
        out[f"val_leaks_{c}"] = _leaks(d.split("val"), d.split("train"), threshold)
    grouped = carves["grouped"]
    out["split_changes"] = bool(grouped.split_key)
    out["val_class_shift_max"] = int(np.abs(grouped.split("val").class_counts(k).numpy() - strat_counts).max())
    out["val_classes_grouped"] = int((grouped.split("val").class_counts(k) > 0).sum())
    for s in ("test", "pool"):
        if s in raw.splits:
            out[f"{s}_with_dup_in_train"] = _leaks(raw.split(s), raw.split("train"), threshold)
    for t in audit:  # the same counts at a looser distance (the carve still at ``threshold``)
        for c, d in carves.items():
            out[f"val_leaks_{c}@{t:g}"] = _leaks(d.split("val"), d.split("train"), t)
        out[f"test_with_dup_in_train@{t:g}"] = _leaks(raw.split("test"), raw.split("train"), t)
    return out


def distance_report(name: str, data: str | None, pairs: int = 20000, seed: int = 0) -> dict:
    """Quantiles of the distance between random same-class pairs, nearest other-class and same-class neighbours."""
    train = load_domain(name, data=data, val_fraction=0).split("train")
    z, y = thumbnails(train.images, NEAR_DUPLICATE_SIDE), train.labels.numpy()
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(y), pairs)
    j = np.array([rng.choice(np.flatnonzero((y == y[a]) & (np.arange(len(y)) != a))) for a in i])
    d_pairs = distance(z[i], z[j])
    full = None
    if len(y) <= 5000:  # every pair at once: d² = (2 p - 2 c_a·c_b / D) / p with p the pooled spread
        sq = (z * z).mean(1)
        pooled = (sq[:, None] + sq[None, :]) / 2
        diff = np.maximum(2 * pooled - 2 * (z @ z.T) / z.shape[1], 0)
        full = np.sqrt(np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 0))
    out = {"domain": name, "random_same_class": np.quantile(d_pairs, QUANTILES).round(3).tolist()}
    if full is not None:
        np.fill_diagonal(full, np.inf)
        same = y[:, None] == y[None, :]
        out["nearest_other_class"] = np.quantile(np.where(same, np.inf, full).min(1), QUANTILES).round(3).tolist()
        out["nearest_same_class"] = np.quantile(np.where(same, full, np.inf).min(1), QUANTILES).round(3).tolist()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", nargs="+", default=list(MINISUITE))
    p.add_argument("--data", default=None, help="a mini-suite directory or an ImageFolder (one domain)")
    p.add_argument("--threshold", type=float, default=NEAR_DUPLICATE_DISTANCE)
    p.add_argument("--audit", type=float, nargs="*", default=[],
                   help="also count val and test images with a train image within these looser distances")
    p.add_argument("--distances", action="store_true", help="also the distance quantiles the threshold is chosen from")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = [domain_report(d, args.data, args.threshold, tuple(args.audit)) for d in args.domains]
    dist = [distance_report(d, args.data) for d in args.domains] if args.distances else []
    if args.json:
        print(json.dumps({"threshold": args.threshold, "side": NEAR_DUPLICATE_SIDE, "domains": rows,
                          "distances": dist}, indent=1))
        return 0
    cols = ["domain", "train", "groups", "grouped_images", "largest_group", "val_stratified", "val_grouped",
            "val_leaks_stratified", "val_leaks_grouped", "split_changes", "val_class_shift_max",
            "test_with_dup_in_train", "pool_with_dup_in_train", "seconds_groups"]
    cols += [k for k in rows[0] if "@" in k]
    print(f"threshold d <= {args.threshold:g} on centred {NEAR_DUPLICATE_SIDE}x{NEAR_DUPLICATE_SIDE} thumbnails")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if dist:
        print(f"distance quantiles {QUANTILES}:")
        for r in dist:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
