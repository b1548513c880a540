"""ImageFolders: a user's local copy of a paper dataset, or any folder of class folders.

Two layouts are read. ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (``val/`` is
accepted for ``test/``) keep their split; one folder per class ``<root>/<class>/*`` (or a lone
``train/``) is split per class by :func:`~train.datasets.splits.seeded_holdout`. For a known
dataset the class folders are matched to the registry's class names ignoring case, spaces,
underscores and punctuation (plus known aliases; all-numeric folders are label indices; 1000
WordNet-id folders are ImageNet in sorted order). Otherwise the class names are the sorted
folder names, underscores read as spaces.

Every image is decoded with PIL, converted to RGB, centre-cropped to a square and resized
(bicubic) to ``image_size`` (224 by default), and stored as uint8 ``(N, S, S, 3)``.

What is read, and what is not: only regular files count as images (FIFOs, devices, sockets
and dangling links are skipped, with one warning line that counts them); a folder reached
twice within a class folder (a symlink loop, or two links to one folder) is listed once, by
its real path; a file
larger than :data:`MAX_IMAGE_BYTES` is refused before it is read, and an image with more
pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) before it is
decoded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from train.datasets import templates as T
from train.datasets.domain import Domain, Split
from train.datasets.registry import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_EXTENSIONS,
    TEST_FRACTION,
    DataWarning,
    example_folders,
    norm,
)
from train.datasets.splits import check_cap, seeded_holdout, split_seed, stratified_order
from train.errors import DataError

log = logging.getLogger(__name__)

Items = list[tuple[Path, int]]  # (image file, label) pairs of one split
#: No image file is read whose size exceeds this (bytes): larger is not a photo of a dataset.
MAX_IMAGE_BYTES = 256 * 2**20


def require_folder(label: str, path: str | os.PathLike, hint: str) -> Path:
    """``path`` (``~`` expanded) if it is an existing folder.

    Raises:
        DataError: ``label: data path P does not exist`` or ``... is not a folder``, then ``hint``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{label}: data path {p} does not exist. {hint}")
    if not p.is_dir():
        raise DataError(f"{label}: data path {p} is not a folder. {hint}")
    return p


class _Scan:
    """What a folder scan has seen: real paths of the folders listed, and the files it skipped."""

    def __init__(self):
        self.folders: set[tuple[int, int]] = set()
        self.special = 0

    def first_visit(self, folder: str | Path) -> bool:
        """True the first time a folder (by device and inode: its real identity) is reached."""
        try:
            st = os.stat(folder)
        except OSError:
            return False
        ident = (st.st_dev, st.st_ino)
        if ident in self.folders:
            return False
        self.folders.add(ident)
        return True

    def warn(self, root: Path) -> None:
        if self.special:
            warnings.warn(f"{root}: skipped {self.special} image-named file(s) that are not regular files (FIFOs, "
                          "devices, sockets or dangling links)", DataWarning, stacklevel=4)


def _list_images(folder: Path, scan: _Scan) -> list[Path]:
    """Regular image files under ``folder`` (links followed, each real folder listed once per class folder)."""
    out = []
    scan.folders = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        if not scan.first_visit(dirpath):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / f
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError:  # a dangling link or a loop of links
                    regular = False
                if regular:
                    out.append(path)
                else:
                    scan.special += 1
    return out


def _class_folders(folder: Path, scan: _Scan) -> dict[str, list[Path]]:
    """``{class folder name: [image paths]}`` for the non-hidden subfolders holding images."""
    out: dict[str, list[Path]] = {}
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            files = _list_images(d, scan)
            if files:
                out[d.name] = files
    return out


def _scan_layout(root: Path) -> tuple[str, dict[str, dict[str, list[Path]]]]:
    """Find the layout of an ImageFolder.

    Returns:
        ``("split", {"train": ..., "test": ...})`` for ``train/`` + ``test/`` (or ``val/``)
        subfolders, else ``("flat", {"all": ...})`` for one folder per class.
    """
    train = root / "train"
    test = next((root / t for t in ("test", "val") if (root / t).is_dir()), None)
    scan = _Scan()
    if train.is_dir() and test is not None:
        if test.name == "val":
            log.info("%s: no test/ folder, using val/ as the test split", root)
        parts = {"train": _class_folders(train, scan), "test": _class_folders(test, scan)}
        scan.warn(root)
        return "split", parts
    if train.is_dir() and not any(
        d.is_dir() and d.name != "train" and not d.name.startswith(".") for d in root.iterdir()
    ):
        warnings.warn(
            f"{root}: train/ without test/; splitting train/ {1 - TEST_FRACTION:.0%}/"
            f"{TEST_FRACTION:.0%} per class",
            DataWarning,
            stacklevel=3,
        )
        parts = {"all": _class_folders(train, scan)}
    else:
        parts = {"all": _class_folders(root, scan)}
    scan.warn(root)
    return "flat", parts


def _match_folders(key: str, classnames: Sequence[str], folders: Sequence[str]) -> dict[str, int]:
    """Map class folder names of a local copy to the registry's label indices.

    Raises:
        DataError: Some folders match no class (listed), or two folders match one class.
    """
    k = len(classnames)
    table: dict[str, int | None] = {}

    def add(name: str, i: int) -> None:
        n = norm(name)
        table[n] = i if table.get(n, i) == i else None  # None: ambiguous spelling

    for i, c in enumerate(classnames):
        add(c, i)
    for aliases in T.FOLDER_ALIASES.get(key, ()):
        for i, a in enumerate(aliases):
            add(a, i)
    names = sorted(folders)
    if key == "imagenet" and len(names) == k and all(re.fullmatch(r"n\d{8}", f) for f in names):
        log.info("%s: %d WordNet-id folders, read in sorted order as the label order", key, k)
        return {f: i for i, f in enumerate(names)}
    mapping: dict[str, int] = {}
    unmatched = []
    for f in names:
        i = table.get(norm(f))
        if i is None and f.isdigit() and int(f) < k:
            i = int(f)
        if i is None:
            unmatched.append(f)
        else:
            mapping[f] = i
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        examples = ", ".join(example_folders(key)[:3])
        raise DataError(
            f"{key}: class folders match no {key} class: {shown}. Expected one folder per class "
            f"named like the class (case, spaces and underscores ignored), e.g. {examples}, ..."
        )
    seen: dict[int, str] = {}
    for f, i in mapping.items():
        if i in seen:
            raise DataError(f"{key}: folders '{seen[i]}' and '{f}' both match class '{classnames[i]}'")
        seen[i] = f
    return mapping


def _read_image(path: Path, size: int) -> tuple[np.ndarray, str]:
    """Read a file once: sha256 of its bytes, and the image decoded with PIL, converted to RGB,
    centre-cropped to the shorter side and resized (bicubic) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = _read_regular(path)
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise DataError(f"{path}: {w}x{h} pixels exceed Pillow's decompression-bomb limit "
                                f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); not decoded")
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8), hashlib.sha256(raw).hexdigest()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, opened without blocking and read only if it is a regular file of a sane size.

    Raises:
        DataError: not a regular file (it may have been replaced since it was listed), or
            larger than :data:`MAX_IMAGE_BYTES`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file; not read")
        if st.st_size > MAX_IMAGE_BYTES:
            raise DataError(f"{path}: {st.st_size} bytes, more than an image file may have "
                            f"({MAX_IMAGE_BYTES} bytes); not read")
        raw = fh.read(MAX_IMAGE_BYTES + 1)
    if len(raw) > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: grew past {MAX_IMAGE_BYTES} bytes while it was read; not read")
    return raw


def _load_items(
    items: Items, size: int, max_n: int | None, seed: int, split: str, workers: int
) -> tuple[Split, list[tuple[Path, str]]]:
    """Decode a split in stratified order (capped at ``max_n``); also return each file's sha256."""
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    order = stratified_order(labels, split_seed(seed, split, 0))
    check_cap(max_n)
    if max_n is not None:
        order = order[:max_n]
    paths = [items[i][0] for i in order]
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    digests = []
    with ThreadPoolExecutor(workers) as ex:
        for j, (arr, digest) in enumerate(ex.map(lambda p: _read_image(p, size), paths)):
            images[j] = arr
            digests.append((paths[j], digest))
    return Split(torch.from_numpy(images), torch.from_numpy(labels[order])), digests


