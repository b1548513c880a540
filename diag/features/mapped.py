"""Memory-mapped safetensors read tensor by tensor: model and vector files, Hessian cards.

:class:`TensorFile` maps a file and hands out zero-copy flat views of (parts of) its tensors,
whose resident pages a streamed pass drops once used (:meth:`TensorFile.release`), so memory
stays at a few blocks whatever the file size; :class:`CardStream` reads a Hessian card's
eigenvectors and residual diagonal parameter by parameter; :class:`_MemoryFile` puts a
checkpoint that cannot be mapped (a torch file) behind the same API. Used by
:mod:`diag.openworld` and :mod:`diag.features.streamed`.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import mmap
from pathlib import Path

import numpy as np
import torch

from diag.curvature.card import CARD_FORMAT
from train.errors import ArtifactError
from train.tensorio import _DTYPES as _CODES, read_metadata

__all__ = ["CardStream", "TensorFile", "skip_exit_collection"]

_DTYPES = {code: dtype for dtype, code in _CODES.items()}  # safetensors dtype code → torch dtype


class TensorFile:
    """A safetensors file, memory-mapped and read tensor by tensor (never the whole file at once).

    :meth:`view` is a zero-copy flat tensor over the mapping: its pages come from the page cache
    when first touched and stay counted in the resident set until :meth:`release` drops them, so
    a streamed pass keeps one block resident whatever the file size. ``rename`` maps stored names
    to the names callers use (e.g. a visual tower's keys to ``visual.*``).
    """

    def __init__(self, path: str | Path, rename=None):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)  # refuses pickles, truncated and corrupt files first
        with self.path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            self._start = 8 + n
            end = self._start + max((e["data_offsets"][1] for e in header.values()), default=0)
            # a private (copy-on-write) mapping is writable, so torch views need no read-only copy; nothing is written
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if end > self._start else None
        self._bytes = np.frombuffer(self._map, dtype=np.uint8) if self._map is not None else np.empty(0, np.uint8)
        if len(self._bytes) < end:
            raise ArtifactError(f"{self.path} is truncated ({len(self._bytes)} bytes, tensors end at {end})")
        odd = sorted({e["dtype"] for e in header.values()} - set(_DTYPES))
        if odd:
            raise ArtifactError(f"{self.path} holds tensors of dtype {odd[0]}; readable: {', '.join(sorted(_DTYPES))}")
        rename = rename or (lambda k: k)
        self.entries = {rename(k): v for k, v in header.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _span(self, name: str, start: int = 0, stop: int | None = None) -> tuple[int, int, torch.dtype]:
        """Bytes ``[lo, hi)`` of the file holding values ``[start, stop)`` of flattened tensor ``name``; its dtype."""
        e = self.entries[name]
        dtype = _DTYPES[e["dtype"]]
        size = dtype.itemsize
        lo, hi = e["data_offsets"]
        stop = (hi - lo) // size if stop is None else stop
        return self._start + lo + start * size, self._start + lo + stop * size, dtype

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Values ``[start, stop)`` of tensor ``name`` flattened, as stored, without a copy (unless misaligned)."""
        lo, hi, dtype = self._span(name, start, stop)
        raw = self._bytes[lo:hi]
        if lo % dtype.itemsize:
            raw = raw.copy()
        return torch.from_numpy(raw).view(dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or rows ``[a, b)`` of its first axis), as stored, in memory of its own."""
        shape = list(self.entries[name]["shape"])
        per = math.prod(shape[1:])
        if rows is None:
            return self.view(name).clone().reshape(shape)
        shape[0] = rows[1] - rows[0]
        return self.view(name, rows[0] * per, rows[1] * per).clone().reshape(shape)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the resident pages of values ``[start, stop)`` of ``name`` (whole pages; touched again, they are
        mapped again from the page cache)."""
        lo, hi, _ = self._span(name, start, stop)
        lo -= lo % mmap.PAGESIZE
        if self._map is not None and hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, min(hi - lo, len(self._map) - lo))

    def close(self) -> None:
        """Unmap (at once, or when the last view of it is freed)."""
        self._bytes, self._map = np.empty(0, np.uint8), None


def skip_exit_collection() -> None:
    """At interpreter exit, skip the final garbage collection over the objects alive now.

    After ``import torch`` and pandas, the collection CPython runs at shutdown walks millions of
    module objects: ~1 s of a 2-core machine, a fifth of a ranking. ``gc.freeze`` at exit (an
    ``atexit`` hook runs before that collection) moves them out of its reach; nothing is cleaned up
    that exit would not free anyway.
    """
    atexit.register(gc.freeze)


class CardStream:
    """A Hessian card read block by block: eigvals, and per parameter its rows of V, r and g (when stored)."""
    def __init__(self, path: str | Path):
        self.file = TensorFile(path)
        meta = self.file.metadata
        if meta.get("format") != CARD_FORMAT:
            raise ArtifactError(f"'{path}' is not a Hessian card (format {meta.get('format')!r})")
        lacking = [k for k in ("param_names", "param_shapes") if k not in meta] + \
            [k for k in ("eigvals", "eigvecs", "residual_diag") if k not in self.file.entries]
        if lacking:
            raise ArtifactError(f"Hessian card '{path}' is damaged: it lacks {', '.join(lacking)}")
        self.names = json.loads(meta["param_names"])
        shapes = [tuple(s) for s in json.loads(meta["param_shapes"])]
        self.shapes = dict(zip(self.names, shapes))
        self.provenance = json.loads(meta.get("provenance", "{}"))
        self.eigvals = self.file.read("eigvals").double()
        self.has_gradient = "gradient" in self.file.entries
        self.offsets, off = {}, 0
        for name, shape in zip(self.names, shapes):
            n = math.prod(shape)
            self.offsets[name] = (off, off + n)
            off += n

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(V rows (n, k), r (n,), g (n,) or None) of parameter ``name``: views of the mapped file, as stored."""
        lo, hi = self.offsets[name]
        k = len(self.eigvals)
        g = self.file.view("gradient", lo, hi) if self.has_gradient else None
        return self.file.view("eigvecs", lo * k, hi * k).view(hi - lo, k), self.file.view("residual_diag", lo, hi), g

    def release(self, name: str) -> None:
        """Drop the resident pages of parameter ``name``'s rows."""
        lo, hi = self.offsets[name]
        k = len(self.eigvals)
        self.file.release("eigvecs", lo * k, hi * k)
        self.file.release("residual_diag", lo, hi)
        if self.has_gradient:
            self.file.release("gradient", lo, hi)


class _MemoryFile:
    """A checkpoint that cannot be streamed (a torch file), held in memory behind :class:`TensorFile`'s API."""
    def __init__(self, path: Path, tensors: dict):
        self.path, self.tensors, self.metadata = path, tensors, {}
        self.entries = {k: {"shape": list(v.shape)} for k, v in tensors.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def view(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[start:stop]

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass
