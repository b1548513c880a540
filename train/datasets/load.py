"""The entry point :func:`load_domain`: resolve a name (and ``data``) to a checked :class:`Domain`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from train.datasets import templates as T
from train.datasets.domain import Domain
from train.datasets.imagefolder import load_folder, require_folder
from train.datasets.minisuite import load_minisuite, manifest_dir, minisuite_dir, read_manifest
from train.datasets.registry import (
    MINISUITE,
    PAPER_DATASETS,
    VAL_FRACTION,
    canonical,
    data_hint,
    missing_copy_message,
    norm,
    resolve_split_seed,
    resolve_val_carve,
    unknown_domain,
)
from train.datasets.splits import carve_validation, check_classes
from train.errors import DataError


def load_domain(
    name: str | os.PathLike,
    *,
    data: str | Path | None = None,
    image_size: int | None = None,
    max_per_split: int | None = None,
    seed: int | None = None,
    val_fraction: float = VAL_FRACTION,
    val_carve: str | None = None,
) -> Domain:
    """Load a domain by name, with its ``val`` split carved from ``train``.

    Resolution: ``"imagefolder"`` loads the folder ``data``; a mini-suite name loads the
    vendored npz (``data``, if given, must then be a mini-suite directory, or it is read as a
    local copy of the paper's dataset of that name); a paper dataset loads its local copy
    ``data``; any other name with ``data`` loads the mini-suite domain of that name from the
    directory ``data`` or, if ``data`` is not a mini-suite directory, the ImageFolder ``data``
    under that name (``--data mydomain=/path``); any other name that is an existing folder
    loads as an ImageFolder.

    Args:
        name: Registry name (case, ``-`` and ``_`` ignored), ``"imagefolder"`` or a folder path.
        data: Mini-suite directory, or the root of a local copy / ImageFolder.
        image_size: Output side in pixels. Mini-suite: resized (bilinear, antialiased) only if
            given and not 32. Folders: centre crop + bicubic resize, 224 if None.
        max_per_split: Keep at most this many images per split (stratified, seeded).
        seed: Seed of the 80/20 split of flat folders, of the image order, of the cap and of
            the validation carve; None: ``$TVDIAG_SPLIT_SEED``, else 0
            (:func:`~train.datasets.registry.resolve_split_seed`).
        val_fraction: Share of ``train`` carved into ``val`` (:func:`carve_validation`);
            0 keeps the source's own splits only.
        val_carve: ``"grouped"`` (near-duplicate groups never straddle train and val) or
            ``"stratified"`` (by labels alone); None: ``$TVDIAG_VAL_CARVE``, else ``"grouped"``
            (:func:`~train.datasets.registry.resolve_val_carve`). Without near-duplicates in
            train both give the same split.

    Returns:
        The :class:`Domain`; each of its ``train``, ``val`` and ``test`` splits holds images of
        at least two classes.

    Raises:
        UnknownNameError: Unknown name or ``val_carve``; the message lists the available ones.
        ArtifactError: A mini-suite file is missing, unreadable or fails its sha256 check.
        DataError: ``data`` does not exist or is not a folder (the message names it), no local
            copy, empty data, labels outside ``[0, K)``, unmatched folders, a split with images
            of fewer than two classes.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    carve = resolve_val_carve(val_carve)
    seed = resolve_split_seed(seed)
    opts = {"image_size": image_size, "max_per_split": max_per_split, "seed": seed}
    raw = _load_raw(os.fspath(name), data, opts)
    domain = carve_validation(raw, val_fraction, seed=seed, carve=carve) if val_fraction > 0 else raw
    check_classes(domain)
    return domain


def _load_raw(name: str, data: str | Path | None, opts: dict) -> Domain:
    """The domain ``name`` with the source's own splits (see :func:`load_domain`)."""
    if norm(name) == "imagefolder":
        if data is None:
            raise DataError("imagefolder: pass data=/path/to/folder (one folder per class, or train/ and test/)")
        root = require_folder("imagefolder", data, data_hint(None))
        return load_folder(root, key=None, classnames=None, templates=T.GENERIC_TEMPLATES, **opts)
    key = canonical(name)
    if key is not None:
        return _load_known(key, data, opts)
    if data is not None:
        return _load_named(name, data, opts)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_folder(path, key=None, classnames=None, templates=T.GENERIC_TEMPLATES, **opts)
    raise unknown_domain(name)


def _load_known(key: str, data: str | Path | None, opts: dict) -> Domain:
    """A registry domain: the mini-suite npz, or the local copy ``data`` of a paper dataset."""
    if data is None:
        if key in MINISUITE:
            return load_minisuite(key, minisuite_dir(), **opts)
        raise DataError(missing_copy_message(key))
    root = require_folder(key, data, data_hint(key))
    suite = manifest_dir(root)
    if key in MINISUITE and suite is not None:
        return load_minisuite(key, suite, **opts)
    if key not in PAPER_DATASETS:
        raise DataError(
            f"{key}: {data} is not a mini-suite directory (no MANIFEST.json). To load your own "
            f"images use load_domain('imagefolder', data=...)"
        )
    return load_folder(root, key=key, classnames=T.paper_classnames(key), templates=T.paper_templates(key), **opts)


def _load_named(name: str, data: str | Path, opts: dict) -> Domain:
    """A name the registry does not know, with ``data``: the mini-suite domain of that name in
    the directory ``data``, or the user's own ImageFolder ``data`` called ``name``."""
    if Path(name).expanduser().is_dir():
        raise DataError(f"got both a folder as name ({name}) and data={data}; pass one")
    root = require_folder(name, data, data_hint(None))
    suite = manifest_dir(root)
    if suite is None:
        folder = load_folder(root, key=None, classnames=None, templates=T.GENERIC_TEMPLATES, **opts)
        return dataclasses.replace(folder, name=name)
    if name in read_manifest(suite)["domains"]:
        return load_minisuite(name, suite, **opts)
    raise unknown_domain(name)
