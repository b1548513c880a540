"""Orders and partitions of a split: stratified order, capping, the flat-folder test holdout,
the validation carve and the class-count check.

Every random choice here is seeded by ``(seed, split, purpose)``, so a domain loads to the same
tensors on every run and every machine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from train.datasets.pixels import resize_uint8
from train.datasets.domain import Domain, Split
from train.datasets.registry import (
    CLASSIFICATION_SPLITS,
    MIN_CLASSES,
    SPLIT_ORDER,
    TEST_FRACTION,
    VAL_FRACTION,
)
from train.errors import DataError


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


def carve_validation(domain: Domain, fraction: float = VAL_FRACTION, seed: int = 0) -> Domain:
    """Split ``train`` into ``train`` and ``val`` (a stratified, seeded ``fraction`` of it).

    ``val`` holds ``round(fraction * N_train)`` images: the first ones of a
    :func:`stratified_order` of the train labels, kept in their original relative order, as is
    the rest. Every choice (λ2, method, k, c) is made on ``val``; ``test`` is only ever scored;
    ``pool`` is θ_base's. The carve depends on the labels and ``seed`` only, so every training
    seed sees the same validation images. A domain without ``train``, or with ``val``
    already, is returned as is.

    Raises:
        DataError: ``train`` is too small to leave at least one image on each side.
    """
    if "train" not in domain.splits or "val" in domain.splits:
        return domain
    train = domain.splits["train"]
    n_val = round(fraction * len(train))
    if n_val < 1 or n_val >= len(train):
        raise DataError(f"{domain.name}: {len(train)} train images are too few to carve a validation split")
    order = stratified_order(train.labels.numpy(), np.random.default_rng([seed, 7, 2]))
    val_idx = np.sort(order[:n_val])
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    splits = dict(domain.splits)
    splits["train"] = train.subset(torch.from_numpy(np.flatnonzero(keep)))
    splits["val"] = train.subset(torch.from_numpy(val_idx))
    return dataclasses.replace(domain, splits=splits)


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
