"""Near-duplicate groups from the pixels and the grouped validation carve: planted groups never
straddle train and val, no near-duplicates gives the stratified carve index for index, and the
threshold separates planted copies from distinct images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests._smoke import one_thread, smoke_store
from train.datasets import Domain, Split, carve_validation, load_domain, stratified_order
from train.datasets.neardup import close_pairs, distance, has_near_duplicate, near_duplicate_groups, thumbnails
from train.datasets.registry import NEAR_DUPLICATE_DISTANCE, VAL_CARVE_ENV, resolve_val_carve
from train.datasets.splits import grouped_prefix
from train.errors import DataError, UnknownNameError
from train.zoo import Zoo, preset

ORDER_SEED = (0, 7, 2)  # carve_validation's generator at seed 0


def _smooth(rng: np.random.Generator, n: int, side: int = 32) -> np.ndarray:
    """``n`` distinct smooth colour images: 4x4 random fields upsampled bilinearly, uint8 (n, side, side, 3)."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)))
    x = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def _copy(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A near-duplicate frame: brightness (±20 levels) and contrast (±5 %) changed, pixel noise (σ = 3 levels).

    (A one-pixel shift of these 32-px images alone already costs d ≈ 0.16: the threshold catches
    near-identical frames, not the far ends of a track.)"""
    x = image.astype(np.float64) * rng.uniform(0.95, 1.05) + rng.uniform(-20, 20) + rng.normal(0, 3, image.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def planted(seed: int = 0, n_classes: int = 4, per_class: int = 30, groups_per_class: int = 4, size: int = 5):
    """Images of ``n_classes`` classes, each with ``groups_per_class`` planted groups of ``size`` frames
    (one image and its copies) and distinct singletons otherwise; returns (images, labels, true groups)."""
    rng = np.random.default_rng(seed)
    images, labels, groups = [], [], []
    for c in range(n_classes):
        distinct = _smooth(rng, per_class - groups_per_class * (size - 1))
        for k, im in enumerate(distinct):
            copies = [im] + ([_copy(rng, im) for _ in range(size - 1)] if k < groups_per_class else [])
            groups += [len(images)] * len(copies)
            images += copies
            labels += [c] * len(copies)
    perm = rng.permutation(len(images))
    groups = np.array(groups)[perm]
    first = {g: int(np.flatnonzero(groups == g)[0]) for g in np.unique(groups)}  # name groups by their first member
    truth = np.array([first[g] for g in groups])
    return torch.from_numpy(np.stack(images)[perm]), torch.from_numpy(np.array(labels, np.int64)[perm]), truth


def _partition(groups: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(groups == g).tolist()) for g in np.unique(groups)}


def _domain(images: torch.Tensor, labels: torch.Tensor) -> Domain:
    k = int(labels.max()) + 1
    return Domain("planted", tuple(f"c{i}" for i in range(k)), ("{c}",), {"train": Split(images, labels)},
                  content_hash="0" * 64, source="test")


# ----------------------------------------------------------------------------- the metric and the groups


def test_distance_against_its_closed_form():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(_smooth(rng, 2))
    c = thumbnails(x, 16)
    assert c.shape == (2, 16 * 16 * 3)
    np.testing.assert_allclose(c.mean(1), 0, atol=1e-12)
    v = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).double() / 255, 16).permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_allclose(c, v - v.mean(1, keepdims=True), atol=1e-12)
    # one contrast: d² = 2 (1 - ρ)
    scaled = c * np.array([[1.0], [c[0].std() / c[1].std()]])
    np.testing.assert_allclose(distance(scaled[0], scaled[1]), np.sqrt(2 * (1 - np.corrcoef(c)[0, 1])), rtol=1e-12)
    # a contrast ratio k alone: d² = (1 - k)² / ((1 + k²) / 2)
    np.testing.assert_allclose(distance(c[0], 0.5 * c[0]), np.sqrt(0.25 / 0.625), rtol=1e-12)
    # brightness leaves it at zero (up to uint8 rounding); a uniform grey image is at distance √2 from any other
    brighter = torch.from_numpy(np.clip(x[0].numpy().astype(np.int64) + 20, 0, 255).astype(np.uint8))[None]
    assert distance(thumbnails(brighter, 16)[0], c[0]) < 0.05
    grey = torch.full((1, 32, 32, 3), 77, dtype=torch.uint8)
    assert distance(thumbnails(grey, 16)[0], c[0]) == pytest.approx(np.sqrt(2))
    # colour counts: flat red and flat green are far apart
    red, green = (torch.zeros(1, 8, 8, 3, dtype=torch.uint8) for _ in range(2))
    red[..., 0], green[..., 1] = 200, 200
    assert distance(thumbnails(red)[0], thumbnails(green)[0]) == pytest.approx(np.sqrt(3))


def test_threshold_separates_planted_copies_from_distinct_images():
    images, _, truth = planted(seed=0)
    z = thumbnails(images)
    n = len(truth)
    i, j = np.triu_indices(n, 1)
    d = distance(z[i], z[j])
    dup = truth[i] == truth[j]
    assert dup.sum() == 4 * 4 * 10  # 16 groups of 5: 10 pairs each
    assert d[dup].max() < NEAR_DUPLICATE_DISTANCE < d[~dup].min()
    # the groups found are the planted ones, exactly
    found = near_duplicate_groups(images)
    assert _partition(found.groups) == _partition(truth)
    assert (found.n_groups, found.n_grouped) == (16, 80)
    assert found.groups.min() == 0 and all(found.groups[k] <= k for k in range(n))  # named by the smallest member


def test_blockwise_pairs_equal_the_dense_computation(monkeypatch):
    images, _, _ = planted(seed=2)
    z = thumbnails(images)
    dense = close_pairs(z, None, 0.5)
    monkeypatch.setattr("train.datasets.neardup.BLOCK_ENTRIES", 7 * len(z))  # blocks of 7 rows
    blocked = close_pairs(z, None, 0.5)
    assert len(dense[0]) > 80 and all(np.array_equal(a, b) for a, b in zip(dense, blocked))
    i, j = np.triu_indices(len(z), 1)
    keep = distance(z[i], z[j]) <= 0.5
    assert np.array_equal(dense[0], i[keep]) and np.array_equal(dense[1], j[keep])


def test_cross_set_near_duplicates():
    images, _, truth = planted(seed=3)
    first = np.flatnonzero(truth == np.arange(len(truth)))  # one member per group
    rest = np.setdiff1d(np.arange(len(truth)), first)
    hit = has_near_duplicate(images[rest], images[first])
    assert hit.all()  # every copy has its original among the firsts
    singles = first[np.bincount(truth, minlength=len(truth))[first] == 1]
    assert not has_near_duplicate(images[singles], images[rest]).any()


# ----------------------------------------------------------------------------- the grouped carve


@pytest.mark.parametrize("seed", range(5))
def test_singleton_groups_give_the_stratified_prefix(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 300)
    order = stratified_order(labels, np.random.default_rng(ORDER_SEED))
    n_val = round(0.15 * 300)
    got = grouped_prefix(order, labels, np.arange(300), n_val)
    assert np.array_equal(got, np.sort(order[:n_val]))


@pytest.mark.parametrize("seed", range(5))
def test_grouped_prefix_never_straddles_and_keeps_class_quotas(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 400)
    groups = np.arange(400)
    for start in rng.choice(400, 60, replace=False):  # random same-class groups of 2..8
        members = rng.choice(np.flatnonzero(labels == labels[start]), rng.integers(2, 9), replace=False)
        groups[members] = groups[members].min()
    order = stratified_order(labels, np.random.default_rng(ORDER_SEED))
    n_val = 60
    val = grouped_prefix(order, labels, groups, n_val)
    in_val = np.zeros(400, bool)
    in_val[val] = True
    for g in np.unique(groups):
        assert len(set(in_val[groups == g])) == 1, f"group {g} straddles"
    quota = np.bincount(labels[order[:n_val]], minlength=5)
    got = np.bincount(labels[val], minlength=5)
    biggest = np.bincount(groups).max()
    assert len(val) <= n_val and np.all(got < quota + biggest) and len(val) >= n_val - 2 * biggest


def test_carve_validation_keeps_planted_groups_on_one_side():
    images, labels, truth = planted(seed=4, per_class=40, groups_per_class=6)
    d = _domain(images, labels)
    grouped = carve_validation(d, 0.25, carve="grouped")
    strat = carve_validation(d, 0.25, carve="stratified")

    def side(domain):
        val = {bytes(x.numpy().tobytes()) for x in domain.split("val").images}
        return np.array([bytes(x.numpy().tobytes()) in val for x in images])

    def straddling(in_val):
        return sum(len(set(in_val[truth == g])) > 1 for g in np.unique(truth))

    assert straddling(side(strat)) > 0  # the labels-only carve splits planted groups (the test can fail)
    assert straddling(side(grouped)) == 0
    assert not has_near_duplicate(grouped.split("val").images, grouped.split("train").images).any()
    assert len(grouped.split("train")) + len(grouped.split("val")) == len(labels)
    assert strat.split_key == "" and strat.data_key == d.content_hash
    assert len(grouped.split_key) == 64 and grouped.data_key not in (d.content_hash, grouped.split_key)
    again = carve_validation(d, 0.25, carve="grouped")
    assert again.split_key == grouped.split_key and torch.equal(again.split("val").images, grouped.split("val").images)


def test_without_near_duplicates_the_grouped_carve_is_the_stratified_one():
    rng = np.random.default_rng(5)
    images = torch.from_numpy(_smooth(rng, 120))
    d = _domain(images, torch.from_numpy(rng.integers(0, 4, 120)))
    assert near_duplicate_groups(images).all_singletons
    a, b = carve_validation(d, carve="grouped"), carve_validation(d, carve="stratified")
    for s in ("train", "val"):
        assert torch.equal(a.split(s).images, b.split(s).images) and torch.equal(a.split(s).labels, b.split(s).labels)
    assert a.split_key == "" and a.data_key == d.content_hash


@pytest.mark.parametrize("name", ["mnist", "fashion", "animals", "imagenette", "cifar10"])
def test_minisuite_splits_without_straddling_near_duplicates_are_unchanged(name):
    a, b = load_domain(name, val_carve="grouped"), load_domain(name, val_carve="stratified")
    assert a.split_key == "" and a.data_key == a.content_hash
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s).images, b.split(s).images) and torch.equal(a.split(s).labels, b.split(s).labels)


@pytest.mark.parametrize("name", ["gtsrb", "dtd"])
def test_minisuite_near_duplicates_across_the_stratified_carve_are_kept_together(name):
    """gtsrb (frames of one sign) and dtd (copies) have near-duplicates on both sides of the stratified carve."""
    strat, grouped = load_domain(name, val_carve="stratified"), load_domain(name, val_carve="grouped")
    assert has_near_duplicate(strat.split("val").images, strat.split("train").images).any()
    assert not has_near_duplicate(grouped.split("val").images, grouped.split("train").images).any()
    assert len(grouped.split_key) == 64 and grouped.data_key != grouped.content_hash
    k = grouped.num_classes  # same size, same class counts: the groups here are pairs of one class
    assert torch.equal(grouped.split("val").class_counts(k), strat.split("val").class_counts(k))
    assert torch.equal(grouped.split("test").images, strat.split("test").images)  # test is the source's


def test_the_carve_is_a_setting(monkeypatch):
    monkeypatch.delenv(VAL_CARVE_ENV, raising=False)
    assert resolve_val_carve() == "grouped" and resolve_val_carve("stratified") == "stratified"
    monkeypatch.setenv(VAL_CARVE_ENV, "stratified")
    assert resolve_val_carve() == "stratified" and resolve_val_carve("grouped") == "grouped"
    monkeypatch.setenv(VAL_CARVE_ENV, "tracks")
    with pytest.raises(UnknownNameError, match=r"validation carve \(from \$TVDIAG_VAL_CARVE\) 'tracks'.*grouped"):
        resolve_val_carve()
    with pytest.raises(UnknownNameError, match="Unknown validation carve 'random'. Available: grouped, stratified"):
        load_domain("mnist", val_carve="random")


def test_identical_images_refuse_the_grouped_carve_and_name_the_switch():
    images = torch.cat([torch.full((10, 8, 8, 3), 40 + 100 * c, dtype=torch.uint8) for c in range(2)])
    d = _domain(images, torch.arange(2).repeat_interleave(10))
    with pytest.raises(DataError, match=r"^planted: train's 20 near-duplicate images in 1 group\(s\) .*val_carve='stratified'"):
        carve_validation(d, carve="grouped")
    assert carve_validation(d, carve="stratified").split("val").class_counts(2).tolist() == [2, 1]


def test_a_changed_split_is_never_read_as_the_old_one(monkeypatch):
    """θ_ft's key (and so φ's, θ_ft*'s and every key built on them) reads the split: gtsrb's θ_ft built on the
    grouped carve is not reused under the stratified one; mnist's, whose split is the same, is."""
    monkeypatch.delenv(VAL_CARVE_ENV, raising=False)
    store = smoke_store()  # built under the default, the grouped carve
    usable = {}
    for carve in ("grouped", "stratified"):
        monkeypatch.setenv(VAL_CARVE_ENV, carve)
        with one_thread():
            zoo = Zoo(store, preset("smoke"), progress=False)
            usable[carve] = {d: [v.usable for v in (zoo._ft_verdict(d), zoo._attr_verdict(d),
                                                    zoo._ftx_verdict(d, 0.8, "paper"))] for d in ("mnist", "gtsrb")}
    assert usable == {"grouped": {"mnist": [True] * 3, "gtsrb": [True] * 3},
                      "stratified": {"mnist": [True] * 3, "gtsrb": [False] * 3}}


def test_the_full_seed_axis_reseeds_the_splits_and_theta_base(monkeypatch):
    """$TVDIAG_SPLIT_SEED reseeds the val carve (another val, another data_key for every domain, the test split
    untouched); $TVDIAG_BASE_SEED is θ_base's seed of every config that names none; both refuse a non-seed."""
    from train.datasets.registry import SPLIT_SEED_ENV, resolve_split_seed
    from train.zoo.config import BASE_SEED_ENV, ZooConfig

    monkeypatch.delenv(SPLIT_SEED_ENV, raising=False)
    monkeypatch.delenv(BASE_SEED_ENV, raising=False)
    store = smoke_store()  # the shared store is built (if it is not yet) before any seed is changed
    assert resolve_split_seed() == 0 and ZooConfig().base_seed == 0
    zero = {n: load_domain(n) for n in ("mnist", "gtsrb")}
    monkeypatch.setenv(SPLIT_SEED_ENV, "1")
    monkeypatch.setenv(BASE_SEED_ENV, "2")
    assert resolve_split_seed() == 1 and resolve_split_seed(0) == 0 and ZooConfig().base_seed == 2
    for name, before in zero.items():
        after = load_domain(name)
        assert after.data_key != before.data_key and after.content_hash == before.content_hash
        assert not torch.equal(after.split("val").images, before.split("val").images)
        assert torch.equal(after.split("test").images, before.split("test").images)
        assert len(after.split("val")) == len(before.split("val"))
    # a store's θ_base of another base seed is never replaced by a run that forgot the store's seed
    from train.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"built with base seed 0, this run asks for 2: set TVDIAG_BASE_SEED=0"):
        Zoo(store, preset("smoke"), progress=False).base()
    monkeypatch.setenv(SPLIT_SEED_ENV, "one")
    with pytest.raises(DataError, match=r"\$TVDIAG_SPLIT_SEED must be a non-negative integer seed, got 'one'"):
        load_domain("mnist")
