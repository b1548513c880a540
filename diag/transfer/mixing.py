"""Multi-source explainability vectors: mixes of several sources' τ*, never the target's.

:func:`mix` is Σ wₛ τ*ˢ with normalised weights; :func:`universal` the uniform mix of every other
domain; :func:`mix_weights` the ranker-weighted rule wₛ ∝ max(predicted gain, 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from train.errors import DataError
from train.vectors import TaskVector

__all__ = ["mix", "mix_weights", "universal"]




def mix(vectors: Mapping[str, TaskVector], weights: Mapping[str, float], target: str) -> TaskVector:
    """τ*mix = Σₛ wₛ τ*ˢ with the weights normalised to sum 1, never including the target.

    Args:
        vectors: source domain → τ*ˢ (same base and shapes).
        weights: source domain → weight ≥ 0 (keys must be a subset of ``vectors``; absent = 0).
        target: the target domain; passing its vector (by name) is refused.

    Raises:
        DataError: the target among the vectors or weights, negative/non-finite weights, all
            weights 0, or a weight for a domain without a vector.
    """
    if target in vectors or target in weights:
        raise DataError(f"mix refuses the target's own vector ('{target}'): only other domains may be mixed")
    missing = sorted(set(weights) - set(vectors))
    if missing:
        raise DataError(f"weights for domains without a vector: {', '.join(missing)}")
    w = {d: float(v) for d, v in weights.items()}
    if any(not math.isfinite(v) or v < 0 for v in w.values()):
        raise DataError(f"mixing weights must be finite and >= 0, got {w}")
    total = sum(w.values())
    if total <= 0:
        raise DataError("mixing weights are all 0")
    used = sorted(d for d, v in w.items() if v > 0)
    out = sum((w[d] / total) * vectors[d] for d in used)
    note = ", ".join(f"{d}:{w[d] / total:.3g}" for d in used)
    return TaskVector(dict(out.tensors), out.base_hash, {"derived": f"mix of {note}"})


def universal(vectors_by_domain: Mapping[str, TaskVector], target: str) -> TaskVector:
    """The universal explainability vector of ``target``: the uniform mix of every other domain's τ*."""
    others = {d: v for d, v in vectors_by_domain.items() if d != target}
    if not others:
        raise DataError(f"no domain other than '{target}' to mix")
    return mix(others, {d: 1.0 for d in others}, target)


def mix_weights(gains: Mapping[str, float], target: str) -> dict[str, float]:
    """wₛ = max(gₛ, 0) / Σ max(g, 0) over the sources other than ``target``; ``{}`` when no gain is positive.

    The weights of the ranker-weighted mix τ*mix = Σ wₛ τ*ˢ: nonnegative, summing to 1, 0 for a
    source without a predicted gain (gₛ ≤ 0 or not finite), and never the target's.
    """
    pos = {s: float(g) for s, g in gains.items() if s != target and math.isfinite(float(g)) and float(g) > 0}
    total = sum(pos.values())
    return {s: pos.get(s, 0.0) / total for s in gains if s != target} if total > 0 else {}
