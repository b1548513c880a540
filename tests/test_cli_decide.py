"""`diag rank-sources` and `diag screen` through main([...]) on the smoke store (4 domains)."""

import json
import tempfile

import pytest

from diag.cli import main
from tests._smoke import smoke_store

SUITE = ["--domains", "mnist", "animals", "gtsrb", "fashion"]
# this module's 4-domain study stays out of the shared smoke store's default study folder
STUDY = tempfile.mkdtemp(prefix="tvdiag-decide-study-")
SMALL = ["--n-images", "32", "--probes", "4", "--k", "2", "--quiet", "--preset", "smoke", "--study", STUDY,
         "--n-boot", "50"]


@pytest.fixture(scope="module")
def root():
    return str(smoke_store().root)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rank_sources_tiers(root, capsys):
    code, out, err = run(capsys, "rank-sources", "--target", "gtsrb", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    res = json.loads(out)
    assert res["target"] == "gtsrb" and res["tier"] == 2
    assert res["n_training_pairs"] == 6  # pairs among the other 3 domains only: no leakage of the target
    sources = res["sources"]
    assert sorted(s["source"] for s in sources) == ["animals", "fashion", "mnist"]
    assert [s["rank"] for s in sources] == [1, 2, 3]
    for s in sources:
        for key in ("source", "rank", "cos_ft", "risk_diag", "risk_card", "risk_exact", "predicted_ermse",
                    "predicted_acc_drop", "lambda2"):
            assert key in s
        assert s["risk_exact"] is not None and s["risk_card"] is not None
        assert s["lambda2"] == 0.0 or 0.4 <= s["lambda2"] <= 1.2
    # tier 0: weights only, no curvature values reported
    code, out, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--tier", "0", "--json", "--store", root,
                       *SUITE, *SMALL)
    res0 = json.loads(out)
    assert res0["tier"] == 0 and all(s["risk_card"] is None and s["risk_exact"] is None for s in res0["sources"])
    # the human table names the tier
    code, out, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--tier", "1", "--store", root, *SUITE, *SMALL)
    assert code == 0 and "tier 1" in out


def test_rank_sources_evaluate(root, capsys):
    code, out, err = run(capsys, "rank-sources", "--evaluate", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    res = json.loads(out)
    names = [p["name"] for p in res["predictors"]]
    assert any("random" in n for n in names) and len(names) >= 3
    for p in res["predictors"]:
        assert {"name", "mean_spearman", "ci95", "mean_top1_regret", "random_top1_regret"} <= set(p)


def test_screen_exit_code_matches_verdict(root, capsys):
    code, out, err = run(capsys, "screen", "--source", "mnist", "--target", "fashion", "--json", "--store", root,
                         *SUITE, *[a for a in SMALL if a != "--n-boot" and a != "50"])
    res = json.loads(out)
    assert res["verdict"] in ("go", "caution", "no-go")
    assert code == (1 if res["verdict"] == "no-go" else 0)
    assert res["reasons"] and res["recommended_lambda2"] >= 0


def test_screen_bad_budget(root, capsys):
    code, _, err = run(capsys, "screen", "--source", "mnist", "--target", "fashion", "--max-acc-drop", "1.5",
                       "--store", root, *SUITE, *[a for a in SMALL if a not in ("--n-boot", "50")])
    assert code == 2 and "max-acc-drop" in err
