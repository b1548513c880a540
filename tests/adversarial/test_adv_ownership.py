"""What the user brought stays theirs: no writing command replaces an imported or hand-written file.

``diag zoo`` used to retrain over an imported θ_ft (exit 0, another sha256). Now every writer
decides through :func:`train.ownership.decide`: an imported vector is kept and built from (or the
command refuses with exit 2, one line naming ``--rebuild``, the store unchanged); a hand-written
file at any artifact path is refused, never replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diag.cli import main
from tests._smoke import BACKBONE_ID
from tests.adversarial._helpers import common, refused, run, tree_hash

SMALL = ["--n-images", "8", "--probes", "4", "--k", "2"]
#: Every command that writes into the store, on two of the smoke store's domains (``screen`` and
#: ``rank-sources`` write the target's curvature through the code ``hessian --what card`` runs, and
#: need four known pairs without the target: more domains than this suite's budget builds).
WRITERS = {
    "zoo": ["zoo", "--domains", "mnist", "animals"],
    "hessian-card": ["hessian", "--domain", "mnist", "--what", "card", *SMALL],
    "hessian-diag": ["hessian", "--domain", "mnist", "--what", "diag", "--n-images", "8", "--probes", "4"],
    "study": ["study", "--domains", "mnist", "animals", "--no-curvature", "--no-controls"],
    "ceilings": ["ceilings", "--domains", "mnist", "--seeds", "0", "1", "--n-images", "4"],
}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fine_tuned(base: Path, out: Path, seed: int, bare: bool = False) -> Path:
    """A whole open_clip state dict fine-tuned from ``base`` (θ_base + 1 % noise), or a bare τ*."""
    state, gen = load_file(str(base)), torch.Generator().manual_seed(seed)
    if bare:
        state = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {k: v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=gen)
                 if k.startswith("visual.") and v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def imported(capsys, root: Path, tmp: Path, domain: str, kind: str, seed: int) -> Path:
    """``diag import`` of a fresh θ_ft (``ft``) or bare τ* (``star``) into ``root``; returns the store's file."""
    base = root / BACKBONE_ID / "base.safetensors"
    source = fine_tuned(base, tmp / f"{domain}-{kind}.safetensors", seed, bare=kind == "star")
    code, out, err = run(capsys, ["import", "--kind", kind, "--domain", domain, "--input", source, *common(root)])
    assert code == 0, err
    return Path(json.loads(out)["path"])


def test_zoo_keeps_an_imported_ft_and_builds_from_it(store_copy, tmp_path, capsys):
    """The issue's three steps: the imported θ_ft's sha256 is unchanged; the paper θ_ft* (its controlled
    pair) is refused with nothing written; the from-ft variant, φ and the head are built from it."""
    ft = imported(capsys, store_copy, tmp_path, "fashion", "ft", 1)
    before = sha(ft)
    line = refused(capsys, ["zoo", "--domains", "fashion", *common(store_copy)], "was imported", store_copy)
    assert "--rebuild fashion" in line and "controlled pair" in line
    code, out, err = run(capsys, ["zoo", "--domains", "fashion", "--variant", "from-ft", *common(store_copy)])
    assert code == 0, err
    assert sha(ft) == before
    rows = {r["artifact"]: r for r in json.loads(out)["vectors"]}
    assert rows["ft"] == {**rows["ft"], "origin": "imported", "sha256": before}
    assert rows["attributions"]["origin"] == rows["ftx-a0.8-fromft"]["origin"] == "built"
    folder = store_copy / BACKBONE_ID
    assert (folder / "heads" / "fashion.safetensors").is_file()
    assert (folder / "attributions" / "fashion-kernelshap.safetensors").is_file()
    code, out, _ = run(capsys, ["zoo", "--domains", "fashion", "--variant", "from-ft",
                                "--store", store_copy, "--preset", "smoke", "--quiet"])
    assert code == 0 and f"fashion θ_ft: imported (sha256 {before}), kept" in out
    # --rebuild is the explicit way to replace it
    code, _, err = run(capsys, ["zoo", "--domains", "fashion", "--rebuild", "fashion", *common(store_copy)])
    assert code == 0, err
    assert sha(ft) != before


def test_zoo_keeps_imported_ft_and_bare_star(store_copy, tmp_path, capsys):
    """θ_ft and a bare τ* of dtd imported: both kept byte for byte, the zoo builds only φ and the head."""
    ft = imported(capsys, store_copy, tmp_path, "dtd", "ft", 2)
    star = imported(capsys, store_copy, tmp_path, "dtd", "star", 3)
    before = {p: sha(p) for p in (ft, star)}
    code, out, err = run(capsys, ["zoo", "--domains", "dtd", *common(store_copy)])
    assert code == 0, err
    assert {p: sha(p) for p in (ft, star)} == before
    rows = {r["artifact"]: r for r in json.loads(out)["vectors"]}
    assert (rows["ft"]["origin"], rows["ftx-a0.8"]["origin"], rows["attributions"]["origin"]) == (
        "imported", "imported", "built")
    assert rows["ftx-a0.8"]["sha256"] == before[star]


