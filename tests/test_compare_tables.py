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
