"""Cosine similarities of task vectors, streamed tensor by tensor from safetensors files.

cos(a, b) = <a, b> / (‖a‖ ‖b‖), with <a, b>, ‖a‖² and ‖b‖² accumulated in float64 one
parameter tensor at a time, so a ViT-L vector is never held twice (or even once) in memory.
An explainability vector τ* = τ_ft* − τ_ft (paper eq. 6–8) is read as the difference of two
files, tensor by tensor (:class:`VectorSpec`).

Groups (``by="block"``): ``embed`` (conv1, class_embedding, positional_embedding, ln_pre),
``block.<i>`` (``transformer.resblocks.<i>``), ``head`` (ln_post, proj), ``other``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from train.errors import ArtifactError, BaseMismatchError, DataError, unknown
from train.store import alpha_tag
from train.tensorio import verify_checksum

log = logging.getLogger(__name__)

BY_CHOICES = ("global", "tensor", "block")


class UnverifiedBaseWarning(UserWarning):
    """A vector file carries no ``base_hash`` metadata, so its base cannot be checked."""


@dataclass(frozen=True)
class VectorSpec:
    """A task vector read from one safetensors file, or the difference of two.

    ``VectorSpec(plus)`` is the vector stored in ``plus``; ``VectorSpec(plus, minus)`` is
    plus − minus, e.g. τ* = τ_ft* − τ_ft = ``VectorSpec(ftx, ft)`` (paper eq. 6–8).
    """

    plus: Path
    minus: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "plus", Path(self.plus))
        if self.minus is not None:
            object.__setattr__(self, "minus", Path(self.minus))

    @classmethod
    def explainability(cls, vectors_dir: str | Path, alpha: float = 0.8) -> "VectorSpec":
        """τ* of one domain of the store: ``<dir>/ftx-a<alpha>.safetensors`` − ``<dir>/ft.safetensors``."""
        d = Path(vectors_dir)
        return cls(d / f"ftx-{alpha_tag(alpha)}.safetensors", d / "ft.safetensors")

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.plus,) if self.minus is None else (self.plus, self.minus)

    def __str__(self) -> str:
        return str(self.plus) if self.minus is None else f"{self.plus} - {self.minus}"


def as_spec(v: str | Path | VectorSpec) -> VectorSpec:
    """A :class:`VectorSpec` from a path or a spec."""
    return v if isinstance(v, VectorSpec) else VectorSpec(Path(v))


def block_group(key: str) -> str:
    """Group name of a parameter: ``embed``, ``block.<i>``, ``head`` or ``other``.

    >>> block_group("visual.transformer.resblocks.3.mlp.c_fc.weight"), block_group("visual.proj")
    ('block.3', 'head')
    """
    m = re.search(r"(?:^|\.)transformer\.resblocks\.(\d+)\.", key)
    if m:
        return f"block.{int(m.group(1))}"
    leaf = key.split(".")
    if any(p in ("conv1", "class_embedding", "positional_embedding", "ln_pre") for p in leaf):
        return "embed"
    if any(p in ("ln_post", "proj") for p in leaf):
        return "head"
    return "other"


def _group_order(name: str):
    if name == "embed":
        return (0, 0)
    if name.startswith("block."):
        return (1, int(name.split(".")[1]))
    if name == "head":
        return (2, 0)
    return (3, name)


def _make_filter(param_filter) -> Callable[[str], bool]:
    if param_filter is None:
        return lambda k: True
    if callable(param_filter):
        return param_filter
    globs = [param_filter] if isinstance(param_filter, str) else list(param_filter)
    return lambda k: any(fnmatch.fnmatchcase(k, g) for g in globs)


@dataclass(frozen=True)
class GroupSimilarity:
    """Cosine of one group of parameters: dot / (norm_a · norm_b) (NaN if a norm is 0)."""

    cosine: float
    dot: float
    norm_a: float
    norm_b: float
    numel: int

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "dot": self.dot, "norm_a": self.norm_a, "norm_b": self.norm_b,
                "numel": self.numel}


def cosine_from(dot: float, na2: float, nb2: float) -> float:
    """``dot / (‖a‖ ‖b‖)`` from a dot product and two squared norms; NaN when a norm is 0."""
    den = np.sqrt(na2 * nb2)  # one root: a vector with itself gives exactly 1
    return float(dot / den) if den > 0 else float("nan")


@dataclass(frozen=True)
class SimilarityResult:
    """Cosine similarity of two task vectors, globally and per group.

    Attributes:
        cosine: global cos(a, b) over the selected parameters.
        dot, norm_a, norm_b: <a, b>, ‖a‖, ‖b‖ (float64).
        numel: number of scalar parameters compared.
        by: grouping used for ``groups`` (``global`` gives no groups).
        groups: group name → :class:`GroupSimilarity`, in model order.
    """

    cosine: float
    dot: float
    norm_a: float
    norm_b: float
    numel: int
    by: str
    groups: dict[str, GroupSimilarity] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"SimilarityResult(cosine={self.cosine:.4f}, norm_a={self.norm_a:.4g}, norm_b={self.norm_b:.4g}, "
                f"numel={self.numel}, by={self.by!r}, groups={len(self.groups)})")

    def group_cosines(self) -> dict[str, float]:
        return {g: r.cosine for g, r in self.groups.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per group (columns group, cosine, dot, norm_a, norm_b, numel)."""
        return pd.DataFrame([{"group": g, **r.to_dict()} for g, r in self.groups.items()],
                            columns=["group", "cosine", "dot", "norm_a", "norm_b", "numel"])

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "dot": self.dot, "norm_a": self.norm_a, "norm_b": self.norm_b,
                "numel": self.numel, "by": self.by, "groups": {g: r.to_dict() for g, r in self.groups.items()}}


