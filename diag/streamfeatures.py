"""One streamed pass over the parameters: the tier-0/1 features of every source for a target model.

For each parameter tensor (a *block*), with τ_ftᵀ = θ_target − θ_base on that block:

* cos(τ_ftˢ, τ_ftᵀ) per block group and globally: the dots F·t and ‖F‖² of the stacked
  τ_ftˢ rows F (sources × n);
* ‖τ*ˢ‖² and, with a card (top-k eigenpairs V, l and residual diagonal r),
  Vᵀτ*, Σ r τ*² and (V²)ᵀτ*², so that R_card = Σ l_i (v_iᵀτ*)² + Σ r_j τ*_j² and
  R_diag = Σ r_j τ*_j² + Σ_i l_i ((V²)ᵀτ*²)_i.

All sources of a block are stacked (S × n) and multiplied at once, so the card's rows are read
from memory once per block rather than once per source. Cosine products are float64; the card's
products within a block are float32 BLAS; sums over blocks are float64. The next block is read (``pread``, which releases the GIL) by a
helper thread while this one is multiplied, so disk and arithmetic overlap. The blocks live in
two sets of buffers sized for the largest parameter, allocated once: memory is a few blocks
whatever the model size, and no fresh page is faulted in per block.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from diag.similarity import block_group

__all__ = ["stream_features"]


@dataclass
class _Sums:
    """Running float64 sums of one source."""

    dot: dict = field(default_factory=dict)     # group → τ_ftˢ·τ_ftᵀ
    ns: dict = field(default_factory=dict)      # group → ‖τ_ftˢ‖²
    star2: float = 0.0                          # ‖τ*‖²
    proj: torch.Tensor | None = None            # Vᵀτ* (k,)
    resid: float = 0.0                          # Σ r_j τ*_j²
    v2: torch.Tensor | None = None              # (V²)ᵀ τ*² (k,): Σ diag(H)τ*² = resid + Σ_i l_i v2_i


@dataclass
class _Block:
    """One parameter's tensors: θ_base, θ_target, stacked τ_ftˢ (rows of sources with one), τ*ˢ, card rows."""

    key: str
    base: torch.Tensor
    target: torch.Tensor
    ft: torch.Tensor | None
    star: torch.Tensor
    V: torch.Tensor | None = None
    r: torch.Tensor | None = None


def _read(f, key: str, out: torch.Tensor) -> None:
    """Read tensor ``key`` of file ``f`` into the float32 row ``out`` (converting when stored otherwise)."""
    if hasattr(f, "read_into"):
        f.read_into(key, out)
    else:
        out.copy_(f.read(key).reshape(-1))


class _Slot:
    """Reusable float32 buffers for one block (fresh pages cost a page fault each: allocated once, not per block)."""

    def __init__(self, n_max: int, n_ft: int, n_sources: int):
        self.base, self.target = torch.empty(n_max), torch.empty(n_max)
        self.ft = torch.empty(n_ft, n_max) if n_ft else None
        self.star = torch.empty(n_sources, n_max)


def _load(key: str, slot: _Slot, target, base, sources, card) -> _Block:
    """Every tensor of block ``key``, read into ``slot``'s buffers (in the reading thread)."""
    n = math.prod(base.shape(key))
    b, t = slot.base[:n], slot.target[:n]
    _read(base, key, b)
    _read(target, key, t)
    with_ft = [s for s in sources if s.ft is not None]
    ft = slot.ft[:, :n] if with_ft else None
    for i, s in enumerate(with_ft):
        _read(s.ft, key, ft[i])
    star = slot.star[:, :n]
    for i, s in enumerate(sources):
        if s.star is not None:
            _read(s.star, key, star[i])
        else:  # τ* = τ_ft* − τ_ft
            _read(s.ftx, key, star[i])
            star[i] -= s.ft.read(key).reshape(-1).float()
    block = _Block(key, b, t, ft, star)
    if card is not None and key in card.offsets:
        block.V, block.r = card.rows(key)
    return block


