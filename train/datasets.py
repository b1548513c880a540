"""Dataset registry: the embedded mini-suite, the paper's datasets and any ImageFolder.

Three kinds of domain load through :func:`load_domain`:

* **mini-suite** (``mnist``, ``fashion``, ``animals``, ``gtsrb``, ``dtd``, ``imagenette``,
  ``cifar10``): the npz files vendored in ``data/minisuite`` (32x32, splits ``train``,
  ``test``, ``pool``). Each file's sha256 is checked against ``MANIFEST.json`` before use.
  The directory is, in order: the ``data`` argument, ``$TVDIAG_DATA``, ``data/minisuite``
  next to the package (a source checkout), ``./data/minisuite``.
* **the paper's datasets** (:data:`PAPER_DATASETS`): class names and CLIP templates are
  known; images come from a user's local copy passed as ``data`` (nothing is downloaded).
  A copy is an ImageFolder: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``
  (``val/`` is accepted for ``test/``), or one folder per class ``<root>/<class>/*`` split
  80/20 per class with a seeded permutation. Class folders are matched to the registry's class
  names ignoring case, spaces, underscores and punctuation (EuroSAT's ``AnnualCrop`` and
  GTSRB's ``00000`` folders are known aliases; all-numeric folders are read as label indices;
  1000 WordNet-id folders are read as ImageNet in sorted order).
* **any ImageFolder** (``load_domain("imagefolder", data=path)`` or ``load_domain(path)``):
  class names are the folder names with underscores as spaces, templates are generic.

Local images are decoded with PIL, converted to RGB, centre-cropped to a square and resized
(bicubic) to ``image_size`` (224 by default), and stored as uint8 ``(N, S, S, 3)``. Within each
split the order is a seeded stratified interleave, so any prefix holds the classes in
proportion; ``max_per_split`` keeps such a prefix.
"""

from __future__ import annotations

import dataclasses

import hashlib
import io
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train import templates as T
from train.data import resize_uint8
from train.errors import ArtifactError, DataError, unknown

log = logging.getLogger(__name__)

MINISUITE: tuple[str, ...] = ("mnist", "fashion", "animals", "gtsrb", "dtd", "imagenette", "cifar10")
PAPER_DATASETS: tuple[str, ...] = (
    "cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "cifar100", "stl10",
    "imagenet",
)  # fmt: skip

ENV_VAR = "TVDIAG_DATA"
PACKAGE_MINISUITE = Path(__file__).resolve().parent.parent / "data" / "minisuite"
MINISUITE_IMAGE_SIZE = 32
DEFAULT_IMAGE_SIZE = 224
TEST_FRACTION = 0.2
# Validation split: this share of ``train`` (stratified, seeded), never used for fine-tuning.
VAL_FRACTION = 0.15
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_ORDER = ("train", "test", "pool")
_REVENDOR = (
    "re-vendor from a clean tvdiag checkout (data/minisuite/, e.g. `git checkout -- data/minisuite`)"
)

