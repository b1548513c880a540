"""The Hessian card: a publishable summary of a target's curvature for scoring task vectors.

A card holds the top-k eigenpairs ``(l_i, v_i)`` of the target Hessian ``H`` and the
diagonal ``r`` of the residual ``H - V diag(l) V^T``. Anyone can then score a
candidate vector with no target data:

    R_card(tau) = sum_i l_i (v_i^T tau)^2 + sum_j r_j tau_j^2,

which equals ``tau^T H tau`` exactly when k = D (then r = 0) and otherwise treats the
residual as diagonal. Beside the curvature a card stores ``g``, the mean gradient of the
target loss at the same point on the same images, so that it predicts a loss change with
its first-order term, ``lambda g^T tau + 1/2 lambda^2 R_card``
(:func:`diag.curvature.risk.loss_model`). Cards are stored as safetensors (``eigvals``,
``eigvecs``, ``residual_diag``, ``gradient``; a card written before g was stored has none and
predicts ½λ²R alone) with the layout, the trace and provenance in the metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diag import __version__
from diag.curvature.lanczos import lanczos_topk
from diag.curvature.operators import CurvatureOperator
from diag.curvature.params import ParamLayout
from train.errors import ArtifactError, BaseMismatchError, TvdiagError
from train.tensorio import save_tensors, verify_checksum

__all__ = ["CARD_FORMAT", "CardRisk", "HessianCard", "build_card", "check_card_provenance"]

log = logging.getLogger(__name__)

CARD_FORMAT = "tvdiag.hessian_card/1"


class CardRisk:
    """What every card form shares: τ flattened in the card's order, R(τ) as the sum of the form's
    :meth:`risk_parts`, and the first-order term gᵀτ. A form provides ``layout``, ``dim``,
    ``gradient``, ``risk_parts`` and ``_device`` (where its tensors live)."""

    def _flat(self, tau: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(tau, Mapping):
            tau = self.layout.flatten(tau)
        tau = tau.reshape(-1)
        if tau.shape[0] != self.dim:
            raise BaseMismatchError(f"tau has length {tau.shape[0]}, the card has D={self.dim}.")
        return tau.to(device=self._device, dtype=torch.float64)

    def risk(self, tau: Tensor | Mapping[str, Tensor]) -> float:
        """R_card(τ): the sum of :meth:`risk_parts` (the module docstring of each form gives them).

        Args:
            tau: Flat ``(D,)`` vector or a ``name -> tensor`` dict (extra names ignored).
        """
        return sum(self.risk_parts(tau))

    def first_order(self, tau: Tensor | Mapping[str, Tensor]) -> float | None:
        """``g^T tau`` (float64), the loss model's first-order term; None when the card stores no g."""
        if self.gradient is None:
            return None
        return float(self.gradient.to(device=self._device, dtype=torch.float64) @ self._flat(tau))