# ----------------------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def filled(smoke, tmp_path_factory) -> Path:
    """The smoke store after every writer ran once: every artifact path the store has now exists."""
    root = tmp_path_factory.mktemp("filled") / "store"
    shutil.copytree(smoke.root, root)
    for argv in WRITERS.values():
        assert main([*map(str, argv), *common(root)]) in (0, 1), argv
    return root


#: Every artifact path of mnist the store has after every writer ran (a glob) and the writers that write it.
OWNERS = {
    "base.safetensors": ["zoo"],
    "heads/mnist.safetensors": ["zoo"],
    "vectors/mnist/ft.safetensors": ["zoo", "hessian-card"],
    "vectors/mnist/ftx-a0.8.safetensors": ["zoo", "study"],
    "vectors/mnist/s1/ft.safetensors": ["ceilings"],
    "attributions/mnist-kernelshap.safetensors": ["zoo", "study"],
    "curvature/mnist/card-*.safetensors": ["hessian-card"],
    "curvature/mnist/diag-[0-9a-f]*.safetensors": ["hessian-card"],
    "curvature/mnist/diag-hutchinson-*.safetensors": ["hessian-diag"],
    "studies/allpairs/pairs.csv": ["study"],
    "studies/allpairs/vectors.csv": ["study"],
}


def artifact(root: Path, pattern: str) -> Path:
    [path] = (root / BACKBONE_ID).glob(pattern)
    return path


def hand_written(path: Path) -> None:
    """A file the user wrote at ``path``: right format, no tvdiag provenance."""
    if path.suffix == ".csv":
        path.write_text("source,target\nmine,mine\n")
    else:
        save_file({"w": torch.zeros(3)}, str(path), metadata={"note": "mine"})


def import_over(capsys, root: Path, path: Path, tmp: Path) -> bool:
    """An imported vector at a θ_ft / θ_ft* path (``--rebuild`` lets the import replace tvdiag's file)."""
    parts = path.relative_to(root / BACKBONE_ID).parts
    if parts[0] != "vectors":
        return False
    seed = ["--seed", parts[2][1:]] if len(parts) == 4 else []
    source = fine_tuned(root / BACKBONE_ID / "base.safetensors", tmp / "mine.safetensors", 7)
    code, _, err = run(capsys, ["import", "--kind", "ft" if parts[-1] == "ft.safetensors" else "ftx", "--domain",
                                parts[1], "--input", source, *seed, "--rebuild", parts[1], *common(root)])
    assert code == 0, err
    return True


def kept_or_refused(capsys, root: Path, placed: list[Path], names) -> None:
    """Run each writer: refused (exit 2, one line, tree unchanged) or every placed file's sha256 unchanged."""
    mine = {p: sha(p) for p in placed}
    for name in names:
        before = tree_hash(root)
        code, out, err = run(capsys, [*WRITERS[name], *common(root)])
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and out == "", (name, err)
            assert tree_hash(root) == before, name
        else:
            assert code in (0, 1), (name, err)
        assert {p: sha(p) for p in placed} == mine, (name, code)


@pytest.fixture()
def filled_copy(filled, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(filled, root)
    return root


@pytest.mark.parametrize("placement", ["hand-written", "imported"])
def test_every_writer_leaves_the_users_files(filled_copy, tmp_path, capsys, placement):
    """A file the user wrote or imported at every artifact path at once: every writing command keeps them."""
    placed = [artifact(filled_copy, pattern) for pattern in OWNERS]
    if placement == "imported":
        placed = [p for p in placed if import_over(capsys, filled_copy, p, tmp_path)]
    else:
        for path in placed:
            hand_written(path)
    kept_or_refused(capsys, filled_copy, placed, WRITERS)


@pytest.mark.parametrize("pattern", OWNERS)
def test_each_artifact_path_is_refused_by_its_writers(filled_copy, capsys, pattern):
    """One hand-written file at a time: the commands that write that path refuse (exit 2, one line)."""
    path = artifact(filled_copy, pattern)
    hand_written(path)
    for name in OWNERS[pattern]:
        refused(capsys, [*WRITERS[name], *common(filled_copy)], str(path.name), filled_copy)


def test_workers_keep_imported_vectors(store_copy, tmp_path, capsys):
    """``--workers 2``: two domains built in two processes, each keeping the user's vectors."""
    ft = imported(capsys, store_copy, tmp_path, "dtd", "ft", 2)
    star = imported(capsys, store_copy, tmp_path, "dtd", "star", 3)
    fashion = imported(capsys, store_copy, tmp_path, "fashion", "ft", 1)
    before = {p: sha(p) for p in (ft, star, fashion)}
    code, out, err = run(capsys, ["zoo", "--domains", "dtd", "fashion", "--variant", "from-ft", "--workers", "2",
                                  *common(store_copy)])
    assert code == 0, err
    assert json.loads(out)["workers"] == 2
    assert {p: sha(p) for p in before} == before
    hand_written(store_copy / BACKBONE_ID / "heads" / "fashion.safetensors")
    (store_copy / BACKBONE_ID / "attributions" / "dtd-kernelshap.safetensors").unlink()
    refused(capsys, ["zoo", "--domains", "dtd", "fashion", "--variant", "from-ft", "--workers", "2",
                     *common(store_copy)], "not written by tvdiag", store_copy)
