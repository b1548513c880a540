"""What every CLI command shares: the store, the zoo settings, and building missing artifacts.

``diag`` reads artifacts from the store; when a mini-suite artifact is missing it asks the
training core's zoo to build it (with progress). This is the only place ``diag`` reaches
into ``train``'s build code, and it does so lazily.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from train.datasets import MINISUITE
from train.errors import unknown
from diag.options import domain_name
from train.store import Store, check_name, default_root


@dataclass
class Context:
    """Store location, zoo preset and backbone choice of one CLI invocation."""

    store_root: Path
    preset: str = "default"
    backbone: str = "tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    data: dict[str, str] | None = None
    progress: bool = True
    rebuild: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)

    def zoo_config(self):
        from train.zoo import preset

        cfg = preset(self.preset)
        if self.backbone != "tiny" or self.pretrained or self.checkpoint:
            cfg = replace(cfg, backbone=self.backbone, pretrained=self.pretrained, checkpoint=self.checkpoint)
        return cfg

    @property
    def store(self) -> Store:
        cfg = self.zoo_config()
        bid = cfg.backbone_id if self.preset == "default" else f"{cfg.backbone_id}-{self.preset}"
        return Store(self.store_root, bid, rebuild=frozenset(self.rebuild), rebuild_before=self.started)

    def zoo(self):
        from train.zoo import Zoo

        return Zoo(self.store, self.zoo_config(), progress=self.progress, data=self.data)

    def ensure(self, domains: list[str], alphas: tuple[float, ...] = (0.8,), explain: bool = True) -> Store:
        """Build whatever is missing for ``domains`` (head, θ_ft, φ, θ_ft*) and return the store."""
        zoo = self.zoo()
        for name in domains:
            zoo.head(name)
            zoo.ft(name)
            if explain:
                zoo.attributions(name)
                for alpha in alphas:
                    zoo.ftx(name, alpha)
        return self.store

    def domains(self) -> list[str]:
        """Domains of the suite: the mini-suite plus any given with ``--data``."""
        return list(MINISUITE) + [d for d in (self.data or {}) if d not in MINISUITE]

    def check_domain(self, name: str) -> str:
        from train.datasets import available_domains

        known = set(self.domains()) | set(available_domains())
        if name not in known:
            raise unknown("domain", name, known)
        return name


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts."""
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: $TVDIAG_STORE or ~/.cache/tvdiag)")
    parser.add_argument("--preset", default="default", help="zoo settings: default | smoke (tiny, for tests)")
    parser.add_argument("--backbone", default="tiny", help="tiny, or an open_clip name such as ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag already in its cache")
    parser.add_argument("--checkpoint", default=None, help="local weights file (safetensors or legacy .pt)")
    parser.add_argument("--data", action="append", default=[], metavar="[DOMAIN=]PATH",
                        help="local copy of a dataset (ImageFolder or torchvision-style root); repeatable")
    parser.add_argument("--rebuild", action="append", default=[], metavar="DOMAIN", type=domain_name,
                        help="rebuild DOMAIN's artifacts even if present or not written by tvdiag ('all': every one)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def context_from(args: argparse.Namespace, default_domain: str | None = None) -> Context:
    data: dict[str, str] = {}
    for item in args.data:
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            if default_domain is None:
                from train.errors import TvdiagError

                raise TvdiagError("--data needs DOMAIN=PATH here")
            name, path = default_domain, item
        data[check_name(name)] = path
    return Context(store_root=args.store or default_root(), preset=args.preset, backbone=args.backbone,
                   pretrained=args.pretrained, checkpoint=args.checkpoint, data=data, progress=not args.quiet,
                   rebuild=tuple(args.rebuild))