@dataclass
class HessianCard(CardRisk):
    """Top-k eigenpairs + residual diagonal of a target Hessian.

    Attributes:
        eigvals: ``(k,)`` eigenvalues, descending.
        eigvecs: ``(D, k)`` orthonormal eigenvectors (columns), flat order of ``param_names``.
        residual_diag: ``(D,)`` diagonal of ``H - V diag(l) V^T``.
        param_names: Parameter names in flat order.
        param_shapes: One shape per name.
        trace: ``tr(H)`` if known.
        trace_stderr: Standard error of ``trace`` (0 for an exact trace).
        provenance: Free ``str -> str`` facts (model, data, seed, method, version, ...).
        gradient: ``(D,)`` mean gradient g of the loss on the card's images (None: not stored).
    """

    eigvals: Tensor
    eigvecs: Tensor
    residual_diag: Tensor
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    trace: float | None = None
    trace_stderr: float | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    gradient: Tensor | None = None

    form = "eig"

    def __post_init__(self) -> None:
        self.param_names = tuple(self.param_names)
        self.param_shapes = tuple(tuple(int(d) for d in s) for s in self.param_shapes)
        self.provenance = {str(k): str(v) for k, v in self.provenance.items()}
        D = self.layout.dim
        if self.eigvals.ndim != 1:
            raise BaseMismatchError(f"eigvals must be 1-d, got shape {tuple(self.eigvals.shape)}.")
        k = self.eigvals.shape[0]
        if tuple(self.eigvecs.shape) != (D, k):
            raise BaseMismatchError(f"eigvecs has shape {tuple(self.eigvecs.shape)}, expected (D={D}, k={k}).")
        if tuple(self.residual_diag.shape) != (D,):
            raise BaseMismatchError(f"residual_diag has shape {tuple(self.residual_diag.shape)}, expected ({D},).")
        if self.gradient is not None and tuple(self.gradient.shape) != (D,):
            raise BaseMismatchError(f"gradient has shape {tuple(self.gradient.shape)}, expected ({D},).")

    # -- derived ----------------------------------------------------------------
    @property
    def layout(self) -> ParamLayout:
        """The flat layout of the card's parameters."""
        return ParamLayout(self.param_names, self.param_shapes)

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigvals.shape[0])

    @property
    def dim(self) -> int:
        """Number of parameters D."""
        return int(self.residual_diag.shape[0])

    @property
    def _device(self) -> torch.device:
        return self.eigvecs.device

    def risk_parts(self, tau: Tensor | Mapping[str, Tensor]) -> tuple[float, float]:
        """``(sum_i l_i a_i^2, sum_j r_j tau_j^2)`` with ``a_i = v_i^T tau`` (float64)."""
        t = self._flat(tau)
        a = self.eigvecs.double().T @ t
        top = float((self.eigvals.double() * a.pow(2)).sum())
        res = float((self.residual_diag.double() * t.pow(2)).sum())
        return top, res

    def to_dict(self) -> dict:
        """Summary for a table: sizes, trace, top eigenvalues, residual total, whether g is stored, provenance."""
        return {
            "has_gradient": self.gradient is not None,
            "k": self.k,
            "dim": self.dim,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "eigvals": [float(x) for x in self.eigvals],
            "residual_trace": float(self.residual_diag.double().sum()),
            "param_names": list(self.param_names),
            "provenance": dict(self.provenance),
        }

    def __repr__(self) -> str:
        top = ", ".join(f"{float(x):.4g}" for x in self.eigvals[:3])
        more = ", ..." if self.k > 3 else ""
        tr = "None" if self.trace is None else f"{self.trace:.6g}" + (
            "" if self.trace_stderr is None else f" ± {self.trace_stderr:.2g}")
        return (f"HessianCard(k={self.k}, D={self.dim}, tensors={len(self.param_names)}, "
                f"eigvals=[{top}{more}], trace={tr})")

    # -- storage ----------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: Mapping[str, Tensor] | None = None) -> None:
        """Write the card as safetensors, atomically (temp file in the same folder, then rename).

        ``extra`` tensors (e.g. the Hutchinson diagonal and its standard errors) are stored beside
        the card's own; :meth:`load` ignores them.

        Raises:
            StoreError: the folder cannot be written.
        """

        tensors = {
            "eigvals": self.eigvals.detach().cpu().contiguous(),
            "eigvecs": self.eigvecs.detach().cpu().contiguous(),
            "residual_diag": self.residual_diag.detach().cpu().contiguous(),
            **({} if self.gradient is None else {"gradient": self.gradient.detach().cpu().contiguous()}),
            **{k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()},
        }
        metadata = {
            "format": CARD_FORMAT,
            "param_names": json.dumps(list(self.param_names)),
            "param_shapes": json.dumps([list(s) for s in self.param_shapes]),
            "trace": json.dumps(self.trace),
            "trace_stderr": json.dumps(self.trace_stderr),
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }
        save_tensors(path, tensors, metadata)  # atomic, fixed header order: same card, same bytes

    @classmethod
    def load(cls, path: str | os.PathLike) -> HessianCard:
        """Read a card written by :meth:`save`, validating format, shapes and finiteness.

        Raises:
            ArtifactError: missing, truncated or corrupt file, wrong format, bad shapes,
                NaN/Inf values.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ArtifactError(f"Hessian card '{path}' does not exist.")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CARD_FORMAT:
                    raise ArtifactError(f"'{path}' is not a Hessian card (format {meta.get('format')!r}, "
                                        f"expected {CARD_FORMAT!r}).")
                verify_checksum(path, meta)
                keys = set(f.keys())
                missing = {"eigvals", "eigvecs", "residual_diag"} - keys
                if missing:
                    raise ArtifactError(f"Hessian card '{path}' lacks tensors: {', '.join(sorted(missing))}.")
                tensors = {k: f.get_tensor(k) for k in ("eigvals", "eigvecs", "residual_diag", "gradient")
                           if k in keys}
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ArtifactError(f"Hessian card '{path}' is not a readable safetensors file: {e}") from e
        try:
            names = json.loads(meta["param_names"])
            shapes = json.loads(meta["param_shapes"])
            trace = json.loads(meta.get("trace", "null"))
            trace_stderr = json.loads(meta.get("trace_stderr", "null"))
            provenance = json.loads(meta.get("provenance", "{}"))
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise ArtifactError(f"Hessian card '{path}' has corrupt metadata: {e}") from e
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ArtifactError(f"Hessian card '{path}': tensor '{name}' contains NaN or Inf.")
        for name, v in (("trace", trace), ("trace_stderr", trace_stderr)):
            if v is not None and not math.isfinite(float(v)):
                raise ArtifactError(f"Hessian card '{path}': {name} is not finite.")
        try:
            return cls(eigvals=tensors["eigvals"], eigvecs=tensors["eigvecs"], residual_diag=tensors["residual_diag"],
                       param_names=names, param_shapes=shapes, trace=trace, trace_stderr=trace_stderr,
                       provenance=provenance, gradient=tensors.get("gradient"))
        except (BaseMismatchError, TypeError, ValueError) as e:
            raise ArtifactError(f"Hessian card '{path}' is inconsistent: {e}") from e


def _topk_eigs(op: CurvatureOperator, k: int, method: str, seed: int, tol: float,
               lanczos_kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None, str]:
    """Top-k eigenpairs (descending) and, for the dense method, the dense matrix."""
    D = op.shape[0]
    if method == "auto":
        method = "dense" if k >= D - 1 else "lanczos"
    if method == "dense":
        H = op.to_dense().double()
        H = 0.5 * (H + H.T)
        vals, vecs = torch.linalg.eigh(H)
        order = torch.argsort(vals, descending=True)[:k]
        return vals[order], vecs[:, order], H, "dense-eigh"
    if method == "lanczos":
        res = lanczos_topk(op, k, **lanczos_kwargs)
        vals = torch.as_tensor(np.asarray(res.eigvals) if not isinstance(res.eigvals, Tensor) else res.eigvals)
        vecs = torch.as_tensor(np.asarray(res.eigvecs) if not isinstance(res.eigvecs, Tensor) else res.eigvecs)
        vals, vecs = vals.double().cpu(), vecs.double().cpu()
        order = torch.argsort(vals, descending=True)
        residuals = getattr(res, "residuals", None)
        if residuals is not None and len(residuals):
            log.info("lanczos_topk: max eigen-residual %.3g", float(torch.as_tensor(residuals).max()))
        return vals[order], vecs[:, order], None, "lanczos"
    if method == "eigsh":
        from scipy.sparse.linalg import eigsh

        if k >= D:
            raise TvdiagError(f"eigsh needs k < D (k={k}, D={D}); use method='dense'.")
        v0 = np.random.default_rng(seed).standard_normal(D)
        vals, vecs = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=v0)
        order = np.argsort(vals)[::-1].copy()
        return torch.from_numpy(vals[order]), torch.from_numpy(vecs[:, order]), None, "scipy-eigsh"
    raise TvdiagError(f"Unknown eigen method '{method}'. Available: auto, dense, eigsh, lanczos")


def _residual(op: CurvatureOperator, vals: Tensor, vecs: Tensor, H: Tensor | None,
              residual_diag: None | str | Tensor, hessian_diag: Tensor | None) -> tuple[Tensor, str, float | None]:
    """The card's residual diagonal ``diag(H) - Σ_i l_i v_i²``, its kind and the exact trace (dense only)."""
    D = op.shape[0]
    top_diag = (vecs.pow(2) * vals).sum(1)
    exact_trace = None
    if residual_diag == "exact":
        if H is None:
            H = op.to_dense().double()
        exact_trace = float(torch.diagonal(H).sum())
        resid, resid_kind = torch.diagonal(H) - top_diag, "exact"
    elif isinstance(residual_diag, Tensor):
        resid, resid_kind = residual_diag.detach().double().cpu().reshape(-1), "supplied"
    elif hessian_diag is not None:
        resid, resid_kind = hessian_diag.detach().double().cpu().reshape(-1) - top_diag, "from hessian_diag"
    else:
        resid, resid_kind = torch.zeros(D, dtype=torch.float64), "none"
    if resid.shape[0] != D:
        raise BaseMismatchError(f"residual diagonal has length {resid.shape[0]}, the operator has D={D}.")
    return resid, resid_kind, exact_trace


