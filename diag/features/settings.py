"""How a target's curvature is estimated: :class:`CurvatureSettings` and the presets' own.

Part of every curvature cache key and of the study's row key; :mod:`diag.features.pair_features`
re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass

from diag.curvature.kfac import CARD_FORMS
from train.errors import unknown

__all__ = ["CurvatureSettings", "PRESET_CURVATURE"]


@dataclass(frozen=True)
class CurvatureSettings:
    """How a target's curvature is estimated (part of the cache key).

    The defaults are the ``default`` zoo preset's; :meth:`for_preset` gives a preset's own
    (the smoke presets estimate Hᵀ on few images with few probes and eigenpairs). ``card_form`` is the
    card ``risk_card`` and ``grad_dot_tau`` come from (:data:`~diag.curvature.kfac.CARD_FORMS`); ``k``
    counts the eig card's eigenpairs (built only for ``card_form="eig"`` or a method that projects).
    """
    n_images: int = 256
    batch_size: int = 128
    probes: int = 24
    k: int = 8
    seed: int = 0
    engine: str = "auto"
    split: str = "train"
    params: tuple[str, ...] | None = None
    card_form: str = "kfac"

    def __post_init__(self) -> None:
        if self.card_form not in CARD_FORMS:
            raise unknown("card form", self.card_form, CARD_FORMS)

    @classmethod
    def for_preset(cls, preset: str) -> "CurvatureSettings":
        """The curvature settings of zoo preset ``preset`` (:data:`PRESET_CURVATURE`, else the defaults)."""
        return PRESET_CURVATURE.get(preset, cls())


#: Zoo presets whose curvature settings differ from :class:`CurvatureSettings`' defaults: the smoke
#: presets keep Hᵀ as small as their zoo (a quarter of the images, a third of the probes, half the eigenpairs).
PRESET_CURVATURE: dict[str, CurvatureSettings] = {
    "smoke": CurvatureSettings(n_images=64, probes=8, k=4),
    "vitb-smoke": CurvatureSettings(n_images=64, probes=8, k=4),
}
