"""Near-duplicate images, found from the pixels: thumbnails, their distance, and groups.

The metric. Each image is reduced to a ``side x side`` thumbnail (area average, every channel, on
the 0..1 scale; :func:`thumbnails`) and centred, ``c = v - mean v`` over its ``D = side² · C``
values. The distance of two images is the root mean square difference of their centred thumbnails
relative to their pooled spread,

    d(a, b)² = mean_i (c_a,i - c_b,i)² / ((σ_a² + σ_b²) / 2),   σ² = mean_i c_i²,

so ``d`` lies in ``[0, 2]``; for two images of one contrast ``d² = 2 (1 - ρ)``, with ρ the
Pearson correlation of the thumbnails, and a contrast ratio ``k`` alone gives
``d² = (1 - k)² / ((1 + k²) / 2)`` (5 % costs 0.05). ``d`` ignores a change of brightness (video
frames under auto exposure) and, through the thumbnail, most pixel noise and sub-pixel jitter;
unlike the correlation alone it keeps colour and contrast (two flat textures of different colours,
a flat frame and a contrasty one are far apart). Two thumbnails without any spread (uniform grey)
are at distance 0 from each other and √2 from any other. Two images are near-duplicates when ``d <= threshold``
(:data:`~train.datasets.registry.NEAR_DUPLICATE_DISTANCE`); the groups are the connected
components of that relation (frames of one track chain together even when its first and last
frame are further apart).

The threshold, 0.15 at side 16, lies below every distance between two images of the mini-suite's
train splits known to be distinct, by at least 17 %: two images of different
classes (the nearest such pair, a fashion shirt and T-shirt, at 0.181; gtsrb's at 0.364) and two
samples of one class in the domains without copies or tracks (mnist 0.199, animals 0.195,
imagenette 0.407, cifar10 0.298). What it catches there is copies (dtd: three pairs at 0.012 to
0.039), the closest frames of one physical sign (gtsrb: four pairs at 0.124 to 0.145) and two pairs
of fashion trousers (0.138, 0.146). A one-pixel shift of a 32-px image alone costs about 0.16, so
the threshold finds near-identical frames, not the far ends of a track
(``scripts/near_duplicates.py --distances`` prints the distance quantiles).

The computation is blockwise: ``d²`` of a block of rows against all later rows from one matrix
product in float32 (a block holds at most ``2**24`` distances, so no ``N x N`` matrix is held at
once), and every candidate pair within a margin of the threshold re-measured in float64 from the
thumbnails, so the pairs do not depend on the BLAS of the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from train.datasets.registry import NEAR_DUPLICATE_DISTANCE, NEAR_DUPLICATE_SIDE
from train.errors import DataError

#: Distances of one block of rows (float32 entries); bounds the memory of :func:`close_pairs`.
BLOCK_ENTRIES = 2**24
#: Candidates within this much (in d², plus 1e-9 of spread) of the threshold are re-measured in float64.
_MARGIN = 1e-3
#: Above this many image pairs a progress bar is shown (when ``progress``).
_PROGRESS_PAIRS = 2 * 10**8


def thumbnails(images: torch.Tensor, side: int = NEAR_DUPLICATE_SIDE) -> np.ndarray:
    """Centred thumbnails ``c`` (float64 ``(N, D)``, ``D = s² · C``, ``s = min(side, H, W)``).

    Area average (``adaptive_avg_pool2d``) of the uint8 ``(N, H, W, C)`` images to ``s x s`` on
    the 0..1 scale, then each row's mean (over pixels and channels) subtracted; a row whose spread
    is below ``1e-6`` (a uniform grey image) is all zeros.

    Raises:
        DataError: ``images`` is not uint8 ``(N, H, W, C)`` or ``side < 1``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 images (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    if side < 1:
        raise DataError(f"thumbnail side must be >= 1, got {side}")
    s = min(side, images.shape[1], images.shape[2])
    out = np.empty((images.shape[0], s * s * images.shape[3]), dtype=np.float64)
    chunk = max(1, 2**25 // max(1, images.shape[1] * images.shape[2] * images.shape[3]))  # ≤ 256 MiB of float64
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].permute(0, 3, 1, 2).to(torch.float64) / 255.0
        out[i:i + chunk] = F.adaptive_avg_pool2d(x, s).permute(0, 2, 3, 1).reshape(x.shape[0], -1).numpy()
    out -= out.mean(axis=1, keepdims=True)
    out[np.sqrt((out * out).mean(axis=1)) < 1e-6] = 0.0  # no spread but rounding: uniform grey, exactly
    return out


def distance(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """``d`` of the rows of ``ca`` and ``cb`` (centred thumbnails, same shape), in float64."""
    pooled = ((ca * ca).mean(axis=-1) + (cb * cb).mean(axis=-1)) / 2
    diff = ((ca - cb) ** 2).mean(axis=-1)
    return np.sqrt(np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 0))


def close_pairs(za: np.ndarray, zb: np.ndarray | None = None, threshold: float = NEAR_DUPLICATE_DISTANCE,
                progress: bool = False, desc: str = "near-duplicates") -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)`` with ``d(za_i, zb_j) <= threshold``, blockwise.

    Args:
        za, zb: Centred thumbnails (:func:`thumbnails`); ``zb=None`` pairs ``za`` with itself
            and returns each pair once, ``i < j``.
        threshold: The largest distance of a near-duplicate.
        progress: Show a progress bar when there are more than ``2·10⁸`` pairs.

    Returns:
        ``(i, j)``: int64 index arrays, sorted by ``i`` then ``j``.
    """
    same = zb is None
    zb = za if zb is None else zb
    if za.shape[1:] != zb.shape[1:]:
        raise DataError(f"thumbnails of {za.shape[1:]} and {zb.shape[1:]} values cannot be compared")
    n, m, dim = za.shape[0], zb.shape[0], max(za.shape[1], 1)
    a32, b32 = torch.from_numpy(za.astype(np.float32)), torch.from_numpy(zb.astype(np.float32))
    na, nb = (a32 * a32).sum(1) / dim, (b32 * b32).sum(1) / dim
    rows = max(1, BLOCK_ENTRIES // max(m, 1))
    starts = range(0, n, rows)
    show = progress and n * m > _PROGRESS_PAIRS
    found_i, found_j = [], []
    for r0 in tqdm(starts, desc=desc, disable=not show, leave=False, unit="block"):
        r1 = min(n, r0 + rows)
        c0 = r0 if same else 0  # pairs with j < r0 were found from the earlier rows
        pooled = (na[r0:r1, None] + nb[None, c0:]) / 2
        diff = 2 * pooled - 2.0 * (a32[r0:r1] @ b32[c0:].T) / dim
        ii, jj = torch.nonzero(diff <= (threshold**2 + _MARGIN) * pooled + 1e-9, as_tuple=True)
        ii, jj = ii.numpy() + r0, jj.numpy() + c0
        if same:
            ii, jj = ii[jj > ii], jj[jj > ii]
        exact = distance(za[ii], zb[jj]) <= threshold
        found_i.append(ii[exact])
        found_j.append(jj[exact])
    i = np.concatenate(found_i) if found_i else np.zeros(0, np.int64)
    j = np.concatenate(found_j) if found_j else np.zeros(0, np.int64)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64)


@dataclass(frozen=True, repr=False)
class NearDuplicates:
    """Near-duplicate groups of a set of images.

    Attributes:
        groups: int64 ``(N,)``: image ``k``'s group, named by its smallest member's index (a
            singleton's group is its own index).
        n_pairs: Pairs within ``threshold``.
        threshold: The distance ``d`` at or below which two images are near-duplicates.
        side: The thumbnails' side.
    """

    groups: np.ndarray
    n_pairs: int
    threshold: float
    side: int

    @property
    def sizes(self) -> np.ndarray:
        """Members of each image's group, int64 ``(N,)``."""
        return np.bincount(self.groups, minlength=len(self.groups))[self.groups]

    @property
    def n_groups(self) -> int:
        """Groups of two or more images."""
        return int(np.count_nonzero(np.bincount(self.groups, minlength=len(self.groups)) >= 2))

    @property
    def n_grouped(self) -> int:
        """Images in a group of two or more."""
        return int(np.count_nonzero(self.sizes >= 2))

    @property
    def all_singletons(self) -> bool:
        return self.n_pairs == 0

    def to_dict(self) -> dict:
        sizes = np.bincount(self.groups, minlength=len(self.groups))
        return {"images": len(self.groups), "pairs": self.n_pairs, "groups": self.n_groups,
                "grouped_images": self.n_grouped, "largest_group": int(sizes.max(initial=0)),
                "threshold": self.threshold, "side": self.side}

    def __repr__(self) -> str:
        return (f"NearDuplicates(images={len(self.groups)}, groups={self.n_groups}, grouped_images={self.n_grouped}, "
                f"pairs={self.n_pairs}, threshold={self.threshold:g}, side={self.side})")


def near_duplicate_groups(images: torch.Tensor, threshold: float = NEAR_DUPLICATE_DISTANCE,
                          side: int = NEAR_DUPLICATE_SIDE, progress: bool = False) -> NearDuplicates:
    """The connected components of ``d <= threshold`` over ``images`` (uint8 ``(N, H, W, C)``).

    >>> x = torch.zeros(3, 4, 4, 1, dtype=torch.uint8); x[0, 0] = 90; x[1] = 20; x[1, 0] = 110; x[2, 3] = 90
    >>> near_duplicate_groups(x, threshold=0.1).groups.tolist()  # images 0 and 1 differ in brightness only
    [0, 0, 2]
    """
    i, j = close_pairs(thumbnails(images, side), None, threshold, progress=progress)
    n = images.shape[0]
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(comp.max(initial=-1) + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n, dtype=np.int64))
    return NearDuplicates(groups=first[comp], n_pairs=len(i), threshold=float(threshold), side=side)


def has_near_duplicate(images: torch.Tensor, reference: torch.Tensor, threshold: float = NEAR_DUPLICATE_DISTANCE,
                       side: int = NEAR_DUPLICATE_SIDE, progress: bool = False) -> np.ndarray:
    """Boolean ``(N,)``: whether each of ``images`` has a near-duplicate among ``reference``."""
    i, _ = close_pairs(thumbnails(images, side), thumbnails(reference, side), threshold, progress=progress)
    out = np.zeros(images.shape[0], dtype=bool)
    out[i] = True
    return out
