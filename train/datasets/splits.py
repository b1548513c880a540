"""Orders and partitions of a split: stratified order, capping, the flat-folder test holdout,
the validation carve and the class-count check.

Every random choice here is seeded by ``(seed, split, purpose)``, so a domain loads to the same
tensors on every run and every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from train.datasets.pixels import resize_uint8
from train.datasets.domain import Domain, Split
from train.datasets.neardup import near_duplicate_groups
from train.datasets.registry import (
    CLASSIFICATION_SPLITS,
    MIN_CLASSES,
    NEAR_DUPLICATE_DISTANCE,
    SPLIT_ORDER,
    TEST_FRACTION,
    VAL_FRACTION,
    resolve_val_carve,
)
from train.errors import DataError

log = logging.getLogger(__name__)


def split_seed(seed: int, split: str, purpose: int) -> np.random.Generator:
    """The generator of one purpose (0: image order, 1: cap) of one split."""
    return np.random.default_rng([seed, SPLIT_ORDER.index(split) if split in SPLIT_ORDER else 9, purpose])


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of ``labels`` whose every prefix holds the classes in proportion.

    Member ``r`` (random rank) of a class with ``n_c`` members gets the key
    ``(r + u) / n_c`` with ``u ~ U[0, 1)``; sorting by key interleaves the classes, so a prefix
    of length ``m`` holds ``m n_c / N`` members of class ``c`` up to rounding.
    """
    labels = np.asarray(labels)
    keys = np.empty(labels.shape[0], dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = idx.shape[0]
        keys[idx] = (rng.permutation(n) + rng.random(n)) / n
    return np.argsort(keys, kind="stable")


def check_cap(max_per_split: int | None) -> None:
    """Raises DataError unless ``max_per_split`` is None or >= 1."""
    if max_per_split is not None and max_per_split < 1:
        raise DataError(f"max_per_split must be >= 1, got {max_per_split}")


def cap_and_resize(
    split: Split, max_per_split: int | None, image_size: int | None, seed: int, name: str
) -> Split:
    """Keep a stratified, seeded prefix of ``max_per_split`` images, then resize them (bilinear,
    antialiased) to ``image_size`` if given and different."""
    check_cap(max_per_split)
    if max_per_split is not None and len(split) > max_per_split:
        order = stratified_order(split.labels.numpy(), split_seed(seed, name, 1))
        split = split.subset(torch.from_numpy(order[:max_per_split]))
    if image_size is not None:
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if split.images.shape[1:3] != (image_size, image_size):
            split = Split(resize_uint8(split.images, image_size), split.labels)
    return split


def seeded_holdout(
    files: dict[str, list[Path]], labels: dict[str, int], seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Per class, a seeded permutation puts ``round(TEST_FRACTION * n)`` files (at least one if
    ``n >= 2``, at most ``n - 1``) into test and the rest into train."""
    rng = np.random.default_rng([seed, 7919])
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for folder in sorted(files, key=lambda f: labels[f]):
        paths = files[folder]
        n = len(paths)
        n_test = min(max(round(TEST_FRACTION * n), 1 if n >= 2 else 0), n - 1)
        perm = rng.permutation(n)
        test += [(paths[j], labels[folder]) for j in sorted(perm[:n_test])]
        train += [(paths[j], labels[folder]) for j in sorted(perm[n_test:])]
    return train, test


def grouped_prefix(order: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_val: int) -> np.ndarray:
    """The validation indices of the grouped carve: whole groups taken along ``order``.

    The stratified carve takes ``order[:n_val]``, i.e. ``q_c`` images of each class ``c`` (its
    count in that prefix). Here each group is visited at the rank in ``order`` of one member, its
    smallest index (not its earliest member: a large group would come early more often than a
    small one); a group joins ``val`` when it keeps every class within its ``q_c`` (pass 1). If
    ``val`` is still short of ``n_val``, the skipped groups are visited again in the same order and
    one joins when each of its classes is still below ``q_c`` and ``val`` stays within ``n_val``
    (pass 2: a class may end above ``q_c`` by less than one group). A group is taken whole or not
    at all, so no group straddles ``train`` and ``val``; with singleton groups pass 1 takes exactly
    ``order[:n_val]``, the stratified carve.

    Args:
        order: A :func:`stratified_order` of ``labels``.
        labels: int ``(N,)`` labels.
        groups: int ``(N,)`` group of each image (any integers; equal = one group).
        n_val: The stratified carve's size.

    Returns:
        Sorted int64 indices of ``val`` (at most ``n_val`` of them).
    """
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups)
    quota = np.bincount(labels[order[:n_val]], minlength=int(labels.max(initial=0)) + 1)
    taken = np.zeros_like(quota)
    _, gid = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(gid, kind="stable"), np.cumsum(np.bincount(gid))[:-1])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    visit = np.argsort([rank[m[0]] for m in members], kind="stable")  # m[0]: the group's smallest index
    chosen: list[np.ndarray] = []
    skipped: list[int] = []
    for g in visit:
        if taken.sum() == n_val:  # every class at its quota: the rest stays in train
            break
        counts = np.bincount(labels[members[g]], minlength=len(quota))
        if np.all(taken + counts <= quota):
            taken += counts
            chosen.append(members[g])
        else:
            skipped.append(g)
    for g in skipped:
        counts = np.bincount(labels[members[g]], minlength=len(quota))
        if taken.sum() + counts.sum() <= n_val and np.all(taken[counts > 0] < quota[counts > 0]):
            taken += counts
            chosen.append(members[g])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def carve_validation(
    domain: Domain,
    fraction: float = VAL_FRACTION,
    seed: int = 0,
    carve: str | None = None,
    threshold: float = NEAR_DUPLICATE_DISTANCE,
) -> Domain:
    """Split ``train`` into ``train`` and ``val`` (a stratified, seeded ``fraction`` of it).

    The stratified carve: ``val`` holds ``round(fraction * N_train)`` images, the first ones of a
    :func:`stratified_order` of the train labels, kept in their original relative order, as is
    the rest. The grouped carve (the default, :data:`~train.datasets.registry.VAL_CARVE`) finds
    the near-duplicate groups of the train images
    (:func:`~train.datasets.neardup.near_duplicate_groups`: frames of one track, copies) and
    takes whole groups along the same order (:func:`grouped_prefix`), so no group straddles the
    two splits; without near-duplicates it is the stratified carve, index for index. Where the
    grouped carve moved images, or the seed is not 0, the domain's ``split_key`` names the carve
    (and with it :attr:`Domain.data_key`, what artifacts are keyed by).

    Every choice (λ2, method, k, c) is made on ``val``; ``test`` is only ever scored; ``pool`` is
    θ_base's. The carve depends on the train split and ``seed`` only, so every training seed sees
    the same validation images. A domain without ``train``, or with ``val`` already, is
    returned as is.

    Args:
        domain: The domain with the source's own splits.
        fraction: Share of ``train`` carved into ``val``.
        seed: Seed of the order.
        carve: ``"grouped"`` or ``"stratified"``; None: :func:`~train.datasets.registry.resolve_val_carve`.
        threshold: The near-duplicate distance of the grouped carve.

    Raises:
        DataError: ``train`` is too small to leave at least one image on each side, or (grouped)
            its near-duplicate groups leave ``val`` with images of fewer than two classes.
        UnknownNameError: An unknown ``carve``.
    """
    carve = resolve_val_carve(carve)
    if "train" not in domain.splits or "val" in domain.splits:
        return domain
    train = domain.splits["train"]
    n_val = round(fraction * len(train))
    if n_val < 1 or n_val >= len(train):
        raise DataError(f"{domain.name}: {len(train)} train images are too few to carve a validation split")
    order = stratified_order(train.labels.numpy(), np.random.default_rng([seed, 7, 2]))
    val_idx, split_key = np.sort(order[:n_val]), ""
    if carve == "grouped":
        val_idx, split_key = _grouped_val(domain.name, train, order, n_val, threshold)
    if seed != 0:  # another split seed's val is never read as seed 0's, whatever the carve
        split_key = hashlib.sha256(f"split seed {seed}|{split_key}|".encode() + val_idx.astype("<i8").tobytes()).hexdigest()
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    splits = dict(domain.splits)
    splits["train"] = train.subset(torch.from_numpy(np.flatnonzero(keep)))
    splits["val"] = train.subset(torch.from_numpy(val_idx))
    return dataclasses.replace(domain, splits=splits, split_key=split_key)


def _grouped_val(name: str, train: Split, order: np.ndarray, n_val: int, threshold: float) -> tuple[np.ndarray, str]:
    """``val``'s indices of the grouped carve and its ``split_key`` (``""`` where it is the stratified carve).

    Raises:
        DataError: The near-duplicate groups leave ``val`` with images of fewer than ``MIN_CLASSES``
            classes while ``train`` has that many (the message names the switch).
    """
    labels = train.labels.numpy()
    stratified = np.sort(order[:n_val])
    dups = near_duplicate_groups(train.images, threshold, progress=True)
    grouped = grouped_prefix(order, labels, dups.groups, n_val)
    if np.array_equal(grouped, stratified):
        return stratified, ""
    val_classes = len(np.unique(labels[grouped]))
    if val_classes < MIN_CLASSES <= len(np.unique(labels)):
        raise DataError(
            f"{name}: train's {dups.n_grouped} near-duplicate images in {dups.n_groups} group(s) leave the grouped "
            f"validation carve {len(grouped)} images of {val_classes} class(es); pass val_carve='stratified' "
            f"(or set $TVDIAG_VAL_CARVE=stratified) to carve by labels alone"
        )
    log.info("%s: %d near-duplicate groups (%d images) in train; the grouped carve holds %d val images (stratified: %d)",
             name, dups.n_groups, dups.n_grouped, len(grouped), n_val)
    return grouped, hashlib.sha256(f"val of {len(train)}|".encode() + grouped.astype("<i8").tobytes()).hexdigest()


def check_classes(domain: Domain, splits: tuple[str, ...] = CLASSIFICATION_SPLITS) -> None:
    """Require images of at least ``MIN_CLASSES`` (2) classes in each of ``splits`` it has.

    Accuracy over a split of one class is 1 for any model that predicts that class: every
    number computed on it would be meaningless, so such a domain is refused.

    Raises:
        DataError: Names the domain, the split, its class count and its image count.
    """
    for s in splits:
        if s not in domain.splits:
            continue
        part = domain.splits[s]
        present = torch.unique(part.labels).tolist()
        if len(present) < MIN_CLASSES:
            names = ", ".join(domain.classnames[i] for i in present if i < domain.num_classes) or "none"
            raise DataError(
                f"{domain.name}: split '{s}' has images of {len(present)} class(es) ({names}; "
                f"{len(part)} images); at least {MIN_CLASSES} classes are needed in train, val and test"
            )