class _Reader:
    """Opened safetensors handles of several specs; reads one key as float64 at a time."""

    def __init__(self, stack: contextlib.ExitStack, specs: list[VectorSpec]):
        self.specs = specs
        self.handles: dict[Path, object] = {}
        for spec in specs:
            for f in spec.files:
                if f in self.handles:
                    continue
                if not f.is_file():
                    raise ArtifactError(f"task vector file not found: {f}")
                try:
                    self.handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                    verify_checksum(f, self.handles[f].metadata() or {})
                except ArtifactError:
                    raise
                except (SafetensorError, OSError, ValueError) as exc:
                    raise ArtifactError(f"cannot read safetensors file {f}: {exc}") from exc
        self._check_base()
        self.keys = self._check_keys()

    def _check_base(self) -> None:
        hashes = {}
        for f, h in self.handles.items():
            meta = h.metadata() or {}
            if "base_hash" in meta:
                hashes[f] = meta["base_hash"]
            else:
                warnings.warn(f"{f} has no base_hash metadata; its base cannot be verified", UnverifiedBaseWarning,
                              stacklevel=4)
        if len(set(hashes.values())) > 1:
            listing = ", ".join(f"{f.name}={h[:12]}" for f, h in hashes.items())
            raise BaseMismatchError(f"task vectors come from different base models: {listing}")

    def _check_keys(self) -> list[str]:
        ref_file, ref = None, None
        for f, h in self.handles.items():
            shapes = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
            if ref is None:
                ref_file, ref = f, shapes
                continue
            if shapes.keys() != ref.keys():
                only_a = sorted(ref.keys() - shapes.keys())[:3]
                only_b = sorted(shapes.keys() - ref.keys())[:3]
                raise BaseMismatchError(f"parameter names differ between {ref_file} and {f}: only in the first "
                                        f"{only_a}, only in the second {only_b}")
            bad = [k for k in ref if ref[k] != shapes[k]]
            if bad:
                k = bad[0]
                raise BaseMismatchError(f"shape of {k} differs: {ref[k]} in {ref_file}, {shapes[k]} in {f}")
        return list(ref)

    def read(self, spec: VectorSpec, key: str) -> torch.Tensor:
        t = self.handles[spec.plus].get_tensor(key).to(torch.float64).reshape(-1)
        if spec.minus is not None:
            t = t - self.handles[spec.minus].get_tensor(key).to(torch.float64).reshape(-1)
        if not torch.isfinite(t).all():
            raise ArtifactError(f"non-finite values in {key} of {spec}")
        return t


