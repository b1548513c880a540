"""Datasets: the embedded mini-suite, the paper's datasets and any ImageFolder.

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
* **any ImageFolder** (``load_domain("imagefolder", data=path)``, ``load_domain(path)`` or
  ``load_domain("mydomain", data=path)``): class names are the folder names with underscores
  as spaces, templates are generic.

Local images are decoded with PIL, converted to RGB, centre-cropped to a square and resized
(bicubic) to ``image_size`` (224 by default), and stored as uint8 ``(N, S, S, 3)``. Within each
split the order is a seeded stratified interleave, so any prefix holds the classes in
proportion; ``max_per_split`` keeps such a prefix. A ``val`` split is carved from ``train``
(:func:`carve_validation`): by default whole near-duplicate groups at a time (frames of one
track, copies; :mod:`~train.datasets.neardup`), so no group straddles train and val, and without
near-duplicates exactly the stratified carve by labels alone (``val_carve="stratified"`` or
``$TVDIAG_VAL_CARVE=stratified`` asks for that one). A carve that moved images is named by the
domain's ``split_key`` and :attr:`Domain.data_key`, what artifacts built from the splits are keyed
by. Every classification split must hold images of at least two classes.

Modules (each imports only those above it):

* :mod:`~train.datasets.registry`: names, constants, :func:`dataset_info` (reads no image);
* :mod:`~train.datasets.domain`: the value objects :class:`Split` and :class:`Domain`;
* :mod:`~train.datasets.neardup`: near-duplicate groups from the pixels (centred thumbnails);
* :mod:`~train.datasets.splits`: stratified order, cap, holdout, validation carve (grouped or
  stratified), class check;
* :mod:`~train.datasets.minisuite`: the sha256-checked npz files;
* :mod:`~train.datasets.imagefolder`: folder layouts, class matching, image decoding;
* :mod:`~train.datasets.load`: :func:`load_domain`;
* :mod:`~train.datasets.inputs`: :func:`split_inputs`, a split as a backbone's model inputs.
"""

from train.datasets.domain import Domain, Split
from train.datasets.imagefolder import require_folder
from train.datasets.inputs import domain_for, model_inputs, split_inputs
from train.datasets.load import load_domain
from train.datasets.minisuite import minisuite_dir
from train.datasets.registry import (
    DEFAULT_IMAGE_SIZE,
    ENV_VAR,
    IMAGE_EXTENSIONS,
    MINISUITE,
    MINISUITE_CLASSNAMES,
    MINISUITE_IMAGE_SIZE,
    PACKAGE_MINISUITE,
    PAPER_DATASETS,
    SPLIT_ORDER,
    TEST_FRACTION,
    VAL_CARVE,
    VAL_CARVE_ENV,
    VAL_CARVES,
    VAL_FRACTION,
    DatasetInfo,
    DataWarning,
    available_domains,
    dataset_info,
)
from train.datasets.neardup import NearDuplicates, near_duplicate_groups
from train.datasets.splits import carve_validation, check_classes, stratified_order

__all__ = [
    "DEFAULT_IMAGE_SIZE", "ENV_VAR", "IMAGE_EXTENSIONS", "MINISUITE", "MINISUITE_CLASSNAMES",
    "MINISUITE_IMAGE_SIZE", "PACKAGE_MINISUITE", "PAPER_DATASETS", "SPLIT_ORDER", "TEST_FRACTION",
    "VAL_CARVE", "VAL_CARVE_ENV", "VAL_CARVES", "VAL_FRACTION", "DataWarning", "DatasetInfo", "Domain",
    "NearDuplicates", "Split", "available_domains", "near_duplicate_groups",
    "carve_validation", "check_classes", "dataset_info", "domain_for", "load_domain", "minisuite_dir",
    "model_inputs", "require_folder", "split_inputs", "stratified_order",
]  # fmt: skip