def _provenance(op: CurvatureOperator, used: str, k: int, resid_kind: str) -> dict[str, str]:
    """The facts a card records about how it was made."""
    prov = {
        "operator": type(op).__name__,
        "eig_method": used,
        "k": str(k),
        "dim": str(op.shape[0]),
        "dtype": str(op.dtype).replace("torch.", ""),
        "residual": resid_kind,
    }
    for attr in ("engine", "num_samples", "loss_name"):
        if getattr(op, attr, None) is not None:
            prov[attr] = str(getattr(op, attr))
    prov["tvdiag_version"] = __version__
    return prov


def check_card_provenance(provenance: Mapping[str, str], path, base_hash: str, model_sha: str) -> None:
    """Refuse (BaseMismatchError) a card at ``path`` built on another base or for another target model.

    A card that does not record one of them is not refused on it.
    """
    if provenance.get("base_hash", base_hash) != base_hash:
        raise BaseMismatchError(f"{path} was built on base {provenance.get('base_hash')}, not {base_hash}")
    if provenance.get("model_sha256", model_sha) != model_sha:
        raise BaseMismatchError(f"{path} was built for model sha256 {provenance['model_sha256'][:16]}, "
                                f"not --target-model (sha256 {model_sha[:16]})")


def build_card(op: CurvatureOperator, k: int, residual_diag: None | str | Tensor = None,
               hessian_diag: Tensor | None = None, trace: float | None = None, trace_stderr: float | None = None,
               provenance: Mapping[str, Any] | None = None, method: str = "auto", seed: int = 0,
               tol: float = 0.0, **lanczos_kwargs) -> HessianCard:
    """Build a :class:`HessianCard` from a curvature operator.

    Args:
        op: Target operator (a :class:`~diag.curvature.operators.HessianOperator` gives
            the names and shapes; other operators get one flat tensor ``"flat"``).
        k: Number of eigenpairs, ``1 <= k <= D``.
        residual_diag: ``None`` (zeros: top-k only), ``"exact"`` (``diag(H) - sum_i l_i
            v_i^2`` from the dense matrix; small D only) or a ``(D,)`` tensor.
        hessian_diag: Alternatively the diagonal of ``H`` itself (e.g. a Hutchinson
            estimate); the residual is then ``hessian_diag - sum_i l_i v_i^2``.
        trace, trace_stderr: ``tr(H)`` and its standard error, if estimated elsewhere
            (an ``"exact"`` residual also gives the exact trace).
        provenance: Extra facts to record (values turned into strings).
        method: Eigen solver: ``"auto"`` (dense for k >= D - 1, else
            ``diag.curvature.lanczos.lanczos_topk`` when importable, else scipy
            ``eigsh(which='LA')``), ``"dense"``, ``"lanczos"`` or ``"eigsh"``.
        seed: Seed of the eigsh start vector.
        tol: eigsh tolerance (0 = machine precision).
        **lanczos_kwargs: Passed to ``lanczos_topk``.

    The card stores the operator's mean gradient g (one more pass over its images) when the
    operator has one (a model operator), so that it predicts λ·gᵀτ + ½λ²R.

    Raises:
        TvdiagError: bad ``k`` or ``residual_diag``.
    """
    D = op.shape[0]
    if not 1 <= int(k) <= D:
        raise TvdiagError(f"k must be in [1, D={D}], got {k}.")
    if residual_diag is not None and hessian_diag is not None:
        raise TvdiagError("Pass residual_diag or hessian_diag, not both.")
    if isinstance(residual_diag, str) and residual_diag != "exact":
        raise TvdiagError(f"Unknown residual '{residual_diag}'. Available: exact (or a tensor, or None)")
    want_dense = residual_diag == "exact"
    vals, vecs, H, used = _topk_eigs(op, int(k), "dense" if (want_dense and method == "auto") else method,
                                     seed, tol, lanczos_kwargs)
    resid, resid_kind, exact_trace = _residual(op, vals, vecs, H, residual_diag, hessian_diag)
    if exact_trace is not None and trace is None:
        trace, trace_stderr = exact_trace, 0.0
    names = tuple(getattr(op, "param_names", ("flat",)))
    shapes = tuple(getattr(op, "param_shapes", ((D,),)))
    prov = _provenance(op, used, int(k), resid_kind)
    prov.update({str(a): str(b) for a, b in (provenance or {}).items()})
    gradient = op.gradient().detach().cpu() if hasattr(op, "gradient") else None
    return HessianCard(eigvals=vals.double(), eigvecs=vecs.double().contiguous(), residual_diag=resid.double(),
                       param_names=names, param_shapes=shapes, trace=trace, trace_stderr=trace_stderr,
                       provenance=prov, gradient=gradient)