def _grouper(by: str) -> Callable[[str], str | None]:
    if by == "global":
        return lambda k: None
    if by == "tensor":
        return lambda k: k
    if by == "block":
        return block_group
    raise unknown("grouping", by, BY_CHOICES)


def gram_streamed(specs: Iterable[str | Path | VectorSpec], by: str = "global",
                  param_filter=None) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Gram matrix G_ij = <v_i, v_j> of k vectors in one streamed pass, globally and per group.

    Every file is opened once; for each parameter key the k tensors (and the files they are
    differences of) are read, flattened to float64, stacked and multiplied, so memory stays at
    k copies of the largest single tensor.

    Args:
        specs: the vectors (paths or :class:`VectorSpec`).
        by: ``"global"``, ``"tensor"`` or ``"block"`` grouping of the per-group Gram matrices.
        param_filter: None, a glob (``"visual.transformer.*"``), a list of globs or a
            predicate on the parameter name; only matching keys are used.

    Returns:
        (global Gram (k, k), {group: Gram (k, k)}, {group: numel}); the global numel is under
        the key ``""`` of the last dict.

    Raises:
        BaseMismatchError: base_hash metadata, key sets or shapes differ.
        ArtifactError: a file is missing, unreadable or holds NaN/Inf.
        DataError: no key matches ``param_filter``.
    """
    specs = [as_spec(s) for s in specs]
    keep = _make_filter(param_filter)
    with contextlib.ExitStack() as stack:
        reader = _Reader(stack, specs)
        keys = [key for key in reader.keys if keep(key)]
        if not keys:
            raise DataError(f"no parameter matches the filter {param_filter!r}; first keys: {reader.keys[:3]}")
        return _accumulate_gram(keys, lambda key: torch.stack([reader.read(s, key) for s in specs]), len(specs), by)


def _accumulate_gram(keys: list[str], rows: Callable[[str], torch.Tensor], k: int,
                     by: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Σ over parameter keys of M Mᵀ with M = ``rows(key)`` (k, numel) in float64, globally and per group.

    The one numerical routine of every cosine in ``diag`` (streamed files and in-memory vectors).
    """
    group_of = _grouper(by)
    total = np.zeros((k, k))
    groups: dict[str, np.ndarray] = {}
    numel: dict[str, int] = {"": 0}
    for key in keys:
        m = rows(key).double()
        g = (m @ m.T).numpy()
        total += g
        numel[""] += m.shape[1]
        name = group_of(key)
        if name is not None:
            groups[name] = groups.get(name, np.zeros((k, k))) + g
            numel[name] = numel.get(name, 0) + m.shape[1]
        del m
    order = sorted(groups, key=_group_order) if by == "block" else list(groups)
    return total, {g: groups[g] for g in order}, numel


def _similarity_from_gram(G: np.ndarray, groups: dict[str, np.ndarray], numel: dict[str, int],
                          by: str) -> "SimilarityResult":
    glob_ = _result_from_gram(G, numel[""])
    return SimilarityResult(cosine=glob_.cosine, dot=glob_.dot, norm_a=glob_.norm_a, norm_b=glob_.norm_b,
                            numel=glob_.numel, by=by,
                            groups={g: _result_from_gram(M, numel[g]) for g, M in groups.items()})


