"""`diag rank-sources` and `diag screen` through main([...]) on the smoke store (4 domains), and the
decisions' contracts: rank-sources features are the study's, choices never read the test split."""

import json
import tempfile

import numpy as np
import pytest

from diag.cli import main
from tests._smoke import one_thread, smoke_store

# smoke models are near chance; θ_ftᵀ scores 0/24 on the test split of mnist and gtsrb, so the suite
# keeps enough known pairs with a defined accuracy ratio (fashion, dtd) to fit the accuracy model
SUITE = ["--domains", "mnist", "fashion", "dtd", "gtsrb"]
# this module's 4-domain study stays out of the shared smoke store's default study folder
STUDY = tempfile.mkdtemp(prefix="tvdiag-decide-study-")
SMALL = ["--n-images", "32", "--probes", "4", "--k", "2", "--quiet", "--preset", "smoke", "--study", STUDY,
         "--extend", "--n-boot", "50"]
DOMAINS = SUITE[1:]


def _settings():
    from diag.features.pair_features import CurvatureSettings

    return CurvatureSettings(n_images=32, probes=4, k=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def root():
    return str(smoke_store().root)


@pytest.fixture(scope="module")
def table(root):
    """The 4-domain study with curvature, as `rank-sources --study STUDY --extend` computes it."""
    from diag.constants import PAPER_LAMBDA2
    from diag.table import at_lambda
    from diag.study.run import run_study, StudySettings
    from tests._smoke import smoke_store as st
    from train.zoo import Zoo, preset

    store = st()
    Zoo(store, preset("smoke"), progress=False).build(DOMAINS)
    df = run_study(store, DOMAINS, StudySettings(curvature_settings=_settings()), out_dir=STUDY, progress=False)
    return store, at_lambda(df, PAPER_LAMBDA2)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rank_sources_tiers(root, capsys):
    from diag.constants import LAMBDA_GRID

    code, out, err = run(capsys, "rank-sources", "--target", "gtsrb", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    res = json.loads(out)
    assert res["target"] == "gtsrb" and res["tier"] == 2
    assert res["n_training_pairs"] == 6  # pairs among the other 3 domains only: no leakage of the target
    sources = res["sources"]
    assert sorted(s["source"] for s in sources) == ["dtd", "fashion", "mnist"]
    assert [s["rank"] for s in sources] == [1, 2, 3]
    record = [n for n in res["notes"] if n.startswith("source record on the other targets")]
    assert len(record) == 1 and all(s in record[0] for s in ("dtd", "fashion", "mnist"))
    for s in sources:
        for key in ("source", "rank", "cos_ft", "risk_diag", "risk_card", "risk_exact", "predicted_ermse_norm",
                    "predicted_ermse_norm_interval", "predicted_acc_drop", "predicted_acc_drop_interval",
                    "predicted_gain", "predicted_gain_interval", "measured_acc_drop", "lambda2"):
            assert key in s
        assert "predicted_ermse" not in s and "predicted_gain_sd" not in s  # one prediction per quantity
        assert s["risk_exact"] is not None and s["risk_card"] is not None
        assert s["lambda2"] == 0.0 or 0.4 <= s["lambda2"] <= 1.2
        assert s["method"] in ("plain", "project", "precondition", "blocks") and s["drop_measured"]
        lo, hi = s["predicted_gain_interval"]
        assert (s["predicted_gain"] == 0.0) if not s["safe"] else (lo is None or hi is None or lo <= hi)
    assert res["level"] == 0.8 and set(res["predictions"]) == {"ermse_norm", "acc_drop"}
    assert isinstance(res["no_source_beyond_noise"], bool) and isinstance(res["headline"], list)
    assert [s["safe"] for s in sources] == sorted((s["safe"] for s in sources), reverse=True)
    # the universal and the ranker-weighted mix beside the sources, each with its λ2 measured on val
    mixes = {m["method"]: m for m in res["mixes"]}
    assert set(mixes) == {"mix", "mix-ranked"} and all(m["drop_measured"] for m in mixes.values())
    assert "gtsrb" not in mixes["mix"]["weights"] and mixes["mix"]["weights"].count(":0.333") == 3
    for m in mixes.values():
        assert any(abs(m["method_scale"] - g) < 1e-9 for g in LAMBDA_GRID) or not m["safe"]
        assert (m["predicted_gain"] == 0.0) if not m["safe"] else len(m["predicted_gain_interval"]) == 2
    # the intervals are out of sample: 6 known pairs among 3 domains hold no target out, so each pair is
    assert any("jackknife+ over leave-one-pair-out fits" in n and "optimistic" in n for n in res["notes"])
    assert all(p["unit"] == "pair" for p in res["predictions"].values())
    # a second identical call reads the ranking cached in the store (keyed by content): the same answer
    cached = list((smoke_store().study_dir("rankings")).glob("gtsrb-tier2-*.json"))
    assert len(cached) == 1
    code, again, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0 and again == out
    # tier 0: weights only, no curvature values reported
    code, out, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--tier", "0", "--json", "--store", root,
                       *SUITE, *SMALL)
    res0 = json.loads(out)
    assert res0["tier"] == 0 and all(s["risk_card"] is None and s["risk_exact"] is None for s in res0["sources"])
    # the human table names the tier
    code, out, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--tier", "1", "--store", root, *SUITE, *SMALL)
    assert code == 0 and "tier 1" in out and "multi-source candidates" in out and "universal mix" in out
    # --model record: E-RMSE ÷ θ_ftᵀ's predicted from each source's record (or the mean, where that does not predict)
    code, out, err = run(capsys, "rank-sources", "--target", "gtsrb", "--tier", "0", "--model", "record", "--json",
                         "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["predictions"]["ermse_norm"]["requested"] == "record"
    assert rec["predictions"]["ermse_norm"]["model"] in ("record", "mean")


def test_rank_sources_evaluate(root, capsys):
    code, out, err = run(capsys, "rank-sources", "--evaluate", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    res = json.loads(out)
    names = [p["name"] for p in res["predictors"]]
    assert any("random" in n for n in names) and len(names) >= 3
    for p in res["predictors"]:
        assert {"name", "mean_spearman", "ci95", "mean_top1_regret", "random_top1_regret"} <= set(p)


def test_screen_exit_code_matches_verdict(root, capsys):
    code, out, err = run(capsys, "screen", "--source", "mnist", "--target", "gtsrb", "--json", "--store", root,
                         *SUITE, *[a for a in SMALL if a != "--n-boot" and a != "50"])
    res = json.loads(out)
    # the screen reports the very numbers rank-sources reports for the same pair (one predictor, one interval each)
    _, ranked, _ = run(capsys, "rank-sources", "--target", "gtsrb", "--json", "--store", root, *SUITE, *SMALL)
    mnist = next(s for s in json.loads(ranked)["sources"] if s["source"] == "mnist")
    shown = {k: v for k, v in mnist.items() if k.startswith("predicted_")}
    # the same predictor and interval; screen predicts one row, rank-sources several, so BLAS may differ in the last bit
    assert len(shown) == 6 and res["level"] == 0.8
    for k, v in shown.items():
        assert res[k] == (pytest.approx(v, rel=1e-12) if v is not None else None), k
    assert res["verdict"] in ("go", "caution", "no-go")
    assert code == (1 if res["verdict"] == "no-go" else 0)
    assert res["reasons"] and res["recommended_lambda2"] >= 0
    assert res["n_val"] > 0 and res["method_acc_drop_se"] >= 0  # the measured drop carries its paired se
    assert res["method_acc_drop_upper95"] >= res["method_acc_drop"]
    assert any("paired se" in r for r in res["reasons"]) and res["grad_dot_tau"] is not None
    assert res["method"] in ("plain", "project", "precondition", "blocks") and res["plain_verdict"] in (
        "go", "caution", "no-go")


def test_rank_sources_coverage_and_level(root, table, capsys):
    """`rank-sources --coverage` over the module's study; `--level` outside (0, 1) is refused with exit 2."""
    code, out, err = run(capsys, "rank-sources", "--coverage", "--json", "--store", root, *SUITE, *SMALL)
    assert code == 0, err
    res = json.loads(out)
    assert res["level"] == 0.8 and res["n_seeds"] == 1
    cov = {c["quantity"]: c for c in res["quantities"]}
    assert set(cov) == {"ermse_norm", "acc_drop", "gain"}
    for c in cov.values():
        assert {"n", "covered", "coverage", "ci", "bias", "bias_se", "per_seed"} <= set(c)
        assert c["n"] == 0 or c["ci"][0] <= c["coverage"] <= c["ci"][1]
    assert cov["ermse_norm"]["n"] == 12  # every (target, source) pair of the 4 domains, each held out with its target
    code, _, err = run(capsys, "rank-sources", "--coverage", "--level", "1.5", "--store", root, *SUITE, *SMALL)
    assert code == 2 and "level" in err


def test_screen_bad_budget(root, capsys):
    code, _, err = run(capsys, "screen", "--source", "mnist", "--target", "gtsrb", "--max-acc-drop", "1.5",
                       "--store", root, *SUITE, *[a for a in SMALL if a not in ("--n-boot", "50")])
    assert code == 2 and "max-acc-drop" in err


def test_rank_sources_features_equal_study_features(table):
    """One feature function: a candidate's features are the study's features of the same pair, exactly."""
    from diag.runtime.context import Workspace
    from diag.features.pair_features import Diagnostics
    from diag.decide.ranking import candidate_rows

    store, df = table
    target, sources = "gtsrb", ["mnist", "fashion", "dtd"]
    cands = candidate_rows(Diagnostics(Workspace(store), settings=_settings()), df, target, sources, tier=2)
    feats = [c for c in cands.columns if c.startswith(("cos_", "norm_", "risk_"))]
    assert {"cos_ft", "cos_ft.block.0", "norm_star_source", "risk_exact", "risk_card", "risk_diag"} <= set(feats)
    assert "cos_star" not in feats  # needs the target's explanation labels: never a ranking input
    assert (df["card_form"] == _settings().card_form).all()  # the form risk_card came from, for its calibration
    for _, c in cands.iterrows():
        row = df[(df["source"] == c["source"]) & (df["target"] == target)].iloc[0]
        for f in feats:
            assert repr(float(row[f])) == repr(float(c[f])), (c["source"], f)


def test_choices_read_val_never_test(table, monkeypatch):
    """Poisoning the target's test split (images, labels and φ) changes no recommendation."""
    import torch

    import train.datasets as datasets
    from diag.features import pair_features
    from diag.runtime import context
    from diag.runtime.context import Workspace
    from diag.features.pair_features import Diagnostics
    from diag.decide.ranking import rank_for_target
    from train.store import Store

    store, df = table
    sources = ["mnist", "fashion", "dtd"]

    def ranking():
        diag = Diagnostics(Workspace(store), settings=_settings())
        r = rank_for_target(diag, df, "gtsrb", sources, tier=2, methods=("plain", "precondition", "project"))
        return r.rows[["source", "rank", "lambda2", "measured_acc_drop", "predicted_ermse_norm", "method", "method_param",
                       "method_scale", "method_acc_drop", "safe", "predicted_gain"]].to_numpy().tolist()

    clean = ranking()
    real_inputs, real_attr = datasets.model_inputs, Store.load_attributions
    splits = []

    def poisoned_inputs(config, name, split, limit=None, data=None):
        splits.append(split)
        x, y = real_inputs(config, name, split, limit, data)
        if split == "test":
            g = torch.Generator().manual_seed(1)
            return torch.randn(x.shape, generator=g), y[torch.randperm(len(y), generator=g)]
        return x, y

    def poisoned_attr(self, domain, method="kernelshap"):
        out = dict(real_attr(self, domain, method))
        out["test"] = torch.randn(out["test"].shape)
        out["test_labels"] = out["test_labels"].flip(0)
        return out

    for module in (datasets, context, pair_features):  # every module that reads images through it
        monkeypatch.setattr(module, "model_inputs", poisoned_inputs)
    monkeypatch.setattr(Store, "load_attributions", poisoned_attr)
    poisoned = ranking()
    assert "val" in splits and "test" not in splits
    assert poisoned == clean
    assert all(np.isfinite(r[3]) for r in clean)  # the measured drop at λ2 = 0.7 comes from val images
    assert {r[5] for r in clean} <= {"plain", "precondition", "project"}
    safe = [r[9] for r in clean]
    assert safe == sorted(safe, reverse=True)  # no safe transfer is never ranked above a safe one


def test_rank_sources_evaluate_all_seeds(root, capsys, tmp_path, monkeypatch):
    """--evaluate --all-seeds: one evaluation per training seed of the study, then each ranker's mean ± sd (by hand
    here) and the seeds whose CI lies above 0; the text says both. A given --study is read once."""
    import pandas as pd

    import diag.commands.decide as decide
    from diag.table import load_study, write_table

    code, _, err = run(capsys, "rank-sources", "--evaluate", "--json", "--store", root, *SUITE, *SMALL)  # the study
    assert code == 0, err
    one = load_study(STUDY)
    other = one.assign(seed=1, pair_key=one["pair_key"].astype(str) + "-s1",
                       ermse=one["ermse"] * (1 + 0.1 * np.arange(len(one)) / len(one)))
    write_table(pd.concat([one, other], ignore_index=True), tmp_path / "pairs.csv")
    args = ["rank-sources", "--evaluate", "--all-seeds", "--study", str(tmp_path), "--store", root, *SUITE,
            "--quiet", "--preset", "smoke", "--n-boot", "50"]
    reads = []
    monkeypatch.setattr(decide, "load_study", lambda path, **kw: reads.append(path) or load_study(path, **kw))
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    assert [str(r) for r in reads] == [str(tmp_path)]  # the table and every seed's pairs from one read
    monkeypatch.undo()
    res = json.loads(out)
    assert res["seeds"] == [0, 1]
    assert "source record (every seed)" in {m["name"] for m in res["summary"]}
    for m in res["summary"]:
        per = [p["mean_spearman"] for p in res["predictors"] if p["name"] == m["name"]]
        assert len(per) == m["n_seeds"] == 2
        assert m["mean_spearman"] == pytest.approx(np.mean(per)) and m["sd_spearman"] == pytest.approx(np.std(per, ddof=1))
    code, out, _ = run(capsys, *args)
    assert code == 0 and "Over training seeds 0, 1" in out and "training seed 1, over" in out
    # rank-sources --model record on that study: the record is fitted on the known pairs at both seeds
    rank = ["rank-sources", "--target", "gtsrb", "--tier", "0", "--study", str(tmp_path), "--store", root, *SUITE,
            "--quiet", "--preset", "smoke", "--json"]
    reads.clear()
    monkeypatch.setattr(decide, "load_study", lambda path, **kw: reads.append(path) or load_study(path, **kw))
    code, out, err = run(capsys, *rank)  # the default predictor: the record
    assert code == 0, err
    assert [str(r) for r in reads] == [str(tmp_path)]  # its run and the record's every-seed pairs from one read
    monkeypatch.undo()
    pooled = json.loads(out)
    code, out, err = run(capsys, *rank, "--model", "ridge")
    assert code == 0, err
    single = json.loads(out)
    assert pooled["n_training_pairs"] == 2 * single["n_training_pairs"]
    assert any("training seeds 0, 1" in n for n in pooled["notes"])
    assert not any("training seeds" in n for n in single["notes"])
