"""Attention settings that make second-order and forward-mode autodiff work.

The fused scaled-dot-product-attention kernels (flash, memory-efficient, cuDNN, the
CPU fused kernel) implement neither double backward nor forward-mode AD, and the
``nn.MultiheadAttention`` inference fast path (``torch._native_multi_head_attention``)
has no forward-mode rule either. Inside :func:`curvature_mode` attention runs through
the plain math kernel, which is made of differentiable primitives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["curvature_mode"]


@contextlib.contextmanager
def curvature_mode() -> Iterator[None]:
    """Route attention through the math SDPA kernel and disable the MHA fast path.

    Restores the previous kernel selection and fast-path flag on exit, also when the
    body raises. Nesting is safe.

    Example:
        >>> import torch
        >>> with curvature_mode():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
