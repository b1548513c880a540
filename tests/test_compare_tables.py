"""scripts/compare_tables.py: a rebuilt table against a committed one, by pair_key or by what the row is about."""

from pathlib import Path

from tests._scripts import load_script

from diag.table import read_table, write_table

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("compare_tables")


def test_rows_matched_by_pair_with_card_columns_left_out(tmp_path):
    """Another settings key (new pair_key) and another card's risk_card still reproduce by pair when risk_card is
    left out; a changed score never does."""
    script = _script()
    committed = ROOT / "results" / "paper-s0" / "pairs.csv"
    table = read_table(committed)
    rekeyed = table.assign(pair_key=table["pair_key"].astype(str) + "x", risk_card=table["risk_card"] * 3.0)
    write_table(rekeyed, tmp_path / "rekeyed" / "pairs.csv")
    rebuilt = str(tmp_path / "rekeyed" / "pairs.csv")
    assert script.main([str(committed), str(committed)]) == 0
    assert script.main([str(committed), rebuilt]) == 1  # by pair_key: no row found
    assert script.main([str(committed), rebuilt, "--by-pair"]) == 1  # risk_card differs
    assert script.main([str(committed), rebuilt, "--by-pair", "--ignore", "risk_card"]) == 0
    scored = rekeyed.assign(ermse=rekeyed["ermse"] * (1 + 1e-3))
    write_table(scored, tmp_path / "scored" / "pairs.csv")
    assert script.main([str(committed), str(tmp_path / "scored" / "pairs.csv"), "--by-pair", "--ignore",
                        "risk_card"]) == 1


def test_rows_of_rebuilt_compares_seed_0_at_07_of_a_grid_table(tmp_path):
    """A rebuild of seed 0 at λ2 = 0.7 is compared with those rows of a multi-seed λ2-grid table, and only those."""
    script = _script()
    committed = ROOT / "results" / "paper-grid" / "pairs.csv"
    table = read_table(committed)
    part = table[(table["seed"] == 0) & ((table["lambda2"] - 0.7).abs() < 1e-9)]
    assert 0 < len(part) < len(table)
    write_table(part, tmp_path / "part" / "pairs.csv")
    rebuilt = str(tmp_path / "part" / "pairs.csv")
    assert script.main([str(committed), rebuilt]) == 1  # the other seeds and λ2s were not rebuilt
    assert script.main([str(committed), rebuilt, "--rows-of-rebuilt"]) == 0
    changed = part.assign(accuracy=part["accuracy"] + 0.01)
    write_table(changed, tmp_path / "changed" / "pairs.csv")
    assert script.main([str(committed), str(tmp_path / "changed" / "pairs.csv"), "--rows-of-rebuilt"]) == 1
    write_table(part.assign(pair_key="none"), tmp_path / "foreign" / "pairs.csv")
    assert script.main([str(committed), str(tmp_path / "foreign" / "pairs.csv"), "--rows-of-rebuilt"]) == 1