def _folder_hash(root: Path, digests: Sequence[tuple[Path, str]]) -> str:
    """sha256 over the sorted lines ``relative/path\\0sha256(file bytes)\\n``."""
    lines = sorted(f"{p.relative_to(root).as_posix()}\0{d}\n" for p, d in digests)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _folder_classes(
    root: Path, key: str | None, classnames: Sequence[str] | None, parts: dict[str, dict[str, list[Path]]]
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Label of each class folder and the class names: the registry's for a known ``key``,
    else the sorted folder names of ``train/`` (or of the flat root), underscores as spaces."""
    all_folders = sorted({f for part in parts.values() for f in part})
    if not all_folders:
        raise DataError(
            f"{key or 'imagefolder'}: no images in {root}. Expected one folder per class with images "
            f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...) or train/ and test/ subfolders of those"
        )
    if key is not None:
        return _match_folders(key, classnames or (), all_folders), tuple(classnames or ())
    base = parts.get("train", parts.get("all", {}))
    extra = sorted(set(all_folders) - set(base))
    if extra:
        raise DataError(f"imagefolder: {root}/test has classes not in train/: {', '.join(extra)}")
    folders = sorted(base)
    return {f: i for i, f in enumerate(folders)}, tuple(f.replace("_", " ") for f in folders)


def _folder_items(
    layout: str, parts: dict[str, dict[str, list[Path]]], labels: dict[str, int], seed: int
) -> dict[str, Items]:
    """``{"train": items, "test": items}``: the folders' own splits, or a seeded holdout of a flat one."""
    if layout == "split":
        return {s: [(p, labels[f]) for f in sorted(parts[s]) for p in parts[s][f]] for s in ("train", "test")}
    train, test = seeded_holdout(parts["all"], labels, seed)
    return {"train": train, "test": test}


def _check_items(label: str, root: Path, key: str | None, names: tuple[str, ...], items: dict[str, Items]) -> None:
    """Refuse an empty split; warn when a known dataset's split lacks some of its classes."""
    for s, its in items.items():
        if not its:
            raise DataError(f"{label}: split '{s}' of {root} is empty")
        present = {lab for _, lab in its}
        if key is not None and len(present) < len(names):
            missing = [names[i] for i in range(len(names)) if i not in present]
            warnings.warn(
                f"{key}: split '{s}' has no images of {len(missing)} of {len(names)} classes "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})",
                DataWarning,
                stacklevel=4,
            )


def _warn_memory(label: str, items: dict[str, Items], size: int, max_per_split: int | None) -> None:
    """Warn when the decoded images, ``n * size^2 * 3`` bytes, would exceed 8 GiB."""
    n_load = sum(min(len(its), max_per_split or len(its)) for its in items.values())
    if n_load * size * size * 3 > 8 * 2**30:
        warnings.warn(
            f"{label}: {n_load} images at {size}x{size} need {n_load * size * size * 3 / 2**30:.0f} GiB "
            "of memory; pass max_per_split to load fewer",
            DataWarning,
            stacklevel=4,
        )


def load_folder(
    root: Path,
    *,
    key: str | None,
    classnames: Sequence[str] | None,
    templates: tuple[str, ...],
    image_size: int | None,
    max_per_split: int | None,
    seed: int,
) -> Domain:
    """Load an ImageFolder: ``key``/``classnames`` given for a known dataset, else from the folders.

    Args:
        root: The folder (must exist; see :func:`require_folder`).
        key: Registry name of a known dataset, or None for any ImageFolder.
        classnames: The registry's class names of ``key`` (ignored when ``key`` is None).
        templates: Prompt templates of the domain.
        image_size: Output side in pixels (224 if None).
        max_per_split: Keep at most this many images per split (a stratified, seeded prefix).
        seed: Seed of the flat-folder holdout, of the image order and of the cap.

    Returns:
        The domain (splits ``train`` and ``test``); ``content_hash`` per :func:`_folder_hash`.

    Raises:
        DataError: No images, unmatched folders, an empty split, an unreadable image.
    """
    label = key or "imagefolder"
    layout, parts = _scan_layout(root)
    labels, names = _folder_classes(root, key, classnames, parts)
    items = _folder_items(layout, parts, labels, seed)
    _check_items(label, root, key, names, items)
    size = image_size or DEFAULT_IMAGE_SIZE
    _warn_memory(label, items, size, max_per_split)
    workers = max(1, min(8, os.cpu_count() or 1))
    splits: dict[str, Split] = {}
    digests: list[tuple[Path, str]] = []
    for s in ("train", "test"):
        splits[s], d = _load_items(items[s], size, max_per_split, seed, s, workers)
        digests += d
    log.info("%s: loaded %s from %s (%s layout)", label, {s: len(v) for s, v in splits.items()}, root, layout)
    kind = "torchvision" if key is not None else "imagefolder"
    return Domain(
        name=key or (root.resolve().name or "imagefolder"),
        classnames=names,
        templates=templates,
        splits=splits,
        content_hash=_folder_hash(root, digests),
        source=f"{kind}:{root}",
    )
