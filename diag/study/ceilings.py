"""Noise ceilings: how much any cross-domain number can mean, given the seeds and the supervision noise.

* **cos τ* across seeds**: per domain, cos(τ*_a, τ*_b) of the same domain trained with seeds
  a ≠ b (the same α and variant). A cross-domain cos(τ*ˢ, τ*ᵀ) can be read against it: two
  runs of the *same* domain agree only this much.
* **cos τ_ft across seeds**: the same for τ_ft.
* **Kernel SHAP noise ceiling**: the E-RMSE between two independent Kernel SHAP runs on the
  seed's θ_ft model (:func:`train.explain.kernelshap.noise_ceiling`), on at most 64 test images,
  with the store's sample count: the noise level of φ itself. It is not a floor: two noisy runs
  each carry the noise, so a model that predicted the exact Shapley values would score below it
  (about 1/√2 of it when the two runs' errors are independent and equal in size).

Cosines are one streamed float64 Gram pass over every (domain, seed) vector
(:func:`diag.features.similarity.gram_streamed`); cos_ij = G_ij / sqrt(G_ii · G_jj) (a vector with itself
is exactly 1). The cross-domain mean of cos τ* per seed comes from the same Gram matrix.

Standard errors: over seed pairs for the cosines (sd / sqrt(#pairs); none with one pair); for
the noise ceiling, the images are split into groups of :data:`GROUP` (each with its own pair of
generator seeds derived from the two given), c² = Σ n_g c_g² / n is the E-RMSE² over all images
and se(c) = sd_g(c_g²) / (sqrt(G) · 2c) (delta method).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diag.features.similarity import cosine_from, gram_streamed, VectorSpec
from diag.runtime.context import Workspace
from diag.study.summary import mean_se
from diag.transfer.eq8 import pair_seed
from train.errors import ArtifactError, DataError
from train.explain.kernelshap import noise_ceiling
from train.model import load_visual_state
from train.tensorio import read_metadata

#: At most this many test images enter the Kernel SHAP ceiling.
MAX_IMAGES = 64
#: Images per group of the ceiling's standard error.
GROUP = 8


def _cos(G: np.ndarray, i: int, j: int) -> float:
    return cosine_from(G[i, j], G[i, i], G[j, j])


def seed_gram(ws: Workspace, domains: Sequence[str], seeds: Sequence[int], kind: str) -> np.ndarray:
    """Gram matrix of τ* (``star``) or τ_ft (``ft``) of every (domain, seed), domain-major, float64 streamed.

    Row ``i · len(seeds) + k`` is domain i at seed k; τ* = θ_ft* − θ_ref of ``ws``'s α and variant.
    """
    if kind not in ("star", "ft"):
        raise DataError(f"seed_gram kind must be 'star' or 'ft', got {kind!r}")
    specs = []
    for d in domains:
        for s in seeds:
            run = ws.for_run(seed=s)
            ft = run.vector_path(d, "ft")
            specs.append(VectorSpec(run.vector_path(d, "ftx"), run.vector_path(d, "ref")) if kind == "star"
                         else VectorSpec(ft))
    missing = [str(p) for spec in specs for p in spec.files if not p.is_file()]
    if missing:
        raise ArtifactError(f"missing vector(s) {', '.join(missing[:3])}; build them with "
                            f"`diag zoo --seeds {' '.join(map(str, seeds))}`")
    return gram_streamed(specs, by="global")[0]


def seed_cosines(G: np.ndarray, n_domains: int, n_seeds: int) -> list[list[float]]:
    """Per domain, cos between every pair of its seeds (k < l) from a :func:`seed_gram` matrix."""
    return [[_cos(G, i * n_seeds + k, i * n_seeds + m) for k, m in itertools.combinations(range(n_seeds), 2)]
            for i in range(n_domains)]


def cross_domain_cosines(G: np.ndarray, n_domains: int, n_seeds: int) -> list[float]:
    """Per seed, the mean of cos(τ_d, τ_e) over domain pairs d < e (the study's cross-domain cos)."""
    return [float(np.mean([_cos(G, i * n_seeds + k, j * n_seeds + k)
                           for i, j in itertools.combinations(range(n_domains), 2)])) if n_domains > 1 else math.nan
            for k in range(n_seeds)]


def shap_samples(ws: Workspace, domain: str) -> int:
    """Kernel SHAP coalitions per image of the stored φ of ``ws``'s seed (from its metadata)."""
    meta = read_metadata(ws.attribution_path(domain))
    if "samples" not in meta:
        raise ArtifactError(f"{ws.attribution_path(domain)} has no Kernel SHAP sample count (method "
                            f"{meta.get('method', '?')}): the noise ceiling is for Kernel SHAP supervision")
    return int(meta["samples"])


def kernelshap_ceiling(ws: Workspace, domain: str, n_images: int = MAX_IMAGES,
                       shap_seeds: tuple[int, int] = (101, 202), samples: int | None = None) -> tuple[float, float, int]:
    """E-RMSE between two Kernel SHAP runs on ``ws``'s θ_ft of ``domain`` (its first test images).

    ``samples`` coalitions per image (default: the stored φ's own count); a larger count says how
    much of this noise level a denser φ would remove.

    Returns:
        (ceiling, standard error, images used).

    Raises:
        DataError: equal generator seeds (two identical runs measure no noise).
    """

    if shap_seeds[0] == shap_seeds[1]:
        raise DataError(f"the Kernel SHAP ceiling needs two different generator seeds, got {tuple(shap_seeds)}")
    tset = ws.target_set(domain, "test")
    n = min(int(n_images), MAX_IMAGES, len(tset.y))
    if n < 1:
        raise DataError(f"no test images of '{domain}' for the Kernel SHAP ceiling")
    model = ws.model(domain)
    load_visual_state(model, ws.state(ws.vector(domain, "ft")))
    samples = shap_samples(ws, domain) if samples is None else int(samples)
    if samples < 2:
        raise DataError(f"the Kernel SHAP ceiling needs at least 2 samples per image, got {samples}")
    patch = ws.backbone.config.patch_size
    parts, sizes = [], []
    with torch.no_grad():
        for g, start in enumerate(range(0, n, GROUP)):
            stop = min(start + GROUP, n)
            seeds = tuple(pair_seed(s, domain, domain, f"shap-noise{g}") for s in shap_seeds)
            c = noise_ceiling(model, tset.x[start:stop], tset.y[start:stop], patch, samples, seeds=seeds)
            parts.append(c * c)
            sizes.append(stop - start)
    sq = np.asarray(parts)
    ceiling = math.sqrt(float(np.dot(sq, sizes) / n))
    se = float(sq.std(ddof=1) / math.sqrt(sq.size) / (2 * ceiling)) if sq.size > 1 and ceiling > 0 else math.nan
    return ceiling, se, n


@dataclass(frozen=True)
class DomainCeiling:
    """Ceilings of one domain: cosines over seed pairs and the Kernel SHAP ceiling per seed."""
    domain: str
    cos_star_seeds: list[float]
    cos_ft_seeds: list[float]
    noise: dict[int, tuple[float, float]]
    samples: int
    n_images: int
    noise_at: dict[int, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        cs, cf = mean_se(self.cos_star_seeds), mean_se(self.cos_ft_seeds)
        nm = mean_se([v for v, _ in self.noise.values()])
        return {"domain": self.domain, "cos_star_seeds": self.cos_star_seeds, "cos_star_mean": cs[0],
                "cos_star_se": cs[1], "cos_ft_seeds": self.cos_ft_seeds, "cos_ft_mean": cf[0], "cos_ft_se": cf[1],
                "kernelshap_noise": {str(s): {"ermse": v, "se": e} for s, (v, e) in self.noise.items()},
                "kernelshap_noise_mean": nm[0], "kernelshap_samples": self.samples, "n_images": self.n_images,
                "kernelshap_noise_at_samples": {str(k): {"ermse": v, "se": e} for k, (v, e) in self.noise_at.items()}}


@dataclass(frozen=True)
class Ceilings:
    """Every domain's ceilings beside the cross-domain cos τ* (mean over domain pairs, per seed)."""
    seeds: list[int]
    variant: str
    alpha: float
    shap_seeds: tuple[int, int]
    domains: list[DomainCeiling]
    cross_cos_star: list[float]

    def to_dict(self) -> dict:
        m, sd = float(np.mean(self.cross_cos_star)), (float(np.std(self.cross_cos_star, ddof=1))
                                                       if len(self.cross_cos_star) > 1 else float("nan"))
        return {"seeds": self.seeds, "variant": self.variant, "alpha": self.alpha,
                "shap_seeds": list(self.shap_seeds), "domains": [d.to_dict() for d in self.domains],
                "cross_domain_cos_star": {"per_seed": self.cross_cos_star, "mean": m, "sd_over_seeds": sd}}

    def table(self) -> str:
        d = self.to_dict()
        cc = d["cross_domain_cos_star"]
        lines = [f"ceilings: variant {self.variant}, α={self.alpha:g}, seeds {self.seeds}; Kernel SHAP generator seeds "
                 f"{self.shap_seeds[0]}/{self.shap_seeds[1]}",
                 f"{'domain':14s} {'cos τ* seeds':>16s} {'cos τ_ft seeds':>16s} {'KS noise E-RMSE ± se (per seed)':>40s}"]
        for r in d["domains"]:
            noise = ", ".join(f"{v['ermse']:.3f}±{v['se']:.3f}" for v in r["kernelshap_noise"].values())
            lines.append(f"{r['domain']:14s} {_pm(r['cos_star_mean'], r['cos_star_se']):>16s} "
                         f"{_pm(r['cos_ft_mean'], r['cos_ft_se']):>16s} {noise:>40s}   "
                         f"({r['kernelshap_samples']} samples, {r['n_images']} images)")
            for k, v in r["kernelshap_noise_at_samples"].items():
                lines.append(f"{'':14s} {'':>16s} {'':>16s} {v['ermse']:>29.3f}±{v['se']:.3f}   "
                             f"(seed {self.seeds[0]}'s θ_ft at {k} samples per image)")
        lines.append(f"cross-domain cos τ* (mean over domain pairs): {_pm(cc['mean'], cc['sd_over_seeds'])} "
                     f"(± sd over seeds; per seed {', '.join(f'{v:.3f}' for v in cc['per_seed'])})")
        lines.append("cos over seed pairs: mean ± se over pairs (no se with one pair); cos τ* across seeds is the "
                     "most a cross-domain cos τ* can mean. KS noise: E-RMSE of two Kernel SHAP runs on θ_ft.")
        return "\n".join(lines)


def _pm(m: float, s: float) -> str:
    if not math.isfinite(m):
        return "n/a (1 seed)"
    return f"{m:.3f}" + (f" ± {s:.3f}" if math.isfinite(s) else "")


def ceilings(ws: Workspace, domains: Sequence[str], seeds: Sequence[int], n_images: int = MAX_IMAGES,
             shap_seeds: tuple[int, int] = (101, 202), ks_samples: Sequence[int] = ()) -> Ceilings:
    """The :class:`Ceilings` of ``domains`` over ``seeds`` (``ws`` gives α, variant and θ_base).

    ``ks_samples``: further Kernel SHAP sample counts at which the noise ceiling is measured on the
    first seed's θ_ft (the preprint's density is ≈ 10 per patch), beside the stored φ's own count.
    """
    domains, seeds = list(dict.fromkeys(domains)), [int(s) for s in seeds]
    if not domains or not seeds:
        raise DataError("ceilings need at least one domain and one seed")
    g_star, g_ft = seed_gram(ws, domains, seeds, "star"), seed_gram(ws, domains, seeds, "ft")
    cs, cf = seed_cosines(g_star, len(domains), len(seeds)), seed_cosines(g_ft, len(domains), len(seeds))
    rows = []
    for i, d in enumerate(domains):
        noise, used = {}, 0
        for s in dict.fromkeys(seeds):
            v, e, used = kernelshap_ceiling(ws.for_run(seed=s), d, n_images, shap_seeds)
            noise[s] = (v, e)
        at = {int(k): kernelshap_ceiling(ws.for_run(seed=seeds[0]), d, n_images, shap_seeds, int(k))[:2]
              for k in dict.fromkeys(ks_samples)}
        rows.append(DomainCeiling(d, cs[i], cf[i], noise, shap_samples(ws.for_run(seed=seeds[0]), d), used, at))
    return Ceilings(seeds, ws.variant, ws.alpha, tuple(shap_seeds), rows,
                    cross_domain_cosines(g_star, len(domains), len(seeds)))