# Class names of the vendored mini-suite (also in its MANIFEST.json), so that
# dataset_info() needs no file.
MINISUITE_CLASSNAMES: dict[str, tuple[str, ...]] = {
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "fashion": (
        "t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
        "bag", "ankle boot",
    ),
    "animals": (
        "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
    ),
    "gtsrb": (
        "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h",
        "speed limit 60 km/h", "speed limit 70 km/h", "speed limit 80 km/h",
        "end of speed limit 80 km/h", "speed limit 100 km/h", "speed limit 120 km/h",
        "no passing", "no passing for vehicles over 3.5 tons",
        "right-of-way at the next intersection", "priority road", "yield", "stop",
        "no vehicles", "vehicles over 3.5 tons prohibited", "no entry", "general caution",
        "dangerous curve to the left", "dangerous curve to the right", "double curve",
        "bumpy road", "slippery road", "road narrows on the right", "road work",
        "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
        "beware of ice and snow", "wild animals crossing",
        "end of all speed and passing limits", "turn right ahead", "turn left ahead",
        "ahead only", "go straight or right", "go straight or left", "keep right", "keep left",
        "roundabout mandatory", "end of no passing",
        "end of no passing for vehicles over 3.5 tons",
    ),
    "dtd": (
        "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
        "crosshatched", "crystalline",
    ),
    "imagenette": (
        "tench", "English springer", "cassette player", "chain saw", "church", "French horn",
        "garbage truck", "gas pump", "golf ball", "parachute",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
}  # fmt: skip

_NAME_ALIASES = {
    "fashionmnist": "fashion",
    "stanfordcars": "cars",
    "sun": "sun397",
    "nwpuresisc45": "resisc45",
    "cifar": "cifar10",
    "imagenet1k": "imagenet",
    "animalshape": "animals",
    "animalshapemnist": "animals",
}


class DataWarning(UserWarning):
    """Something about a dataset is unusual but usable (missing classes, a guessed layout)."""


# --------------------------------------------------------------------------------------------
# Value objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Split:
    """Images and labels of one split.

    Attributes:
        images: uint8 ``(N, H, W, C)``, channels last, ``C`` in {1, 3}.
        labels: int64 ``(N,)``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 (N, H, W, C) with C in {{1, 3}}, got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.ndim != 1:
            raise DataError(f"labels must be int64 (N,), got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Split:
        """The images at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Images per class, ``bincount(labels, minlength=num_classes)``."""
        return torch.bincount(self.labels, minlength=num_classes)

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, image_shape={self.image_shape})"


@dataclass(frozen=True, repr=False)
class Domain:
    """A classification domain: images per split, class names and CLIP prompt templates.

    Attributes:
        name: Registry name (``"mnist"``) or the folder's basename for an ImageFolder.
        classnames: Readable class names in label order.
        templates: Format strings with ``{c}``, e.g. ``"a photo of a {c}."``.
        splits: ``"train"``, ``"test"`` and, for the mini-suite, ``"pool"``.
        content_hash: sha256 (hex) of the source: the npz file for the mini-suite; for a folder,
            sha256 over the sorted lines ``relative/path\\0sha256(file bytes)\\n`` of the files
            loaded (every file of the folder unless ``max_per_split`` left some out).
        source: ``"minisuite"``, ``"torchvision:<root>"`` or ``"imagefolder:<path>"``.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    splits: dict[str, Split]
    content_hash: str
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes ``K``; labels lie in ``[0, K)``."""
        return len(self.classnames)

    def split(self, name: str) -> Split:
        """The split called ``name``.

        Raises:
            DataError: This domain has no such split; the message lists the ones it has.
        """
        if name not in self.splits:
            have = ", ".join(self.splits)
            raise DataError(f"{self.name}: no split '{name}'. Available: {have}")
        return self.splits[name]

    def to_dict(self) -> dict:
        """A flat summary (no tensors) for logs and provenance."""
        any_split = next(iter(self.splits.values()))
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "source": self.source,
            "content_hash": self.content_hash,
            "image_shape": list(any_split.image_shape),
            "splits": {k: len(v) for k, v in self.splits.items()},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        shape = next(iter(self.splits.values())).image_shape
        return (
            f"Domain(name={self.name!r}, num_classes={self.num_classes}, splits=({sizes}), "
            f"image_shape={shape}, source={self.source!r}, content_hash={self.content_hash[:12]}…)"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about a dataset without reading any image.

    Attributes:
        name: Registry name.
        classnames: Class names in label order.
        templates: CLIP prompt templates (``{c}`` format strings).
        expected_layout: Where the files must be and how they are laid out.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    expected_layout: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "classnames": list(self.classnames),
            "templates": list(self.templates),
            "expected_layout": self.expected_layout,
        }


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _norm(s: str) -> str:
    """Lower case, letters and digits only: ``"Annual_Crop"`` -> ``"annualcrop"``."""
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _canonical(name: str) -> str | None:
    key = _norm(name)
    known = {_norm(n): n for n in (*MINISUITE, *PAPER_DATASETS)}
    if key in known:
        return known[key]
    return _NAME_ALIASES.get(key)


def available_domains() -> list[str]:
    """Names :func:`load_domain` knows: the mini-suite first, then the paper's datasets.

    Besides these, ``"imagefolder"`` (with ``data=path``) or a path to an existing folder load
    any ImageFolder.
    """
    return list(dict.fromkeys((*MINISUITE, *PAPER_DATASETS)))


def _unknown_domain(name: str):
    return unknown("domain", name, [*available_domains(), "imagefolder"])


def _example_folders(key: str) -> tuple[str, ...]:
    aliases = T.FOLDER_ALIASES.get(key)
    if aliases:
        return aliases[0]
    return tuple(c.replace(" ", "_") for c in T.paper_classnames(key)) if key != "imagenet" else (
        "n01440764",
        "n01443537",
    )


def _paper_layout(key: str) -> str:
    display = T.DISPLAY_NAMES[key]
    a, b = _example_folders(key)[:2]
    return (
        f"/path/to/{display} with one folder per class ({a}, {b}, ...) or train/ and test/ "
        "subfolders"
    )


def _missing_copy_message(key: str) -> str:
    extra = ""
    if key == "imagenet":
        extra = " (WordNet-id folders n01440764, ... count as the 1000 classes in sorted order)"
    return f"{key}: no local copy. Pass --data {_paper_layout(key)}{extra}; nothing is downloaded."


def dataset_info(name: str, *, paper: bool = False) -> DatasetInfo:
    """Class names, templates and expected file layout of a known dataset; reads no file.

    ``mnist``, ``dtd`` and ``gtsrb`` exist both in the mini-suite and among the paper's
    datasets; the mini-suite entry is returned unless ``paper=True``.

    Raises:
        UnknownNameError: The name is not in the registry.
    """
    if _norm(name) == "imagefolder":
        layout = "/path/to/folder with one folder per class (class name = folder name) or train/ and test/ subfolders"
        return DatasetInfo("imagefolder", (), T.GENERIC_TEMPLATES, layout)
    key = _canonical(name)
    if key is None:
        raise _unknown_domain(name)
    if key in MINISUITE and not paper:
        layout = (
            f"data/minisuite/{key}.npz with its sha256 in data/minisuite/MANIFEST.json "
            f"(vendored; another directory via ${ENV_VAR} or data=...)"
        )
        return DatasetInfo(key, MINISUITE_CLASSNAMES[key], T.minisuite_templates(key), layout)
    if key not in PAPER_DATASETS:
        raise unknown("paper dataset", name, PAPER_DATASETS)
    return DatasetInfo(key, T.paper_classnames(key), T.paper_templates(key), _paper_layout(key))


# --------------------------------------------------------------------------------------------
# Mini-suite
# --------------------------------------------------------------------------------------------


def _manifest_dir(path: Path) -> Path | None:
    """``path`` or ``path/minisuite`` if it holds a MANIFEST.json."""
    for p in (path, path / "minisuite"):
        if (p / "MANIFEST.json").is_file():
            return p
    return None


def minisuite_dir(data: str | Path | None = None) -> Path:
    """Directory of the mini-suite.

    Looked up in order: ``data`` if given, else ``$TVDIAG_DATA`` if set, else ``data/minisuite``
    next to the package (a source checkout), else ``./data/minisuite``. A directory counts if it
    (or its ``minisuite/`` subfolder) holds ``MANIFEST.json``.

    Raises:
        DataError: None of the candidates holds a MANIFEST.json.
    """
    if data is not None:
        candidates = [("data argument", Path(data).expanduser())]
    elif os.environ.get(ENV_VAR):
        candidates = [(f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser())]
    else:
        candidates = [("package", PACKAGE_MINISUITE), ("cwd", Path.cwd() / "data" / "minisuite")]
    for _, path in candidates:
        found = _manifest_dir(path)
        if found is not None:
            return found
    tried = "; ".join(f"{src}: {p}" for src, p in candidates)
    raise DataError(
        f"mini-suite not found (no MANIFEST.json in {tried}). Set {ENV_VAR}=/path/to/minisuite "
        "or pass data=/path/to/minisuite"
    )


def _read_manifest(root: Path) -> dict:
    path = root / "MANIFEST.json"
    try:
        manifest = json.loads(path.read_text())
        domains = manifest["domains"]
        if not isinstance(domains, dict):
            raise TypeError("'domains' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable mini-suite manifest ({e}); {_REVENDOR}") from e
    return manifest


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _load_minisuite(
    name: str, root: Path, image_size: int | None, max_per_split: int | None, seed: int
) -> Domain:
    manifest = _read_manifest(root)
    entry = manifest["domains"].get(name)
    if entry is None:
        raise unknown("mini-suite domain", name, manifest["domains"])
    path = root / f"{name}.npz"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e}); {_REVENDOR}") from e
    expected = str(entry.get("sha256", ""))
    got = _sha256_bytes(raw)
    if got != expected:
        raise ArtifactError(f"{path}: sha256 mismatch: expected {expected}, got {got}; {_REVENDOR}")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable npz ({e}); {_REVENDOR}") from e
    if "classnames" not in arrays:
        raise ArtifactError(f"{path}: no 'classnames' array; {_REVENDOR}")
    classnames = tuple(str(c) for c in arrays["classnames"].tolist())
    k = len(classnames)
    splits: dict[str, Split] = {}
    for s in SPLIT_ORDER:
        if f"x_{s}" not in arrays and f"y_{s}" not in arrays:
            continue
        if f"x_{s}" not in arrays or f"y_{s}" not in arrays:
            raise ArtifactError(f"{path}: split '{s}' needs both x_{s} and y_{s}")
        x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{name}: x_{s} must be uint8 (N, H, W, C) with C in {{1, 3}}, got {x.dtype} {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0]:
            raise DataError(f"{name}: y_{s} must be {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
        if x.shape[0] == 0:
            raise DataError(f"{name}: split '{s}' is empty")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            bad = int(((y < 0) | (y >= k)).sum())
            raise DataError(
                f"{name}: split '{s}' has {bad} labels outside [0, {k}) (min {lo}, max {hi})"
            )
        split = Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
        splits[s] = _cap_and_resize(split, max_per_split, image_size, seed, s)
    for s in ("train", "test"):
        if s not in splits:
            raise DataError(f"{name}: {path} has no '{s}' split (x_{s}, y_{s})")
    return Domain(
        name=name,
        classnames=classnames,
        templates=T.minisuite_templates(name),
        splits=splits,
        content_hash=got,
        source="minisuite",
    )


# --------------------------------------------------------------------------------------------
# Ordering, capping, resizing
# --------------------------------------------------------------------------------------------


def _split_seed(seed: int, split: str, purpose: int) -> np.random.Generator:
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


def _cap_and_resize(
    split: Split, max_per_split: int | None, image_size: int | None, seed: int, name: str
) -> Split:
    if max_per_split is not None:
        if max_per_split < 1:
            raise DataError(f"max_per_split must be >= 1, got {max_per_split}")
        if len(split) > max_per_split:
            order = stratified_order(split.labels.numpy(), _split_seed(seed, name, 1))
            split = split.subset(torch.from_numpy(order[:max_per_split]))
    if image_size is not None:
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if split.images.shape[1:3] != (image_size, image_size):
            split = Split(resize_uint8(split.images, image_size), split.labels)
    return split


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath) / f)
    return out


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class folder name: [image paths]}`` for the non-hidden subfolders holding images."""
    out: dict[str, list[Path]] = {}
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            files = _list_images(d)
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
    if train.is_dir() and test is not None:
        if test.name == "val":
            log.info("%s: no test/ folder, using val/ as the test split", root)
        return "split", {"train": _class_folders(train), "test": _class_folders(test)}
    if train.is_dir() and not any(
        d.is_dir() and d.name != "train" and not d.name.startswith(".") for d in root.iterdir()
    ):
        warnings.warn(
            f"{root}: train/ without test/; splitting train/ {1 - TEST_FRACTION:.0%}/"
            f"{TEST_FRACTION:.0%} per class",
            DataWarning,
            stacklevel=3,
        )
        return "flat", {"all": _class_folders(train)}
    return "flat", {"all": _class_folders(root)}


def _match_folders(key: str, classnames: Sequence[str], folders: Sequence[str]) -> dict[str, int]:
    """Map class folder names of a local copy to the registry's label indices.

    Raises:
        DataError: Some folders match no class (listed), or two folders match one class.
    """
    k = len(classnames)
    table: dict[str, int | None] = {}

    def add(name: str, i: int) -> None:
        n = _norm(name)
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
        i = table.get(_norm(f))
        if i is None and f.isdigit() and int(f) < k:
            i = int(f)
        if i is None:
            unmatched.append(f)
        else:
            mapping[f] = i
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 20 else "")
        examples = ", ".join(_example_folders(key)[:3])
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


