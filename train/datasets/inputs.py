"""From a domain's split to a backbone's inputs: the one place where preprocessing is decided.

The rule: every preprocessing constant comes from the backbone's
:class:`~train.backbones.BackboneConfig` and from nothing else.

* size: a domain loaded by name is loaded at ``S = config.image_size``
  (:func:`domain_for`): the mini-suite's 32-px npz is resized (bilinear, antialiased, uint8) only
  when ``S != 32``; a folder is centre-cropped and resized (bicubic) straight to ``S``. A
  :class:`Domain` already loaded at another size is resized to ``S`` (bilinear, antialiased,
  float) by :func:`~train.datasets.pixels.to_model_input`.
* values: ``x = (u / 255 - config.mean) / config.std`` per channel, grayscale repeated to three
  channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from train.datasets.pixels import to_model_input
from train.datasets.domain import Domain
from train.datasets.load import load_domain
from train.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from train.backbones import BackboneConfig  # typing only, deferred: datasets never load the model code


def domain_for(
    config: BackboneConfig, name: str, data: str | Path | None = None, val_carve: str | None = None
) -> Domain:
    """The domain ``name`` loaded at the backbone's input side ``config.image_size``.

    Args:
        config: The backbone's config.
        name, data, val_carve: As :func:`~train.datasets.load_domain`.
    """
    return load_domain(name, data=data, image_size=config.image_size, val_carve=val_carve)


def split_inputs(
    config: BackboneConfig,
    domain: Domain | str,
    split: str,
    limit: int | None = None,
    data: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a split as model inputs and their labels.

    ``x = (resize_S(u / 255) - config.mean) / config.std`` with ``S = config.image_size``
    (the module's rule). Splits are stored in a stratified order, so a prefix holds the classes
    in proportion.

    Args:
        config: The backbone's :class:`~train.backbones.BackboneConfig` (image_size, mean, std).
        domain: A loaded :class:`Domain`, or a name loaded by :func:`domain_for`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"pool"``.
        limit: Keep the first ``limit`` images (>= 1); all if None.
        data: As :func:`~train.datasets.load_domain`; only with a name.

    Returns:
        ``(x, y)``: float32 ``(n, 3, S, S)`` and int64 ``(n,)``, ``n = min(limit, N)``.

    Raises:
        DataError: ``limit < 1``, ``data`` given with a loaded domain, or no such split.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 image, got {limit}")
    if isinstance(domain, Domain):
        if data is not None:
            raise DataError(f"{domain.name}: data={data} was given with an already loaded domain; pass one")
    else:
        domain = domain_for(config, domain, data)
    part = domain.split(split)
    n = len(part) if limit is None else min(limit, len(part))
    x = to_model_input(part.images[:n], config.mean, config.std, size=config.image_size)
    return x, part.labels[:n]


model_inputs = split_inputs
