"""Parameter subsets by name globs and the flat-vector layout of a subset.

A curvature operator acts on the flat vector ``concat(p.reshape(-1) for p in subset)``
in the order of :attr:`ParamLayout.names`. :class:`ParamLayout` converts between that
flat vector and a ``name -> tensor`` dict.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from train.errors import BaseMismatchError, UnknownNameError

__all__ = ["ParamLayout", "layout_for", "select_params"]

_SHOWN_NAMES = 12


def select_params(model: nn.Module, globs: str | Sequence[str] | None = None) -> list[str]:
    """Names of the parameters of ``model`` selected by ``fnmatch`` globs.

    Args:
        model: Any module.
        globs: ``None`` selects every parameter with ``requires_grad``; otherwise one
            glob or a list of globs (e.g. ``"visual.transformer.resblocks.11.*"``).
            A parameter is selected if any glob matches its name; the result keeps
            the module's own ``named_parameters()`` order.

    Returns:
        The selected names, in module order.

    Raises:
        UnknownNameError: if a glob matches no parameter (the message lists some
            available names), or nothing is selected at all.
    """
    names = [n for n, _ in model.named_parameters()]
    if globs is None:
        chosen = [n for n, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            raise UnknownNameError("The model has no parameter with requires_grad=True; pass params=[...] globs.")
        return chosen
    if isinstance(globs, str):
        globs = [globs]
    globs = list(globs)
    if not globs:
        raise UnknownNameError("Empty parameter selection; pass None for all parameters or at least one glob.")
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            shown = names[:_SHOWN_NAMES] + ([f"... ({len(names) - _SHOWN_NAMES} more)"] if len(names) > _SHOWN_NAMES else [])
            raise UnknownNameError(f"Unknown parameter glob '{g}' (matches nothing). Available: {', '.join(shown)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


@dataclass(frozen=True)
class ParamLayout:
    """The flat layout of a parameter subset: names, shapes and offsets.

    Attributes:
        names: Parameter names, in flat-vector order.
        shapes: One shape per name.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError("names and shapes differ in length")

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total length D of the flat vector."""
        return sum(self.numels)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` slice of each tensor in the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels):
            out[name] = (start, start + n)
            start += n
        return out

    def flatten(self, tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Tensor:
        """Concatenate ``tensors[name].reshape(-1)`` over :attr:`names`.

        Extra keys in ``tensors`` are ignored (a full task vector can be restricted to
        the subset); missing keys or wrong shapes raise.

        Raises:
            BaseMismatchError: a name is missing or a shape differs.
        """
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if name not in tensors:
                raise BaseMismatchError(f"Tensor '{name}' is missing (the layout expects {len(self.names)} tensors).")
            t = tensors[name]
            if tuple(t.shape) != tuple(shape):
                raise BaseMismatchError(f"Tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}.")
            parts.append(t.reshape(-1).to(dtype=dtype, device=device))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(D,)`` vector (or ``(D, k)`` block) into ``name -> tensor`` views.

        A ``(D, k)`` block gives tensors of shape ``(*shape, k)``.
        """
        if flat.shape[0] != self.dim:
            raise BaseMismatchError(f"Flat vector has length {flat.shape[0]}, the layout has D={self.dim}.")
        extra = tuple(flat.shape[1:])
        out, start = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = flat[start:start + n].reshape(*shape, *extra)
            start += n
        return out

    def to_dict(self) -> dict:
        """JSON-friendly form: ``{"names": [...], "shapes": [[...], ...]}``."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}


def layout_for(model: nn.Module, names: Iterable[str]) -> ParamLayout:
    """The :class:`ParamLayout` of the named parameters of ``model``."""
    params = dict(model.named_parameters())
    names = tuple(names)
    return ParamLayout(names, tuple(tuple(params[n].shape) for n in names))
