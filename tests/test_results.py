"""The README's committed results are the committed tables' numbers (scripts/results_report.py)."""

from __future__ import annotations

from pathlib import Path

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("results_report")


def test_readme_results_block_is_regenerated_from_results():
    report = _script()
    assert list((ROOT / "results").glob("*/pairs.csv")), "no study table committed under results/"
    assert report.current() == report.render(), "README's results block differs: python scripts/results_report.py --write"


def test_a_changed_table_changes_the_block(tmp_path):
    """The check can fail: a committed table edited by hand is refused (its check file disagrees)."""
    import shutil

    import pytest
    from train.errors import ArtifactError

    report = _script()
    folder = next((ROOT / "results").glob("*/pairs.csv")).parent
    copy = tmp_path / "results" / folder.name
    shutil.copytree(folder, copy)
    table = copy / "pairs.csv"
    table.write_bytes(table.read_bytes().replace(b",", b";", 1))
    with pytest.raises(ArtifactError):
        report.render(tmp_path / "results")


def test_full_seeds_gathers_one_study_per_full_seed(tmp_path):
    """scripts/full_seeds.py keeps the plain λ2 = 0.7 rows of training seed 0 with a full_seed column, and refuses
    two full seeds that share one θ_base (the same store given twice)."""
    import pytest
    from train.errors import DataError

    full = load_script("full_seeds")
    study = ROOT / "results" / "paper-grid-grouped"
    table, provenance = full.gather({0: study})
    assert len(table) == 42 and set(table["full_seed"]) == {0} and set(table["seed"]) == {0}
    assert (table["lambda2"].round(6) == 0.7).all() and list(provenance) == ["full seed 0 (alpha=0.8 seed=0 variant=paper)"]
    with pytest.raises(DataError, match="share one θ_base"):
        full.gather({0: study, 1: study})
