"""The Kronecker-factored Hessian card: K-FAC blocks per linear layer plus a diagonal for the rest.

A :class:`KfacCard` scores a vector τ with no target data as

    R_kfac(τ) = Σ_layers tr(T_lᵀ G_l T_l A_l) + Σ_{j uncovered} d_j τ_j²,

``T_l = [W_l | b_l]`` the layer's block of τ (``out x in``, a selected bias as a last column),
``(A_l, G_l)`` the layer's K-FAC factors of the target's cross-entropy GGN at θ_ftᵀ
(:func:`diag.curvature.kfac.factors.kfac_factors`) and ``d`` the Hutchinson diagonal of the
Hessian on the parameters no layer covers (layer norms, class and positional embeddings, and
any weight whose layer is not factored). It has the interface of
:class:`~diag.curvature.card.HessianCard` (``risk``, ``risk_parts``, ``first_order``, ``layout``,
``to_dict``, ``save`` / ``load``) and the same stored gradient g.

Stored as safetensors: the upper triangles of ``A_l`` and ``G_l`` (``A.<l>``, ``G.<l>``, in the
factor dtype, bfloat16 by default), ``fallback_diag`` (float64) and ``gradient``; the layers,
layout and provenance in the metadata (format :data:`KFAC_FORMAT`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from diag.curvature.card import CardRisk, HessianCard
from diag.curvature.kfac.layers import LayerSpec
from diag.curvature.params import ParamLayout
from train.errors import ArtifactError, BaseMismatchError
from train.tensorio import load_tensors, read_metadata, save_tensors

__all__ = ["CARD_FORMS", "KFAC_FORMAT", "KfacCard", "card_bytes", "card_file_form", "load_any_card", "trace_scales"]

KFAC_FORMAT = "tvdiag.kfac_card/1"
#: Forms of the Hessian card: ``eig`` (top-k eigenpairs + residual diagonal, the default) and ``kfac``.
CARD_FORMS = ("eig", "kfac")


def _packed(n: int) -> int:
    return n * (n + 1) // 2


def card_bytes(layers: list[LayerSpec], dim: int, factor_bytes: int = 2, packed: bool = True,
               gradient_bytes: int = 4) -> int:
    """Bytes of a K-FAC card's tensors: factors (upper triangles when ``packed``), the float64 diagonal of
    the uncovered parameters and a gradient of ``dim`` entries (0 bytes: none)."""
    tri = _packed if packed else (lambda n: n * n)
    factors = sum(tri(sp.a_dim) + tri(sp.out_dim) for sp in layers) * factor_bytes
    covered = sum(sp.out_dim * sp.a_dim for sp in layers)
    return factors + (dim - covered) * 8 + dim * gradient_bytes


@dataclass
class KfacCard(CardRisk):
    """K-FAC factors per covered layer plus the Hessian diagonal of the uncovered parameters.

    Attributes:
        layers: The covered layers (:class:`~diag.curvature.kfac.layers.LayerSpec`).
        A, G: One ``(a_dim, a_dim)`` input factor and ``(out_dim, out_dim)`` output factor per layer.
        fallback_diag: Hessian diagonal on the uncovered entries, in flat order.
        param_names, param_shapes: The card's flat layout (the same as a :class:`HessianCard`'s).
        provenance: Free ``str -> str`` facts.
        gradient: ``(D,)`` mean gradient g on the card's images (None: not stored).
        layer_scales: One factor ``s_l`` per layer multiplying its block (None: all 1), e.g.
            :func:`trace_scales`, which give each block the trace of the Hessian's.
    """

    layers: tuple[LayerSpec, ...]
    A: list[Tensor]
    G: list[Tensor]
    fallback_diag: Tensor
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    provenance: dict[str, str] = field(default_factory=dict)
    gradient: Tensor | None = None
    layer_scales: Tensor | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.param_names = tuple(self.param_names)
        self.param_shapes = tuple(tuple(int(d) for d in s) for s in self.param_shapes)
        self.provenance = {str(k): str(v) for k, v in self.provenance.items()}
        shapes = dict(zip(self.param_names, self.param_shapes))
        if not (len(self.A) == len(self.G) == len(self.layers)):
            raise BaseMismatchError(f"{len(self.layers)} layers but {len(self.A)} A and {len(self.G)} G factors.")
        for sp, a, g in zip(self.layers, self.A, self.G):
            if tuple(a.shape) != (sp.a_dim, sp.a_dim) or tuple(g.shape) != (sp.out_dim, sp.out_dim):
                raise BaseMismatchError(f"layer '{sp.name}': A {tuple(a.shape)}, G {tuple(g.shape)}, expected "
                                        f"({sp.a_dim}, {sp.a_dim}) and ({sp.out_dim}, {sp.out_dim}).")
            for p in (sp.weight, sp.bias):
                if p is not None and p not in shapes:
                    raise BaseMismatchError(f"layer '{sp.name}' covers '{p}', which is not in the card's layout.")
        if self.layer_scales is not None and tuple(self.layer_scales.shape) != (len(self.layers),):
            raise BaseMismatchError(f"layer_scales has shape {tuple(self.layer_scales.shape)}, expected "
                                    f"({len(self.layers)},).")
        n_unc = len(self.uncovered_index)
        if tuple(self.fallback_diag.shape) != (n_unc,):
            raise BaseMismatchError(f"fallback_diag has shape {tuple(self.fallback_diag.shape)}, expected ({n_unc},).")
        if self.gradient is not None and tuple(self.gradient.shape) != (self.dim,):
            raise BaseMismatchError(f"gradient has shape {tuple(self.gradient.shape)}, expected ({self.dim},).")

    # -- derived ----------------------------------------------------------------
    form = "kfac"

    @property
    def layout(self) -> ParamLayout:
        """The flat layout of the card's parameters."""
        return ParamLayout(self.param_names, self.param_shapes)

    @property
    def dim(self) -> int:
        """Number of parameters D."""
        return self.layout.dim

    @property
    def covered_names(self) -> tuple[str, ...]:
        """Parameters inside a factored layer."""
        return tuple(p for sp in self.layers for p in (sp.weight, sp.bias) if p is not None)

    @property
    def uncovered_names(self) -> tuple[str, ...]:
        """Parameters scored by the diagonal, in flat order."""
        covered = set(self.covered_names)
        return tuple(n for n in self.param_names if n not in covered)

    @property
    def uncovered_index(self) -> Tensor:
        """Flat positions of the uncovered entries."""
        offs = self.layout.offsets()
        parts = [torch.arange(*offs[n]) for n in self.uncovered_names]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def _device(self) -> torch.device:
        return self.fallback_diag.device

    def layer_risks(self, tau: Tensor | Mapping[str, Tensor]) -> list[float]:
        """Per covered layer ``tr(Tᵀ G T A)`` (float64)."""
        parts = self.layout.unflatten(self._flat(tau))
        out = []
        for sp, a, g in zip(self.layers, self.A, self.G):
            T = sp.block(parts)
            out.append(float(((g.double() @ T @ a.double()) * T).sum()))
        if self.layer_scales is not None:
            out = [float(s) * r for s, r in zip(self.layer_scales.double(), out)]
        return out

    def diagonal(self) -> Tensor:
        """``(D,)`` float64 diagonal of the card's matrix: ``G_oo A_ii`` on a layer's entry ``(o, i)`` (a folded
        bias: ``i`` = the last input), ``d_j`` on an uncovered entry."""
        out = torch.zeros(self.dim, dtype=torch.float64)
        out[self.uncovered_index] = self.fallback_diag.double().cpu()
        offs = self.layout.offsets()
        scales = self.layer_scales if self.layer_scales is not None else torch.ones(len(self.layers))
        for sp, a, g, sc in zip(self.layers, self.A, self.G, scales.double()):
            da, dg = a.double().diagonal().cpu() * sc, g.double().diagonal().cpu()
            w = torch.outer(dg, da[:sp.in_dim])
            lo, hi = offs[sp.weight]
            out[lo:hi] = (w.T if sp.kind == "proj" else w).reshape(-1)
            if sp.bias is not None:
                lo, hi = offs[sp.bias]
                out[lo:hi] = dg * da[-1]
        return out

    def risk_parts(self, tau: Tensor | Mapping[str, Tensor]) -> tuple[float, float]:
        """``(Σ_l tr(T_lᵀ G_l T_l A_l), Σ_{j uncovered} d_j τ_j²)`` (float64)."""
        t = self._flat(tau)
        res = float((self.fallback_diag.double() * t[self.uncovered_index].pow(2)).sum())
        return sum(self.layer_risks(t)), res

    def nbytes(self) -> int:
        """Bytes of the card's tensors as :meth:`save` writes them."""
        fb = self.A[0].element_size() if self.A else 4
        gb = 0 if self.gradient is None else self.gradient.element_size()
        return card_bytes(list(self.layers), self.dim, factor_bytes=fb, gradient_bytes=gb)

    def to_dict(self) -> dict:
        """Summary for a table: form, sizes, covered and uncovered parameters, provenance."""
        return {
            "form": self.form,
            "has_gradient": self.gradient is not None,
            "dim": self.dim,
            "layers": len(self.layers),
            "covered": sum(sp.out_dim * sp.a_dim for sp in self.layers),
            "uncovered": len(self.uncovered_index),
            "uncovered_names": list(self.uncovered_names),
            "megabytes": self.nbytes() / 1e6,
            "param_names": list(self.param_names),
            "provenance": dict(self.provenance),
        }

    def __repr__(self) -> str:
        return (f"KfacCard(layers={len(self.layers)}, D={self.dim}, uncovered={len(self.uncovered_index)}, "
                f"{self.nbytes() / 1e6:.1f} MB)")

    # -- storage ----------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: Mapping[str, Tensor] | None = None) -> None:
        """Write the card as safetensors, atomically, with a checksum (:func:`train.tensorio.save_tensors`).

        ``extra`` tensors are stored beside the card's own; :meth:`load` ignores them.
        """
        tensors: dict[str, Tensor] = {}
        for i, (a, g) in enumerate(zip(self.A, self.G)):
            for key, f in (("A", a), ("G", g)):
                iu = torch.triu_indices(f.shape[0], f.shape[0])
                tensors[f"{key}.{i}"] = f.detach().cpu()[iu[0], iu[1]].contiguous()
        tensors["fallback_diag"] = self.fallback_diag.detach().cpu().double().contiguous()
        if self.layer_scales is not None:
            tensors["layer_scales"] = self.layer_scales.detach().cpu().double().contiguous()
        if self.gradient is not None:
            tensors["gradient"] = self.gradient.detach().cpu().contiguous()
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        save_tensors(path, tensors, {
            "format": KFAC_FORMAT,
            "layers": json.dumps([asdict(sp) for sp in self.layers]),
            "param_names": json.dumps(list(self.param_names)),
            "param_shapes": json.dumps([list(s) for s in self.param_shapes]),
            "provenance": json.dumps(self.provenance, sort_keys=True),
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> KfacCard:
        """Read a card written by :meth:`save` (checksum verified, shapes and finiteness checked).

        Raises:
            ArtifactError: missing, damaged or foreign file, bad shapes, NaN/Inf.
        """
        tensors, meta = load_tensors(path)
        if meta.get("format") != KFAC_FORMAT:
            raise ArtifactError(f"'{path}' is not a K-FAC card (format {meta.get('format')!r}, "
                                f"expected {KFAC_FORMAT!r}).")
        try:
            layers = [LayerSpec(**d) for d in json.loads(meta["layers"])]
            names, shapes = json.loads(meta["param_names"]), json.loads(meta["param_shapes"])
            provenance = json.loads(meta.get("provenance", "{}"))
            A, G = [], []
            for i, sp in enumerate(layers):
                A.append(_unpack(tensors[f"A.{i}"], sp.a_dim))
                G.append(_unpack(tensors[f"G.{i}"], sp.out_dim))
            return cls(layers, A, G, tensors["fallback_diag"], names, shapes, provenance, tensors.get("gradient"),
                       tensors.get("layer_scales"))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError, BaseMismatchError, RuntimeError) as e:
            raise ArtifactError(f"K-FAC card '{path}' is damaged or inconsistent: {e}") from e


def trace_scales(card: KfacCard, hessian_diag: Tensor) -> Tensor:
    """Per layer ``s_l = Σ_{j in l} diag(H)_j / Σ_{j in l} diag(A_l ⊗ G_l)_j`` (clamped at 0): the factor that
    gives the layer's block the trace of the Hessian's on the same entries (``hessian_diag`` in the card's flat
    order, e.g. its Hutchinson diagonal). It moves K-FAC from the Gauss-Newton matrix towards H and corrects
    the scale the Kronecker factorisation loses, keeping each block's shape."""
    plain = KfacCard(card.layers, card.A, card.G, card.fallback_diag, card.param_names, card.param_shapes)
    kd, offs, h = plain.diagonal(), card.layout.offsets(), hessian_diag.detach().double().cpu().reshape(-1)
    out = []
    for sp in card.layers:
        idx = torch.cat([torch.arange(*offs[p]) for p in (sp.weight, sp.bias) if p is not None])
        den = float(kd[idx].sum())
        out.append(max(float(h[idx].sum()), 0.0) / den if den > 0 else 1.0)
    return torch.tensor(out, dtype=torch.float64)


def _unpack(tri: Tensor, n: int) -> Tensor:
    """The symmetric ``n x n`` matrix of a packed upper triangle."""
    if tri.shape != (_packed(n),):
        raise ValueError(f"packed factor has shape {tuple(tri.shape)}, expected ({_packed(n)},)")
    out = torch.zeros(n, n, dtype=tri.dtype)
    iu = torch.triu_indices(n, n)
    out[iu[0], iu[1]] = tri
    out[iu[1], iu[0]] = tri
    return out


def card_file_form(path: str | os.PathLike) -> str:
    """The form of the card in a file, by the format its header records: ``kfac`` or ``eig``."""
    return KfacCard.form if read_metadata(path).get("format") == KFAC_FORMAT else HessianCard.form


def load_any_card(path: str | os.PathLike) -> HessianCard | KfacCard:
    """A Hessian card of either form (:func:`card_file_form`): a :class:`KfacCard` or a
    :class:`~diag.curvature.card.HessianCard`."""
    return KfacCard.load(path) if card_file_form(path) == KfacCard.form else HessianCard.load(path)
