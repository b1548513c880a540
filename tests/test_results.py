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
