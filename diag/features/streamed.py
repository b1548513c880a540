"""One streamed pass over the parameters: the tier-0/1 features of every source for a target model.

For each parameter tensor (a *block*), with τ_ftᵀ = θ_target − θ_base on that block:

* cos(τ_ftˢ, τ_ftᵀ) per block group and globally: the dots F·t and ‖F‖² of the stacked
  τ_ftˢ rows F (sources × n);
* ‖τ*ˢ‖² and, with a card (top-k eigenpairs V, l and residual diagonal r),
  Vᵀτ*, Σ r τ*² and (V²)ᵀτ*², so that R_card = Σ l_i (v_iᵀτ*)² + Σ r_j τ*_j² and
  R_diag = Σ r_j τ*_j² + Σ_i l_i ((V²)ᵀτ*²)_i, and gᵀτ* when the card stores g (the loss model's
  first-order term). A parameter the card does not cover adds to ‖τ*ˢ‖² only (its rows of V, r
  and g count as zero).

Every product is float64: float32 sums at 88M parameters put cos(τ, τ) at 1.0001, and float32
card products within a block put R_card 0.19 % off an exact sum (float64: 2e-15). A block is
taken :data:`CHUNK` values at a time: the rows of all sources are copied from the memory-mapped
files (:meth:`diag.features.mapped.TensorFile.view`, no read buffer) into float64 buffers allocated
once (fresh buffers per block cost a page fault per 4 kB), then multiplied at once — F·t for the
stacked S × m rows, and τ*'s rows against each column of V —, so each value is read from the
page cache once and converted once. After a block its file pages are dropped
(:meth:`~diag.features.mapped.TensorFile.release`): the resident set is the buffers plus one block per
worker, whatever the model size.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from diag.features.similarity import block_group, cosine_from

__all__ = ["stream_features", "CHUNK"]

CHUNK = 1 << 16  # values per product: (1 + F + S) float64 rows of it, 9 MB with 8 sources (in L3 cache)
MAX_WORKERS = 4   # the pass is bound by memory bandwidth; each worker keeps one parameter's pages resident


@dataclass
class _Sums:
    """Running float64 sums: row i of ``dot``/``ns`` is the i-th source with a τ_ft file, of the rest the i-th source."""

    dot: dict       # group → (F,) τ_ftˢ·τ_ftᵀ
    ns: dict        # group → (F,) ‖τ_ftˢ‖²
    nt: dict        # group → ‖τ_ftᵀ‖²
    star2: torch.Tensor  # (S,) ‖τ*‖²
    proj: torch.Tensor   # (S, k) Vᵀτ*
    resid: torch.Tensor  # (S,) Σ r_j τ*_j²
    v2: torch.Tensor     # (S, k) (V²)ᵀ τ*²: Σ diag(H) τ*² = resid + Σ_i l_i v2_i
    gtau: torch.Tensor   # (S,) gᵀτ* (zero when the card stores no g)
    nb: float = 0.0      # ‖θ_base‖²


class _Buffers:
    """float64 rows for one chunk (τ_ftᵀ, the τ_ft's, the τ*'s, V²), allocated once for a whole pass."""

    def __init__(self, n: int, n_ft: int, n_sources: int, k: int):
        f64 = torch.float64
        self.t, self.ft, self.star = torch.empty(n, dtype=f64), torch.empty(n_ft, n, dtype=f64), \
            torch.empty(n_sources, n, dtype=f64)
        self.v2 = torch.empty(n, k, dtype=f64)

    def sized(self, m: int) -> tuple[torch.Tensor, ...]:
        return self.t[:m], self.ft[:, :m], self.star[:, :m], self.v2[:m]


def _chunk(s: _Sums, g: str, buf: tuple, part, target, base, sources, with_ft, card_rows) -> None:
    """Add the products of one chunk; ``part(file)`` is that file's values of the chunk (a view, as stored).

    The card's products are k matrix-vector products with the (strided) columns of V: MKL's
    S × m by m × k product with k ≪ S runs at a fraction of memory speed, the columns at full speed.
    """
    t, ft, star, v2 = buf
    t.copy_(part(base))
    s.nb += float(t @ t)
    torch.sub(part(target), t, out=t)                          # τ_ftᵀ = θ_target − θ_base, float64
    s.nt[g] = s.nt.get(g, 0.0) + float(t @ t)
    if with_ft:
        for i, src in enumerate(with_ft):
            ft[i].copy_(part(src.ft))
        s.dot[g] = s.dot.get(g, 0) + ft @ t
        s.ns[g] = s.ns.get(g, 0) + torch.linalg.vector_norm(ft, dim=1).square()
    for i, src in enumerate(sources):
        if src.star is not None:
            star[i].copy_(part(src.star))
        else:                                                      # τ* = τ_ft* − τ_ft
            star[i].copy_(part(src.ftx)).sub_(part(src.ft))
    if card_rows is None:
        s.star2 += torch.linalg.vector_norm(star, dim=1).square()
        return
    V, r = (x.to(torch.float64) for x in card_rows[:2])
    if card_rows[2] is not None:
        s.gtau += star @ card_rows[2].to(torch.float64)
    for j in range(V.shape[1]):
        s.proj[:, j] += star @ V[:, j]
    star.square_()                                                 # τ*², in place
    s.star2 += star.sum(dim=1)
    s.resid += star @ r
    torch.mul(V, V, out=v2)
    for j in range(V.shape[1]):
        s.v2[:, j] += star @ v2[:, j]


def _pass(keys: list[str], sizes: dict, target, base, sources: list, card) -> _Sums:
    """The sums over parameters ``keys``, each taken :data:`CHUNK` values at a time; pages dropped after each."""
    S, k = len(sources), (len(card.eigvals) if card is not None else 0)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    sums = _Sums({}, {}, {}, zeros(S), zeros(S, k), zeros(S), zeros(S, k), zeros(S))
    with_ft = [src for src in sources if src.ft is not None]
    buf = _Buffers(min(CHUNK, max((sizes[key] for key in keys), default=0)), len(with_ft), S, k)
    files = [target, base, *(f for src in sources for f in src.files())]
    for key in keys:
        g, n = block_group(key), sizes[key]
        vr = card.rows(key) if card is not None and key in card.offsets else None
        views = {id(f): f.view(key) for f in files}  # whole-parameter views of the mappings; chunks slice them
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            _chunk(sums, g, buf.sized(b - a), lambda f, a=a, b=b: views[id(f)][a:b], target, base, sources, with_ft,
                   None if vr is None else (vr[0][a:b], vr[1][a:b], None if vr[2] is None else vr[2][a:b]))
        for f in files:
            f.release(key)
        if vr is not None:
            card.release(key)
    return sums


def _split(keys: list[str], sizes: dict, parts: int) -> list[list[str]]:
    """``keys`` cut, in order, into ≤ ``parts`` runs of about equal total size (each worker reads its files forward)."""
    total, runs, acc = sum(sizes.values()), [[]], 0
    for key in keys:
        if acc >= total * len(runs) / parts and len(runs) < parts:
            runs.append([])
        runs[-1].append(key)
        acc += sizes[key]
    return [r for r in runs if r]


def _merge(parts: list[_Sums]) -> _Sums:
    """Sums of the workers, added in worker order (so the result does not depend on timing)."""
    out = parts[0]
    for p in parts[1:]:
        for mine, theirs in ((out.dot, p.dot), (out.ns, p.ns), (out.nt, p.nt)):
            for g, v in theirs.items():
                mine[g] = mine[g] + v if g in mine else v
        out.star2, out.proj, out.resid, out.v2 = out.star2 + p.star2, out.proj + p.proj, out.resid + p.resid, \
            out.v2 + p.v2
        out.gtau = out.gtau + p.gtau
        out.nb += p.nb
    return out


def stream_features(target, base, sources: list, card, keys: list[str]) -> tuple[list[dict], float, float]:
    """Per-source tier-0/1 features; also ‖τ_ftᵀ‖ and ‖θ_base‖, in one pass over the parameters.

    The parameters are cut into ``min(torch.get_num_threads(), MAX_WORKERS)`` runs of about equal size, one per
    worker thread (torch releases the GIL in its kernels), each single-threaded within its
    products: on a shared machine, per-product thread teams wait on each other at every one of
    the thousands of small products (69 s against 8.7 s on a loaded 2-core machine); whole runs
    never do. The runs' sums are added in order, so the result depends on the number of workers
    only in its last bits.

    Args:
        target, base: the target model (a :class:`diag.features.mapped.TensorFile` or an in-memory file) and θ_base (a TensorFile).
        sources: :class:`diag.openworld.Source` objects (``ft``, ``star`` or ``ftx`` files).
        card: a :class:`diag.features.mapped.CardStream` or None (tier 0).
        keys: parameter names, in reading order.

    Returns:
        (rows, ‖τ_ftᵀ‖, ‖θ_base‖): one dict per source, in the order of ``sources``, with ``source``,
        ``norm_star_source`` (‖τ*ˢ‖), ``norm_ft_target`` (‖τ_ftᵀ‖), the source's quality metadata
        (:data:`diag.openworld.QUALITY_KEYS` present in its files); with a τ_ft file also ``cos_ft``,
        ``cos_ft.<group>`` per block group (:func:`diag.features.similarity.block_group`) and ``norm_ft_source``;
        with a card also ``risk_card``, ``risk_diag`` and ``grad_dot_tau`` (gᵀτ*; None when the card stores
        no g) (module docstring).
    """
    sizes = {key: math.prod(base.shape(key)) for key in keys}
    threads = torch.get_num_threads()
    runs = _split(keys, sizes, min(threads, MAX_WORKERS)) or [[]]
    torch.set_num_threads(1)
    try:
        if len(runs) == 1:
            parts = [_pass(runs[0], sizes, target, base, sources, card)]
        else:
            with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="tvdiag-stream") as pool:
                parts = list(pool.map(lambda run: _pass(run, sizes, target, base, sources, card), runs))
    finally:
        torch.set_num_threads(threads)
    sums = _merge(parts)
    with_ft = [src for src in sources if src.ft is not None]
    rows = [_row(src, sums, i, with_ft, card) for i, src in enumerate(sources)]
    return rows, math.sqrt(sum(sums.nt.values())), math.sqrt(sums.nb)


def _row(src, s: _Sums, i: int, with_ft: list, card) -> dict:
    """The features of source ``i`` from the sums."""
    nt = sum(s.nt.values())
    row = {"source": src.name, "norm_star_source": math.sqrt(float(s.star2[i])), **src.quality,
           "norm_ft_target": math.sqrt(nt)}
    if src.ft is not None:
        j = next(j for j, f in enumerate(with_ft) if f is src)
        dot = {g: float(v[j]) for g, v in s.dot.items()}
        ns = {g: float(v[j]) for g, v in s.ns.items()}
        row["cos_ft"] = cosine_from(sum(dot.values()), sum(ns.values()), nt)
        row.update({f"cos_ft.{g}": cosine_from(dot[g], ns[g], s.nt[g]) for g in dot})
        row["norm_ft_source"] = math.sqrt(sum(ns.values()))
    if card is not None:
        resid = float(s.resid[i])
        row["risk_card"] = float((card.eigvals * s.proj[i].pow(2)).sum()) + resid
        row["risk_diag"] = resid + float((card.eigvals * s.v2[i]).sum())
        row["grad_dot_tau"] = float(s.gtau[i]) if card.has_gradient else None
    return row