def vector_similarity(a, b, by: str = "global") -> "SimilarityResult":
    """cos(a, b) of two in-memory :class:`~train.vectors.TaskVector` s, globally and per group.

    Same float64 accumulation as :func:`cosine_streamed` (:func:`_accumulate_gram`), over the
    keys of ``a`` in sorted order.

    Raises:
        BaseMismatchError: different bases, key sets or shapes.
    """
    if by not in BY_CHOICES:
        raise unknown("grouping", by, BY_CHOICES)
    if a.base_hash != b.base_hash:
        raise BaseMismatchError(f"Task vectors of different bases: {a.base_hash} vs {b.base_hash}")
    if a.tensors.keys() != b.tensors.keys():
        raise BaseMismatchError(f"Task vectors have different parameters, e.g. {sorted(set(a.tensors) ^ set(b.tensors))[:3]}")
    for key, v in a.tensors.items():
        if v.shape != b.tensors[key].shape:
            raise BaseMismatchError(f"Shape mismatch for '{key}': {tuple(v.shape)} vs {tuple(b.tensors[key].shape)}")
    G, groups, numel = _accumulate_gram(
        sorted(a.tensors), lambda key: torch.stack([a.tensors[key].reshape(-1), b.tensors[key].reshape(-1)]), 2, by)
    return _similarity_from_gram(G, groups, numel, by)


def _result_from_gram(G: np.ndarray, numel: int) -> GroupSimilarity:
    return GroupSimilarity(cosine=cosine_from(G[0, 1], G[0, 0], G[1, 1]), dot=float(G[0, 1]),
                           norm_a=float(np.sqrt(G[0, 0])), norm_b=float(np.sqrt(G[1, 1])), numel=int(numel))


def cosine_streamed(a: str | Path | VectorSpec, b: str | Path | VectorSpec, by: str = "global",
                    param_filter=None) -> SimilarityResult:
    """cos(a, b) = <a, b> / (‖a‖ ‖b‖) of two task vectors, streamed, globally and per group.

    Args:
        a, b: a safetensors path or a :class:`VectorSpec` (e.g. τ* = τ_ft* − τ_ft).
        by: ``"global"`` (no groups), ``"tensor"`` (one group per key) or ``"block"``
            (embed, block.<i>, head, other).
        param_filter: glob(s) or predicate selecting the parameters compared.

    Returns:
        SimilarityResult; a zero vector gives a NaN cosine.

    Raises:
        BaseMismatchError: differing ``base_hash`` metadata, key sets or shapes.
        ArtifactError: unreadable files or non-finite values.
        UnknownNameError: an unknown ``by``.
    """
    if by not in BY_CHOICES:
        raise unknown("grouping", by, BY_CHOICES)
    G, groups, numel = gram_streamed([a, b], by=by, param_filter=param_filter)
    return _similarity_from_gram(G, groups, numel, by)


def _cosine_frame(G: np.ndarray, names: list[str]) -> pd.DataFrame:
    d = np.sqrt(np.diag(G))
    with np.errstate(invalid="ignore", divide="ignore"):
        C = G / np.outer(d, d)
    C[np.outer(d, d) == 0] = np.nan
    C = np.clip(C, -1.0, 1.0)
    return pd.DataFrame(C, index=pd.Index(names, name="domain"), columns=pd.Index(names, name="domain"))


def similarity_matrices(paths_by_domain: Mapping[str, str | Path | VectorSpec], by: str = "block",
                        param_filter=None) -> dict[str, pd.DataFrame]:
    """Cosine matrices (domains × domains) globally (key ``"global"``) and per group, one pass."""
    if by not in BY_CHOICES:
        raise unknown("grouping", by, BY_CHOICES)
    names = list(paths_by_domain)
    G, groups, _ = gram_streamed([paths_by_domain[n] for n in names], by=by, param_filter=param_filter)
    out = {"global": _cosine_frame(G, names)}
    out.update({g: _cosine_frame(M, names) for g, M in groups.items()})
    return out
