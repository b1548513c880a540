"""Who owns an artifact, and what a writer may do with it: reuse, keep, build, build from, or refuse.

:func:`decide` is the one decision every writer of the store makes before it writes a file
(the zoo's θ_base, heads, θ_ft, φ and θ_ft*, the cached curvature, the Hessian diagonals, the
card's ``--out``), in every process (``--workers`` and torchrun ranks call the same code):

* missing, or covered by ``--rebuild DOMAIN|all`` → **build**;
* written by tvdiag (a provenance ``key`` or ``tvdiag_version`` in its metadata, not imported)
  with the requested key → **reuse**; with another key on the same base → **build** over it;
* imported (``diag import``: its metadata names ``imported_from``) → **keep**: used as is, never
  replaced; what is built from it is **build from** (its key then derives from the imported file's);
* no tvdiag provenance at all, or taken from another base than the store's → **refuse**;
* to be built from an imported input whose recipe cannot follow from it (θ_ft* of the ``paper``
  variant is θ_ft's controlled pair: same batches from θ_base) → **refuse**.

A refusal is an :class:`~train.errors.ArtifactError`: one line naming the file and ``--rebuild``,
raised before anything is written. tvdiag never overwrites a file it did not write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from train.errors import ArtifactError
from train.external_weights import file_sha256
from train.tensorio import read_metadata

#: What :func:`decide` may answer (a refusal raises instead).
ACTIONS = ("reuse", "keep", "build", "build-from")


@dataclass(frozen=True)
class Verdict:
    """What a writer does with ``path``: ``action`` (one of :data:`ACTIONS`) and the file's ``origin``.

    ``origin`` is ``missing``, ``built`` (tvdiag's) or ``imported``; ``key`` is the provenance key
    of the file that will be read (the existing one when kept or reused, else the requested key).
    """

    path: Path
    action: str
    origin: str
    key: str
    what: str = ""
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def usable(self) -> bool:
        """Whether the existing file is read as is (reused or kept)."""
        return self.action in ("reuse", "keep")

    @property
    def imported(self) -> bool:
        return self.origin == "imported"

    def sha256(self) -> str:
        """sha256 of the file's bytes (read now; ``""`` when the file is missing)."""
        return file_sha256(self.path) if Path(self.path).is_file() else ""

    def record(self) -> dict:
        """``{"origin": "built"|"imported", "sha256": …}`` (+ the imported input's sha256) for JSON and tables."""
        out = {"origin": "imported" if self.imported else "built", "sha256": self.sha256()}
        if self.imported and self.meta.get("sha256"):
            out["input_sha256"] = self.meta["sha256"]
        return out


def provenance(meta: dict) -> dict:
    """The provenance of a file's metadata: its top level, plus a card's JSON ``provenance`` entry."""
    out = dict(meta)
    nested = meta.get("provenance")
    if isinstance(nested, str) and "key" not in meta:
        try:
            inner = json.loads(nested)
        except ValueError:
            inner = None
        if isinstance(inner, dict):
            out.update({k: str(v) for k, v in inner.items() if k not in out})
    return out


def origin_of(meta: dict) -> str:
    """``imported`` (``diag import``), ``built`` (tvdiag's provenance) or ``foreign`` (anything else)."""
    if "imported_from" in meta:
        return "imported"
    return "built" if ("key" in meta or "tvdiag_version" in meta) else "foreign"


def decide(path: Path, key: str, *, store=None, what: str = "", inputs: Sequence[Verdict] = (),
           from_imported: str | None = None, read: Callable[[Path], dict] = read_metadata) -> Verdict:
    """Reuse, keep, build, build from, or refuse the artifact at ``path`` for content key ``key``.

    Args:
        path: the artifact.
        key: the content key the writer's recipe would give it.
        store: the :class:`train.store.Store` ``path`` belongs to (its ``--rebuild`` and base apply;
            None for a file outside any store, e.g. ``diag card --out``).
        what: a short name for messages (``"fashion θ_ft"``).
        inputs: verdicts of the artifacts the recipe builds from.
        from_imported: None when the recipe can be followed from imported inputs; else why not.
        read: the file's provenance (default: its safetensors metadata; a study table's comes
            from its check file, :func:`diag.table.write_table`).

    Raises:
        ArtifactError: corrupt or pickled file; no tvdiag provenance; another base; or it must be
            built from an imported input and ``from_imported`` says it cannot.
    """
    path = Path(path)
    label = what or str(path)
    rebuild = store is not None and path.is_file() and store.rebuilds(path)
    existing = path.is_file() and not rebuild
    if existing:
        meta = provenance(read(path))
        origin = origin_of(meta)
        if origin == "foreign":
            raise _refuse(store, path, "was not written by tvdiag (no provenance key in its metadata)")
        _check_base(store, path, meta)
        if origin == "imported":
            return Verdict(path, "keep", "imported", meta.get("key", ""), label, meta)
        if meta.get("key") == key:
            return Verdict(path, "reuse", "built", key, label, meta)
    imported = [v for v in inputs if v.imported]
    if imported and from_imported is not None:
        source = imported[0]
        raise _refuse(store, source.path, f"({source.what}) was imported (sha256 {source.sha256()[:16]}) and "
                      f"{label} cannot be built from it: {from_imported}")
    return Verdict(path, "build-from" if imported else "build", "built" if existing or rebuild else "missing",
                   key, label)


def _check_base(store, path: Path, meta: dict) -> None:
    """Refuse a file taken from another base than the store's (θ_base itself is exempt)."""
    if store is None or "base_hash" not in meta or path.resolve() == store.base_path().resolve():
        return
    current = store._current_base_hash()
    if current is not None and meta["base_hash"] != current:
        raise _refuse(store, path, f"was taken from base {meta['base_hash']}, not this store's base {current}")


def _refuse(store, path: Path, why: str) -> ArtifactError:
    if store is not None:
        return store._refuse(path, why)
    return ArtifactError(f"{path} {why}; tvdiag does not overwrite it: delete it or write elsewhere")


__all__ = ["ACTIONS", "Verdict", "decide", "origin_of", "provenance"]
