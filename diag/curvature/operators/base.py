"""The operator contract: a symmetric ``D x D`` linear map with one product, plus a dense one.

:class:`CurvatureOperator` subclasses implement :meth:`CurvatureOperator._matvec`
(and optionally ``_matmat`` for ``(D, k)`` blocks); the base class provides
``op @ v``, :meth:`~CurvatureOperator.to_scipy` and :meth:`~CurvatureOperator.to_dense`.
"""

from __future__ import annotations

import numpy as np
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from train.errors import TvdiagError

if TYPE_CHECKING:  # scipy.sparse takes a second to import: loaded by to_scipy only
    from scipy.sparse.linalg import LinearOperator

__all__ = ["MAX_DENSE_DIM", "CurvatureOperator", "DenseOperator"]

MAX_DENSE_DIM = 20000
"""Largest D for which :meth:`CurvatureOperator.to_dense` builds the matrix."""


class CurvatureOperator:
    """A symmetric linear operator ``A`` on flat ``(D,)`` vectors.

    Subclasses implement :meth:`_matvec` and set :attr:`shape`, :attr:`dtype` and
    :attr:`device` (by calling ``super().__init__``).

    Attributes:
        SELF_ADJOINT: ``A = A^T`` (true for every curvature matrix here).
        shape: ``(D, D)``.
        dtype: dtype of the products.
        device: device of the products.
    """

    SELF_ADJOINT = True

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape: tuple[int, int] = (int(dim), int(dim))
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)

    # -- the one product --------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        """Return ``A v`` for a flat ``(D,)`` vector already on the operator's dtype/device."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        """Return ``A V`` for a ``(D, k)`` block (default: one :meth:`_matvec` per column)."""
        if V.shape[1] == 0:
            return V.clone()
        return torch.stack([self._matvec(V[:, j].contiguous()) for j in range(V.shape[1])], dim=1)

    # -- public interface -------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(D,)`` or ``(D, k)``; returns the same shape.

        The result has the operator's dtype and the input's device (a CPU vector gets a CPU
        product from a GPU operator).
        """
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, Tensor):
            return NotImplemented
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[1]:
            raise ValueError(f"Expected a ({self.shape[1]},) vector or ({self.shape[1]}, k) block, got {tuple(v.shape)}.")
        home = v.device
        v = v.detach().to(dtype=self.dtype, device=self.device)
        with torch.no_grad():
            out = self._matvec(v) if v.ndim == 1 else self._matmat(v)
        return out.detach().to(home)

    def quadratic_form(self, v: Tensor) -> float:
        """``v^T A v`` with a float64 reduction (one product)."""
        v = v.detach().to(dtype=self.dtype, device=self.device).reshape(-1)
        return float(torch.dot(v.double(), (self @ v).double()))

    def to_scipy(self) -> LinearOperator:
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        D = self.shape[0]

        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            out = self @ torch.from_numpy(np.ascontiguousarray(x.reshape(D)))
            return out.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            out = self @ torch.from_numpy(np.ascontiguousarray(X))
            return out.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    def to_dense(self, chunk: int = 64) -> Tensor:
        """The ``D x D`` matrix, from products with unit vectors (``chunk`` at a time).

        Raises:
            TvdiagError: if ``D > MAX_DENSE_DIM`` (20000).
        """
        D = self.shape[0]
        if D > MAX_DENSE_DIM:
            raise TvdiagError(f"to_dense() refuses D={D} > {MAX_DENSE_DIM}; use a parameter subset or an estimator.")
        cols = []
        for start in range(0, D, chunk):
            stop = min(D, start + chunk)
            E = torch.zeros(D, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self @ E)
        return torch.cat(cols, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(D={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix as a :class:`CurvatureOperator` (for tests and small problems).

    Args:
        matrix: ``(D, D)`` symmetric tensor.
        atol: Symmetry tolerance, relative to ``max |matrix|``.

    Raises:
        ValueError: if ``matrix`` is not square or not symmetric.
    """

    def __init__(self, matrix: Tensor, atol: float = 1e-8) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got {tuple(matrix.shape)}.")
        scale = float(matrix.abs().max()) if matrix.numel() else 0.0
        if matrix.numel() and float((matrix - matrix.T).abs().max()) > atol * max(scale, 1.0):
            raise ValueError("DenseOperator needs a symmetric matrix.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix.detach()

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def to_dense(self, chunk: int = 64) -> Tensor:
        return self.matrix.clone()

