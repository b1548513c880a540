"""The registry: which domain names exist, how they are spelled and what is known about them.

Reads no image. Names are compared after :func:`norm` (lower case, letters and digits
only), so ``"Fashion-MNIST"``, ``"fashion_mnist"`` and ``"fashion"`` are one domain.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from train.datasets import templates as T
from train.errors import DataError, UnknownNameError, unknown

MINISUITE: tuple[str, ...] = ("mnist", "fashion", "animals", "gtsrb", "dtd", "imagenette", "cifar10")
PAPER_DATASETS: tuple[str, ...] = (
    "cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn", "cifar100", "stl10",
    "imagenet",
)  # fmt: skip
MINISUITE_CLASSNAMES = T.MINISUITE_CLASSNAMES

ENV_VAR = "TVDIAG_DATA"
PACKAGE_MINISUITE = Path(__file__).resolve().parents[2] / "data" / "minisuite"
MINISUITE_IMAGE_SIZE = 32
DEFAULT_IMAGE_SIZE = 224
# Flat folders: this share of each class goes to ``test`` (seeded).
TEST_FRACTION = 0.2
# Validation split: this share of ``train`` (stratified, seeded), never used for fine-tuning.
VAL_FRACTION = 0.15
# How ``val`` is carved from ``train``: "grouped" keeps near-duplicate groups (frames of one track,
# copies) on one side; "stratified" is the carve by labels alone. With no near-duplicates the two
# are the same split, index for index. Argument first, then $TVDIAG_VAL_CARVE, then this default.
VAL_CARVES = ("grouped", "stratified")
VAL_CARVE = "grouped"
VAL_CARVE_ENV = "TVDIAG_VAL_CARVE"
# The seed of every split a domain's loading draws (flat folders' 80/20 test split, image order, caps, the
# validation carve): argument first, then $TVDIAG_SPLIT_SEED, then 0. A store holds one split seed's
# artifacts (the splits enter each domain's content hash, so a store built under another one is rebuilt).
SPLIT_SEED_ENV = "TVDIAG_SPLIT_SEED"
# Near-duplicates (train.datasets.neardup): RMS difference of centred 16x16 thumbnails over their pooled spread.
NEAR_DUPLICATE_SIDE = 16
NEAR_DUPLICATE_DISTANCE = 0.15
# Splits scored as classification: each needs images of at least MIN_CLASSES classes.
CLASSIFICATION_SPLITS = ("train", "val", "test")
MIN_CLASSES = 2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_ORDER = ("train", "test", "pool")

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


def norm(s: str) -> str:
    """Lower case, letters and digits only: ``"Annual_Crop"`` -> ``"annualcrop"``."""
    return re.sub(r"[^a-z0-9]", "", s.lower())


def canonical(name: str) -> str | None:
    """The registry name ``name`` spells (aliases included), or None for an unknown name."""
    key = norm(name)
    known = {norm(n): n for n in (*MINISUITE, *PAPER_DATASETS)}
    if key in known:
        return known[key]
    return _NAME_ALIASES.get(key)


def available_domains() -> list[str]:
    """Names :func:`~train.datasets.load_domain` knows: the mini-suite first, then the paper's.

    Besides these, ``"imagefolder"`` (with ``data=path``) or a path to an existing folder load
    any ImageFolder.
    """
    return list(dict.fromkeys((*MINISUITE, *PAPER_DATASETS)))


def resolve_val_carve(carve: str | None = None) -> str:
    """The validation carve: ``carve`` if given, else ``$TVDIAG_VAL_CARVE`` if set, else :data:`VAL_CARVE`.

    Raises:
        UnknownNameError: Not one of :data:`VAL_CARVES`.
    """
    chosen = carve if carve is not None else (os.environ.get(VAL_CARVE_ENV) or VAL_CARVE)
    if chosen not in VAL_CARVES:
        source = "" if carve is not None else f" (from ${VAL_CARVE_ENV})"
        raise unknown(f"validation carve{source}", chosen, VAL_CARVES)
    return chosen


def resolve_split_seed(seed: int | None = None) -> int:
    """The split seed: ``seed`` if given, else ``$TVDIAG_SPLIT_SEED`` if set, else 0 (the full-seed axis
    reseeds the splits and θ_base together: ``$TVDIAG_BASE_SEED``, :class:`train.zoo.ZooConfig`).

    Raises:
        DataError: ``$TVDIAG_SPLIT_SEED`` is not a non-negative integer.
    """
    return seed if seed is not None else env_seed(SPLIT_SEED_ENV)


def env_seed(name: str) -> int:
    """A non-negative integer seed from the environment variable ``name`` (0 when unset or empty).

    Raises:
        DataError: the value is not a non-negative integer (the message names the variable).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise DataError(f"${name} must be a non-negative integer seed, got {text!r}")
    return int(text)


def unknown_domain(name: str) -> UnknownNameError:
    """``Unknown domain 'x'. Available: ...`` listing every registry name and ``imagefolder``."""
    return unknown("domain", name, [*available_domains(), "imagefolder"])


def example_folders(key: str) -> tuple[str, ...]:
    """Class folder names a local copy of the paper's dataset ``key`` may have (for messages)."""
    aliases = T.FOLDER_ALIASES.get(key)
    if aliases:
        return aliases[0]
    if key == "imagenet":
        return ("n01440764", "n01443537")
    return tuple(c.replace(" ", "_") for c in T.paper_classnames(key))


def paper_layout(key: str) -> str:
    """How a local copy of the paper's dataset ``key`` is laid out, e.g. ``/path/to/EuroSAT ...``."""
    display = T.DISPLAY_NAMES[key]
    a, b = example_folders(key)[:2]
    return (
        f"/path/to/{display} with one folder per class ({a}, {b}, ...) or train/ and test/ "
        "subfolders"
    )


FOLDER_LAYOUT = "a folder with one folder of images per class, or train/ and test/ subfolders of those"


def data_hint(key: str | None) -> str:
    """What ``data`` should be for the registry name ``key`` (None: an ImageFolder)."""
    if key is None:
        return f"Expected {FOLDER_LAYOUT}"
    suite = "a mini-suite directory (holding MANIFEST.json)"
    if key in PAPER_DATASETS:
        layout = f"Pass --data {paper_layout(key)}"
        return f"{layout}, or {suite}" if key in MINISUITE else layout
    return f"Expected {suite}"


def missing_copy_message(key: str) -> str:
    """The error text for a paper dataset loaded without a local copy."""
    extra = ""
    if key == "imagenet":
        extra = " (WordNet-id folders n01440764, ... count as the 1000 classes in sorted order)"
    return f"{key}: no local copy. Pass --data {paper_layout(key)}{extra}; nothing is downloaded."


def dataset_info(name: str, *, paper: bool = False) -> DatasetInfo:
    """Class names, templates and expected file layout of a known dataset; reads no file.

    ``mnist``, ``dtd`` and ``gtsrb`` exist both in the mini-suite and among the paper's
    datasets; the mini-suite entry is returned unless ``paper=True``.

    Raises:
        UnknownNameError: The name is not in the registry.
    """
    if norm(name) == "imagefolder":
        layout = "/path/to/folder with one folder per class (class name = folder name) or train/ and test/ subfolders"
        return DatasetInfo("imagefolder", (), T.GENERIC_TEMPLATES, layout)
    key = canonical(name)
    if key is None:
        raise unknown_domain(name)
    if key in MINISUITE and not paper:
        layout = (
            f"data/minisuite/{key}.npz with its sha256 in data/minisuite/MANIFEST.json "
            f"(vendored; another directory via ${ENV_VAR} or data=...)"
        )
        return DatasetInfo(key, MINISUITE_CLASSNAMES[key], T.minisuite_templates(key), layout)
    if key not in PAPER_DATASETS:
        raise unknown("paper dataset", name, PAPER_DATASETS)
    return DatasetInfo(key, T.paper_classnames(key), T.paper_templates(key), paper_layout(key))
