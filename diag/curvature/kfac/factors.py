"""Kronecker factors of the cross-entropy GGN, one ``(A, G)`` pair per covered linear layer (K-FAC).

For a layer ``s = W a`` (bias folded as a last input of 1) applied to rows ``t`` of sample ``n``,
the GGN block of the mean cross-entropy is

    G_W = (1/N) Σ_n Σ_c (Σ_t a_nt ⊗ g_ntc)(Σ_t' a_nt' ⊗ g_nt'c)ᵀ,   g_ntc = ∂(S_ncᵀ f_n)/∂s_nt,

where ``S_n S_nᵀ = diag(p_n) − p_n p_nᵀ`` is the output Hessian of CE at the logits ``f_n``
(``S_n[:, c] = √p_nc (e_c − p_n)``; the exact expectation over the model's labels, "type-2":
C backward passes per batch, no sampling noise, no seed). Dropping the cross-token terms (the
"expand" convention: tokens as an extra batch dimension) and replacing the mean of Kronecker
products by the Kronecker product of means gives ``G_W ≈ A ⊗ G`` with

    A = (1/(N·T)) Σ_nt a_nt a_ntᵀ,      G = (1/N) Σ_ntc g_ntc g_ntcᵀ,

exact for one sample with one row. With ``W`` shaped ``out x in`` and column-major ``vec``,
``vec(T)ᵀ (A ⊗ G) vec(T) = tr(Tᵀ G T A)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diag.curvature.kfac.layers import attention_forward, check_self_attention, covered_layers, LayerSpec
from diag.curvature.operators import _eval_mode
from diag.curvature.operators.attention import curvature_mode
from diag.curvature.params import select_params
from train.errors import DataError, TvdiagError, unknown

__all__ = ["APPROXIMATIONS", "class_gradients", "kfac_factors", "layer_passes"]


class _Recorder:
    """Forward hooks that keep, per covered layer, each call's input rows ``a`` and output tensor ``s``."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec]):
        self.layers = list(layers)
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {sp.name: [] for sp in self.layers}
        self.modules = dict(model.named_modules())
        self._handles: list = []
        self._pooled: dict[str, Tensor] = {}

    def _rows(self, sp: LayerSpec, a: Tensor) -> Tensor:
        a = a.detach().reshape(-1, sp.in_dim)
        if sp.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        return a

    def _linear_hook(self, sp: LayerSpec):
        def hook(module, args, out):
            self.calls[sp.name].append((self._rows(sp, args[0]), out))
        return hook

    def _patch_hook(self, sp: LayerSpec):
        def hook(module, args, out):
            cols = F.unfold(args[0], module.kernel_size, stride=module.stride)  # (B, C*kh*kw, L)
            self.calls[sp.name].append((self._rows(sp, cols.transpose(1, 2)), out))  # out: (B, out, gh, gw)
        return hook

    def _attention_hook(self, sp: LayerSpec | None):
        def hook(module, args, kwargs, out):
            x, mask = check_self_attention(module, args, kwargs)
            o, qkv = attention_forward(module, x, mask)
            ref = out[0]
            if not torch.allclose(o.detach(), ref.detach(), rtol=1e-4, atol=1e-5 * (1 + float(ref.detach().abs().max()))):
                raise TvdiagError(f"the explicit attention of '{module}' differs from PyTorch's own output; "
                                  "its in-projection cannot be factored here")
            if sp is not None:
                self.calls[sp.name].append((self._rows(sp, x), qkv))
            return (o, *out[1:])
        return hook

    def _tower_hooks(self, sp: LayerSpec, tower: nn.Module) -> list:
        def keep_ln(module, args, out):
            self._pooled[sp.name] = out if out.ndim == 2 else tower._global_pool(out)[0]

        def keep_out(module, args, out):
            pooled = out[0] if isinstance(out, tuple) else out
            a = self._pooled.pop(sp.name)
            if not torch.allclose((a @ tower.proj).detach(), pooled.detach(), rtol=1e-4, atol=1e-5):
                raise TvdiagError(f"'{sp.weight}' is not applied as pooled @ proj after ln_post here")
            self.calls[sp.name].append((self._rows(sp, a), pooled))
        return [tower.ln_post.register_forward_hook(keep_ln), tower.register_forward_hook(keep_out)]

    def __enter__(self) -> _Recorder:
        by_name = {sp.name: sp for sp in self.layers}
        for name, m in self.modules.items():
            sp = by_name.get(name)
            if isinstance(m, nn.MultiheadAttention):
                # out_proj only fires its hooks through the explicit attention
                if sp is not None or by_name.get(f"{name}.out_proj" if name else "out_proj") is not None:
                    self._handles.append(m.register_forward_hook(self._attention_hook(sp), with_kwargs=True))
            if sp is None:
                continue
            if sp.kind == "linear":
                self._handles.append(m.register_forward_hook(self._linear_hook(sp)))
            elif sp.kind == "patch":
                self._handles.append(m.register_forward_hook(self._patch_hook(sp)))
            elif sp.kind == "proj":
                self._handles.extend(self._tower_hooks(sp, m))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()