def _seeded_holdout(
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
        n_test = min(max(int(round(TEST_FRACTION * n)), 1 if n >= 2 else 0), n - 1)
        perm = rng.permutation(n)
        test += [(paths[j], labels[folder]) for j in sorted(perm[:n_test])]
        train += [(paths[j], labels[folder]) for j in sorted(perm[n_test:])]
    return train, test


def _read_image(path: Path, size: int) -> tuple[np.ndarray, str]:
    """Read a file once: sha256 of its bytes, and the image decoded with PIL, converted to RGB,
    centre-cropped to the shorter side and resized (bicubic) to ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8), _sha256_bytes(raw)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def _load_items(
    items: list[tuple[Path, int]], size: int, max_n: int | None, seed: int, split: str, workers: int
) -> tuple[Split, list[tuple[Path, str]]]:
    """Decode a split in stratified order (capped at ``max_n``); also return each file's sha256."""
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    order = stratified_order(labels, _split_seed(seed, split, 0))
    if max_n is not None:
        if max_n < 1:
            raise DataError(f"max_per_split must be >= 1, got {max_n}")
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


def _load_folder(
    root: Path,
    *,
    key: str | None,
    classnames: Sequence[str] | None,
    templates: tuple[str, ...],
    image_size: int | None,
    max_per_split: int | None,
    seed: int,
) -> Domain:
    """Load an ImageFolder; ``key``/``classnames`` given for a known dataset, else from folders."""
    label = key or "imagefolder"
    if not root.is_dir():
        if key is not None:
            raise DataError(f"{key}: no local copy at {root} (not a directory). Pass --data {_paper_layout(key)}")
        raise DataError(f"imagefolder: {root} is not a directory")
    layout, parts = _scan_layout(root)
    all_folders = sorted({f for part in parts.values() for f in part})
    if not all_folders:
        raise DataError(
            f"{label}: no images in {root}. Expected one folder per class with images "
            f"({', '.join(IMAGE_EXTENSIONS[:4])}, ...) or train/ and test/ subfolders of those"
        )
    if key is not None:
        labels = _match_folders(key, classnames or (), all_folders)
        names = tuple(classnames)
    else:
        base = parts.get("train", parts.get("all", {}))
        extra = sorted(set(all_folders) - set(base))
        if extra:
            raise DataError(f"imagefolder: {root}/test has classes not in train/: {', '.join(extra)}")
        folders = sorted(base)
        labels = {f: i for i, f in enumerate(folders)}
        names = tuple(f.replace("_", " ") for f in folders)

    if layout == "split":
        items = {
            s: [(p, labels[f]) for f in sorted(parts[s]) for p in parts[s][f]] for s in ("train", "test")
        }
    else:
        tr, te = _seeded_holdout(parts["all"], labels, seed)
        items = {"train": tr, "test": te}

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
                stacklevel=3,
            )

    workers = max(1, min(8, os.cpu_count() or 1))
    size = image_size or DEFAULT_IMAGE_SIZE
    n_load = sum(min(len(its), max_per_split or len(its)) for its in items.values())
    if n_load * size * size * 3 > 8 * 2**30:
        warnings.warn(
            f"{label}: {n_load} images at {size}x{size} need {n_load * size * size * 3 / 2**30:.0f} GiB "
            "of memory; pass max_per_split to load fewer",
            DataWarning,
            stacklevel=3,
        )
    splits: dict[str, Split] = {}
    digests: list[tuple[Path, str]] = []
    for s in ("train", "test"):
        splits[s], d = _load_items(items[s], size, max_per_split, seed, s, workers)
        digests += d
    content_hash = _folder_hash(root, digests)
    log.info("%s: loaded %s from %s (%s layout)", label, {s: len(v) for s, v in splits.items()}, root, layout)
    kind = "torchvision" if key is not None else "imagefolder"
    return Domain(
        name=key or (root.resolve().name or "imagefolder"),
        classnames=names,
        templates=templates,
        splits=splits,
        content_hash=content_hash,
        source=f"{kind}:{root}",
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def carve_validation(domain: Domain, fraction: float = VAL_FRACTION, seed: int = 0) -> Domain:
    """Split ``train`` into ``train`` and ``val`` (a stratified, seeded ``fraction`` of it).

    Every choice (λ2, method, k, c) is made on ``val``; ``test`` is only ever scored; ``pool``
    is θ_base's. The carve depends on the labels and ``seed`` only, so every training seed
    sees the same validation images, and both parts keep the original relative order.
    """
    if "train" not in domain.splits or "val" in domain.splits:
        return domain
    train = domain.splits["train"]
    n_val = int(round(fraction * len(train)))
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


def load_domain(
    name: str | os.PathLike,
    *,
    data: str | Path | None = None,
    image_size: int | None = None,
    max_per_split: int | None = None,
    seed: int = 0,
    val_fraction: float = VAL_FRACTION,
) -> Domain:
    """Load a domain by name, with its ``val`` split carved from ``train`` (:func:`carve_validation`).

    ``val_fraction=0`` keeps the source's own splits only. See :func:`_load_domain_raw` for
    the resolution rules, the other arguments and the errors.
    """
    raw = _load_domain_raw(name, data=data, image_size=image_size, max_per_split=max_per_split, seed=seed)
    return carve_validation(raw, val_fraction, seed=seed) if val_fraction > 0 else raw


def _load_domain_raw(
    name: str | os.PathLike,
    *,
    data: str | Path | None = None,
    image_size: int | None = None,
    max_per_split: int | None = None,
    seed: int = 0,
) -> Domain:
    """Load a domain by name.

    Resolution: ``"imagefolder"`` loads the folder ``data``; a mini-suite name loads the
    vendored npz (``data``, if given, must then be a mini-suite directory, or it is read as a
    local copy of the paper's dataset of that name); a paper dataset loads its local copy
    ``data``; any other ``name`` that is an existing folder loads as an ImageFolder.

    Args:
        name: Registry name (case, ``-`` and ``_`` ignored), ``"imagefolder"`` or a folder path.
        data: Mini-suite directory, or the root of a local copy / ImageFolder.
        image_size: Output side in pixels. Mini-suite: resized (bilinear, antialiased) only if
            given and not 32. Folders: centre crop + bicubic resize, 224 if None.
        max_per_split: Keep at most this many images per split (stratified, seeded).
        seed: Seed of the 80/20 split of flat folders, of the image order and of the cap.

    Returns:
        The :class:`Domain`.

    Raises:
        UnknownNameError: Unknown name; the message lists the available ones.
        ArtifactError: A mini-suite file is missing, unreadable or fails its sha256 check.
        DataError: No local copy, empty data, labels outside ``[0, K)``, unmatched folders.
    """
    name = os.fspath(name)
    if _norm(name) == "imagefolder":
        if data is None:
            raise DataError("imagefolder: pass data=/path/to/folder (one folder per class, or train/ and test/)")
        root = Path(data).expanduser()
        return _load_folder(
            root, key=None, classnames=None, templates=T.GENERIC_TEMPLATES,
            image_size=image_size, max_per_split=max_per_split, seed=seed,
        )  # fmt: skip
    key = _canonical(name)
    if key is not None:
        data_path = Path(data).expanduser() if data is not None else None
        suite = _manifest_dir(data_path) if data_path is not None else None
        if key in MINISUITE and (data is None or suite is not None):
            root = suite if suite is not None else minisuite_dir()
            return _load_minisuite(key, root, image_size, max_per_split, seed)
        if key not in PAPER_DATASETS:
            raise DataError(
                f"{key}: {data} is not a mini-suite directory (no MANIFEST.json). To load your own "
                f"images use load_domain('imagefolder', data=...)"
            )
        if data_path is None:
            raise DataError(_missing_copy_message(key))
        return _load_folder(
            data_path, key=key, classnames=T.paper_classnames(key), templates=T.paper_templates(key),
            image_size=image_size, max_per_split=max_per_split, seed=seed,
        )  # fmt: skip
    if data is not None:
        suite = _manifest_dir(Path(data).expanduser())
        if suite is not None and name in _read_manifest(suite)["domains"]:
            return _load_minisuite(name, suite, image_size, max_per_split, seed)
        if suite is None and Path(data).expanduser().is_dir():
            # a user's own domain name with its ImageFolder: ``--data mydomain=/path``
            folder = _load_folder(
                Path(data).expanduser(), key=None, classnames=None, templates=T.GENERIC_TEMPLATES,
                image_size=image_size, max_per_split=max_per_split, seed=seed,
            )  # fmt: skip
            return dataclasses.replace(folder, name=name)
    path = Path(name).expanduser()
    if path.is_dir():
        if data is not None:
            raise DataError(f"got both a folder as name ({name}) and data={data}; pass one")
        return _load_folder(
            path, key=None, classnames=None, templates=T.GENERIC_TEMPLATES,
            image_size=image_size, max_per_split=max_per_split, seed=seed,
        )  # fmt: skip
    raise _unknown_domain(name)


def model_inputs(config, name: str, split: str, limit: int | None = None,
                 data: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a split as model inputs (N, 3, H, W) and their labels.

    Args:
        config: the backbone's :class:`~train.backbones.BackboneConfig` (input size, mean, std).
        name, data: as :func:`load_domain`.
    """
    from train.data import to_model_input

    size = config.image_size
    part = load_domain(name, data=data, image_size=None if size == 32 else size).split(split)
    n = part.labels.shape[0] if limit is None else min(limit, part.labels.shape[0])
    return to_model_input(part.images[:n], config.mean, config.std, size=size), part.labels[:n].long()