def _accumulate(blk: _Block, sources, sums: list[_Sums], nt: dict) -> float:
    """Add block ``blk``'s products to the sums; returns ‖θ_base‖² of the block."""
    t = blk.target.sub_(blk.base)  # τ_ftᵀ, in place
    g = block_group(blk.key)
    t64 = t.double()
    nt[g] = nt.get(g, 0.0) + float(torch.dot(t64, t64))
    if blk.ft is not None:  # cosines accumulate in float64: float32 BLAS sums at 88M can put |cos| above 1
        ft64 = blk.ft.double()
        dots = ft64 @ t64
        norms = (ft64 * ft64).sum(dim=1)
        for j, s in enumerate(s for s, src in zip(sums, sources) if src.ft is not None):
            s.dot[g] = s.dot.get(g, 0.0) + float(dots[j])
            s.ns[g] = s.ns.get(g, 0.0) + float(norms[j])
    if blk.V is None:
        star2 = torch.linalg.vector_norm(blk.star, dim=1).double().pow(2)
        for j, s in enumerate(sums):
            s.star2 += float(star2[j])
        return float(torch.dot(blk.base, blk.base))
    M = torch.cat([torch.ones_like(blk.r)[:, None], blk.r[:, None], blk.V * blk.V], dim=1)  # (n, k + 2)
    proj = (blk.star @ blk.V).double()                                                      # (S, k)
    blk.star.mul_(blk.star)                                                                 # τ*² in place
    m = (blk.star @ M).double()                               # (S, k + 2): [Σ τ*², Σ r τ*², (V²)ᵀ τ*²]
    for j, s in enumerate(sums):
        s.star2 += float(m[j, 0])
        s.resid += float(m[j, 1])
        s.v2 = m[j, 2:].clone() if s.v2 is None else s.v2 + m[j, 2:]
        s.proj = proj[j].clone() if s.proj is None else s.proj + proj[j]
    return float(torch.dot(blk.base, blk.base))


def stream_features(target, base, sources: list, card, keys: list[str]) -> tuple[list[dict], float, float]:
    """Per-source tier-0/1 features; also ‖τ_ftᵀ‖ and ‖θ_base‖, in one pass over the parameters.

    Args:
        target, base: the target model (a :class:`diag.openworld.TensorFile` or an in-memory file) and θ_base (a TensorFile).
        sources: :class:`diag.openworld.Source` objects (``ft``, ``star`` or ``ftx`` files).
        card: a :class:`diag.openworld.CardStream` or None (tier 0).
        keys: parameter names, in reading order.

    Returns:
        (one feature row per source — the names of :data:`diag.predictor.TIER_FEATURES` —,
        ‖τ_ftᵀ‖, ‖θ_base‖).
    """
    sums = [_Sums() for _ in sources]
    nt: dict = {}
    nb = 0.0
    if not keys:
        return [_row(src, s, nt, card) for src, s in zip(sources, sums)], 0.0, 0.0
    n_max = max(math.prod(base.shape(k)) for k in keys)
    slots = [_Slot(n_max, sum(s.ft is not None for s in sources), len(sources)) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvdiag-read") as pool:
        # block i is read into slot i % 2 while block i − 1 is multiplied from the other slot
        pending = pool.submit(_load, keys[0], slots[0], target, base, sources, card)
        for i in range(len(keys)):
            blk = pending.result()
            if i + 1 < len(keys):
                pending = pool.submit(_load, keys[i + 1], slots[(i + 1) % 2], target, base, sources, card)
            nb += _accumulate(blk, sources, sums, nt)
    return [_row(src, s, nt, card) for src, s in zip(sources, sums)], math.sqrt(sum(nt.values())), math.sqrt(nb)


def _row(src, s: _Sums, nt: dict, card) -> dict:
    """The features of one source from its sums."""
    row = {"source": src.name, "norm_star_source": math.sqrt(s.star2), **src.quality,
           "norm_ft_target": math.sqrt(sum(nt.values()))}
    if src.ft is not None:
        row["cos_ft"] = _cos(sum(s.dot.values()), sum(s.ns.values()), sum(nt.values()))
        row.update({f"cos_ft.{g}": _cos(s.dot[g], s.ns[g], nt[g]) for g in s.dot})
        row["norm_ft_source"] = math.sqrt(sum(s.ns.values()))
    if card is not None:
        top = float((card.eigvals * s.proj.pow(2)).sum()) if s.proj is not None else 0.0
        curv = float((card.eigvals * s.v2).sum()) if s.v2 is not None else 0.0
        row["risk_card"], row["risk_diag"] = top + s.resid, s.resid + curv
    return row


def _cos(dot: float, a2: float, b2: float) -> float:
    return dot / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else math.nan