def _batches(data: Iterable, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in data:
        x, y = batch[0], batch[1]
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        yield x, torch.as_tensor(y, device=device).long()


def _output_sqrt(logits: Tensor) -> Tensor:
    """``(B, C, C)``: per sample ``S`` with ``S Sᵀ = diag(p) − p pᵀ``, column c = ``√p_c (e_c − p)``."""
    p = torch.softmax(logits.detach(), dim=-1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return (eye.unsqueeze(0) - p.unsqueeze(1)) * p.sqrt().unsqueeze(2)  # [n, c, :] = √p_c (e_c − p)


APPROXIMATIONS = ("expand", "reduce")


def _per_sample(approx: str, rows: Tensor, B: int, reduce: str) -> Tensor:
    """Rows as they enter a factor: as they are (``expand``), or one per sample, the mean of its inputs or
    the sum of its output gradients (``reduce``)."""
    if approx == "expand":
        return rows
    rows = rows.reshape(B, -1, rows.shape[-1])
    return rows.mean(1) if reduce == "mean" else rows.sum(1)


def layer_passes(model: nn.Module, data: Iterable, layers: Sequence[LayerSpec]
                 ) -> Iterator[tuple[Tensor, list[tuple[int, Tensor, Tensor]]]]:
    """Per batch ``(logits, [(layer index, input rows a, output tensor s)])`` with the graph alive, in eval mode
    and on the math attention kernel (restored when the generator ends); ``a`` carries the bias column."""
    first = next(model.parameters())
    rec = _Recorder(model, layers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(curvature_mode())
        stack.enter_context(_eval_mode(model))
        stack.enter_context(rec)
        for x, _ in _batches(data, first.device, first.dtype):
            rec.clear()
            with torch.enable_grad():
                logits = model(x)
                yield logits, [(j, a, s) for j, sp in enumerate(layers) for a, s in rec.calls[sp.name]]


def class_gradients(layers: Sequence[LayerSpec], logits: Tensor, outs: list[tuple[int, Tensor, Tensor]]
                    ) -> Iterator[list[Tensor | None]]:
    """For each column ``c`` of ``S`` (``S Sᵀ = diag p − p pᵀ``), the output-gradient rows ``g_c`` of every
    recorded output (``(rows, out_dim)``, the rows of its ``a``; None where the logits do not depend on it).
    One backward pass per class through the graph of :func:`layer_passes`."""
    S = _output_sqrt(logits)
    for c in range(S.shape[1]):
        grads = torch.autograd.grad(logits, [s for _, _, s in outs], grad_outputs=S[:, c],
                                    retain_graph=c + 1 < S.shape[1], allow_unused=True)
        out = []
        for (j, _, _), g in zip(outs, grads):
            if g is not None:
                if layers[j].kind == "patch":  # one row per patch, in unfold's order
                    g = g.flatten(2).transpose(1, 2)
                g = g.detach().reshape(-1, layers[j].out_dim)
            out.append(g)
        yield out


def _accumulate(layers: list[LayerSpec], logits: Tensor, outs: list[tuple[int, Tensor, Tensor]],
                approxes: Sequence[str], A: dict, G: dict, rows: dict, dtype: torch.dtype) -> None:
    """Add one batch's ``Σ a aᵀ`` and ``Σ_c g_c g_cᵀ`` to every approximation's sums (products in the
    model's dtype, sums in ``dtype``)."""
    B = logits.shape[0]
    for j, a, _ in outs:
        for ap in approxes:
            r = _per_sample(ap, a, B, "mean")
            A[ap][j] += (r.T @ r).to(dtype)
            rows[ap][j] += r.shape[0]
    for grads in class_gradients(layers, logits, outs):
        for (j, _, _), g in zip(outs, grads):
            if g is None:
                continue
            for ap in approxes:
                r = _per_sample(ap, g, B, "sum")
                G[ap][j] += (r.T @ r).to(dtype)


def kfac_factors(model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float64, approxes: Sequence[str] = ("expand",),
                 ) -> tuple[list[LayerSpec], dict[str, tuple[list[Tensor], list[Tensor]]], int]:
    """``(layers, {approx: (A's, G's)}, N)``: the K-FAC factors (module docstring) of the mean CE over ``data``.

    Args:
        model: Maps a batch ``x`` to logits ``(B, C)``; evaluated at its own parameters, in eval mode
            and with attention on the math kernel (both restored afterwards).
        data: Re-iterable of ``(x, y)`` batches (labels are not used: the GGN needs only the model's
            own predictive distribution).
        params: Parameter globs the card is over (None: every parameter with requires_grad).
        dtype: Accumulation dtype of the factors (the model runs in its own dtype).
        approxes: ``expand`` (tokens as extra rows; the card's form) and/or ``reduce`` (per sample the
            mean input row and the summed output gradient: ``A = (1/N) Σ_n ā_n ā_nᵀ``,
            ``G = (1/N) Σ_nc ĝ_nc ĝ_ncᵀ``), computed from the same passes.

    Raises:
        TvdiagError: nothing to cover, an unknown approximation, or an attention the explicit forward
            does not reproduce.
        DataError: empty data.
    """
    for ap in approxes:
        if ap not in APPROXIMATIONS:
            raise unknown("K-FAC approximation", ap, APPROXIMATIONS)
    selected = set(select_params(model, params))
    layers = covered_layers(model, selected)
    if not layers:
        raise TvdiagError("no linear layer of the model is among the selected parameters: nothing to factor")
    first = next(model.parameters())
    A = {ap: [torch.zeros(sp.a_dim, sp.a_dim, dtype=dtype, device=first.device) for sp in layers] for ap in approxes}
    G = {ap: [torch.zeros(sp.out_dim, sp.out_dim, dtype=dtype, device=first.device) for sp in layers]
         for ap in approxes}
    rows = {ap: [0] * len(layers) for ap in approxes}
    n = 0
    for logits, outs in layer_passes(model, data, layers):
        _accumulate(layers, logits, outs, approxes, A, G, rows, dtype)
        n += logits.shape[0]
    if n == 0:
        raise DataError("The dataset is empty (no samples).")
    return layers, {ap: ([a / max(r, 1) for a, r in zip(A[ap], rows[ap])], [g / n for g in G[ap]])
                    for ap in approxes}, n
