"""The zoo: every parameter set and supervision of the paper, per domain, in the store.

:class:`~train.zoo.build.Zoo` builds (:mod:`train.zoo.build`: the controlled pair θ_ft / θ_ft*, φ,
θ_base); :class:`~train.zoo.config.ZooConfig` and :func:`~train.zoo.config.preset` say what it builds.
"""

from train.zoo.build import Zoo
from train.zoo.config import PRESETS, SHAP_BASELINE, ZooConfig, preset

__all__ = ["PRESETS", "SHAP_BASELINE", "Zoo", "ZooConfig", "preset"]
