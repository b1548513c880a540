"""The linear layers a Kronecker-factored card covers, and how their inputs and outputs are seen.

A covered layer computes ``s = W a (+ b)`` on every row ``a`` of its input, with ``W`` of shape
``out x in``. The vision tower of open_clip has five kinds:

* ``linear``: an ``nn.Linear`` (attention ``out_proj``, MLP ``c_fc`` / ``c_proj``);
* ``patch``: the patch-embedding ``nn.Conv2d`` (kernel = stride, no padding), a linear map on
  the unfolded patches (``W = weight.reshape(out, C*kh*kw)``, one row per patch);
* ``in_proj``: the packed q, k, v projection of a self-attention ``nn.MultiheadAttention``
  (``in_proj_weight``, ``3E x E``). PyTorch applies it inside ``F.multi_head_attention_forward``,
  where no module hook sees its input or output, so while factors are collected a forward hook
  replaces the module's output by :func:`attention_forward` — the same attention written with an
  explicit ``qkv = F.linear(x, W, b)`` (checked against the module's own output on every call);
* ``proj``: open_clip's ``VisionTransformer.proj`` (a parameter used as ``pooled @ proj``, so
  ``W = proj^T``), input the pooled token after ``ln_post``.

Tokens are an extra batch dimension (the "expand" convention): every token row of every image
is one row ``a`` with its own output gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.errors import TvdiagError

__all__ = ["KINDS", "LayerSpec", "attention_forward", "check_self_attention", "covered_layers"]

KINDS = ("linear", "patch", "in_proj", "proj")


@dataclass(frozen=True)
class LayerSpec:
    """One covered layer.

    Attributes:
        name: The module's name (``""`` for the root).
        kind: One of :data:`KINDS`.
        weight: Full parameter name of W.
        bias: Full parameter name of b, or None (no bias, or the bias is not selected).
        out_dim, in_dim: W's shape as ``out x in`` (without the bias column).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    out_dim: int
    in_dim: int

    @property
    def a_dim(self) -> int:
        """Size of the input factor A: ``in_dim`` plus one for a folded bias."""
        return self.in_dim + (self.bias is not None)

    def block(self, tensors: dict[str, Tensor]) -> Tensor:
        """The layer's ``out x a_dim`` block ``[W | b]`` of a ``name -> tensor`` dict (e.g. a task vector)."""
        w = tensors[self.weight]
        w = w.T if self.kind == "proj" else w.reshape(self.out_dim, self.in_dim)
        if self.bias is None:
            return w
        return torch.cat([w, tensors[self.bias].reshape(self.out_dim, 1)], dim=1)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _is_patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.padding in (0, (0, 0))
            and m.dilation == (1, 1) and m.groups == 1)


def _is_open_clip_tower(m: nn.Module) -> bool:
    proj = getattr(m, "proj", None)
    return (isinstance(proj, nn.Parameter) and proj.ndim == 2 and hasattr(m, "_global_pool")
            and isinstance(getattr(m, "ln_post", None), nn.Module))


def covered_layers(model: nn.Module, selected: set[str] | None = None) -> list[LayerSpec]:
    """The layers of ``model`` a Kronecker-factored card covers, in module order.

    Args:
        model: Any module (layers of the kinds in the module docstring are found wherever they sit).
        selected: Parameter names the card is over; a layer is covered when its weight is selected
            (its bias is folded in when selected too). None: every parameter.

    Returns:
        One :class:`LayerSpec` per covered layer.
    """
    named = dict(model.named_parameters())
    chosen = set(named) if selected is None else set(selected)
    out: list[LayerSpec] = []

    def add(name: str, kind: str, w: str, b: str | None, out_dim: int, in_dim: int) -> None:
        if w in chosen:
            out.append(LayerSpec(name, kind, w, b if (b is not None and b in chosen) else None, out_dim, in_dim))

    for name, m in model.named_modules():
        p = _prefix(name)
        if isinstance(m, nn.Linear):
            add(name, "linear", p + "weight", p + "bias" if m.bias is not None else None, m.out_features,
                m.in_features)
        elif _is_patch_conv(m):
            w = m.weight
            add(name, "patch", p + "weight", p + "bias" if m.bias is not None else None, w.shape[0],
                w[0].numel())
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            add(name, "in_proj", p + "in_proj_weight", p + "in_proj_bias" if m.in_proj_bias is not None else None,
                m.in_proj_weight.shape[0], m.in_proj_weight.shape[1])
        if _is_open_clip_tower(m):
            add(name, "proj", p + "proj", None, m.proj.shape[1], m.proj.shape[0])
    return out


def attention_forward(mha: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Self-attention of ``mha`` on ``x`` with the q, k, v projection made explicit.

    ``qkv = x W_inᵀ + b_in``, split into heads, ``softmax(q kᵀ/√d + mask) v`` (the math kernel),
    heads merged and ``mha.out_proj`` called as a module (so its hooks fire; PyTorch's own path
    applies it with ``F.linear``). Eval mode only (no dropout).

    Returns:
        ``(output, qkv)``: the attention output in ``mha``'s layout and the ``(..., 3E)`` projection.
    """
    if not mha.batch_first:
        x = x.transpose(0, 1)
    B, T, E = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.reshape(B, T, h, E // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = mha.out_proj(o.transpose(1, 2).reshape(B, T, E))
    return (o if mha.batch_first else o.transpose(0, 1)), qkv


def check_self_attention(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """The input and mask of a self-attention call; raises for what :func:`attention_forward` does not do."""
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    v = args[2] if len(args) > 2 else kwargs.get("value", q)
    if (k is not q or v is not q or kwargs.get("key_padding_mask") is not None or mha.training
            or getattr(mha, "bias_k", None) is not None or mha.add_zero_attn):
        raise TvdiagError("Kronecker factors of an attention in-projection need plain self-attention in eval mode "
                          "(query is key is value, no key padding mask, no bias_k, no add_zero_attn); "
                          "leave its in_proj_weight out of the card's parameters")
    return q, kwargs.get("attn_mask")
