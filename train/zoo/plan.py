"""What the zoo build does with each artifact of a domain: reuse, keep, build, build from, or refuse.

Every verdict comes from :meth:`train.store.Store.decide` (:mod:`train.ownership`), the call the
writers of :class:`train.zoo.build.Zoo` make too; :meth:`ZooPlan.plan` makes them all before
anything of a domain is written, so a refusal leaves the store unchanged. An imported θ_ft is
kept: φ and θ_ft* of the ``from-ft`` variant are built from it (their keys derive from the
imported file's key); θ_ft* of the ``paper`` variant is θ_ft's controlled pair and is refused
next to an imported θ_ft unless θ_ft* (or a bare τ*) was imported too.
"""

from __future__ import annotations

from pathlib import Path

from train.backbones import BackboneConfig, load_config
from train.losses import check_alpha
from train.ownership import Verdict
from train.store import content_key, has_twin, trained_variant, TWIN_ALPHA
from train.tensorio import read_metadata
from train.zoo import shipped


class ZooPlan:
    """The verdicts of :class:`train.zoo.build.Zoo` (a mixin: it reads the zoo's store, keys and domains)."""

    # ------------------------------------------------------------------ θ_base, without loading it
    def _base_meta(self) -> dict | None:
        """The header of the store's θ_base when :meth:`base` would read the file as it is (None: it would build)."""
        if self._base_header is None and self._backbone is None:
            load_config(self.config.backbone)  # unknown names fail first, as in base()
            if self.store.decide(self.store.base_path(), self._base_key(), what="θ_base").usable:
                self._base_header = read_metadata(self.store.base_path())
        return self._base_header

    def base_hash(self) -> str:
        """θ_base's hash, for keys and plans: from the file's header while the weights are not needed (a cached
        run never loads them), else :meth:`base`'s."""
        meta = None if self._backbone is not None else self._base_meta()
        return meta["base_hash"] if meta is not None else self.base()[1]

    def base_config(self) -> BackboneConfig:
        """θ_base's backbone config (image size, patches), from the file's header like :meth:`base_hash`."""
        meta = None if self._backbone is not None else self._base_meta()
        return BackboneConfig.from_json(meta["config"]) if meta is not None else self.base()[0].config

    def shipped_base(self) -> Path | None:
        """The repository's θ_base for this zoo's key (:mod:`train.zoo.shipped`); None under ``--rebuild base|all``."""
        if self.store.rebuild & {"base", "all"} or self.config.checkpoint or self.config.pretrained:
            return None
        return shipped.shipped_base(self._base_key())

    def _head_verdict(self, name: str) -> Verdict:
        domain = self.domain(name)
        key = content_key({"base": self.base_hash(), "classnames": domain.classnames, "templates": domain.templates})
        return self.store.decide(self.store.head_path(name), key, what=f"{name} head")

    def _ft_verdict(self, name: str) -> Verdict:
        """What happens to θ_ft of ``name`` (:meth:`Store.decide`): reused, kept (imported), or built."""
        return self.store.decide(self.store.vector_path(name, "ft", seed=self.config.seed), self._ft_key(name),
                                 what=f"{name} θ_ft")

    def _ft_identity(self, name: str) -> str:
        """The key of the θ_ft that φ and θ_ft* are built from: the recipe's, or an imported θ_ft's own."""
        return self._ft_verdict(name).key

    def _attr_verdict(self, name: str) -> Verdict:
        """What happens to φ of ``name``: reused, or built (from θ_ft, imported or not)."""
        path = self.store.attribution_path(name, self.config.supervision, seed=self.config.seed)
        return self.store.decide(path, self._attr_key(name), what=f"{name} φ", inputs=(self._ft_verdict(name),))

    def _ftx_verdict(self, name: str, alpha: float, variant: str) -> Verdict:
        """What happens to θ_ft* of ``name``: reused or kept (imported); built, from an imported θ_ft only
        for ``from-ft`` (``paper`` is θ_ft's controlled pair: same batches from θ_base, so it is refused)."""
        alpha, variant = check_alpha(alpha), trained_variant(variant)
        path = self.store.vector_path(name, "ftx", alpha, seed=self.config.seed, variant=variant)
        why = None if variant == "from-ft" else (
            "the paper variant is θ_ft's controlled pair (same batches from θ_base); import θ_ft* too "
            "(diag import --kind ftx or --kind star) or build --variant from-ft (continued from θ_ft)")
        return self.store.decide(path, self._ftx_key(name, alpha, variant), what=f"{name} θ_ft* α={alpha:g} {variant}",
                                 inputs=(self._ft_verdict(name), self._attr_verdict(name)), from_imported=why)

    def plan(self, name: str, alphas: tuple[float, ...] = (0.8,), variants: tuple[str, ...] = ("paper",),
             explain: bool = True) -> dict[str, Verdict]:
        """Every artifact of ``name`` for this seed and what its build does with it, deciding before writing.

        Keys ``head``, ``ft`` and (``explain``) ``attributions`` and ``ftx-a<α>[-fromft]`` (with the
        twin of ``from-ft``, ``ftx-a1-fromft``), each a
        :class:`train.ownership.Verdict` from the same :meth:`Store.decide` call the writers make
        (θ_base is built first). A refusal (a file tvdiag did not write, or θ_ft* of the paper
        variant next to an imported θ_ft) raises here, before anything of the domain is written.
        """
        out = {"head": self._head_verdict(name), "ft": self._ft_verdict(name)}
        if explain:
            out["attributions"] = self._attr_verdict(name)
            for variant in variants:
                twin = (TWIN_ALPHA,) if has_twin(variant) else ()
                for alpha in (*alphas, *twin):
                    verdict = self._ftx_verdict(name, alpha, variant)
                    out[verdict.path.name.removesuffix(".safetensors")] = verdict
        return out

    def pending(self, name: str, alphas: tuple[float, ...] = (0.8,), variants: tuple[str, ...] = ("paper",),
                explain: bool = True) -> bool:
        """Whether building ``name`` for this seed would train or explain anything (:meth:`plan`; the head is cheap)."""
        return any(not v.usable for k, v in self.plan(name, alphas, variants, explain).items() if k != "head")
