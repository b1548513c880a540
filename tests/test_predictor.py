"""Source ranking and λ2 choice on synthetic pair tables with a known best source."""

import math

import numpy as np
import pandas as pd
import pytest

from diag.decide.evaluation import evaluate_loto
from diag.curvature.risk import loss_model
from diag.decide.predictor import fit_pair_predictor, fit_predictor, PredictorWarning, rank_sources, tier_features
from diag.decide.rules import grid_floor, lambda2_from_predicted_drop, quadratic_lambda_max
from diag.transfer.budget import recommend_lambda2
from train.errors import DataError, UnknownNameError


def synthetic_pairs(n_dom=8, noise=0.01, seed=0):
    """ermse = 1.5 - 0.8 cos_ft + 0.3 q_source + target offset + small noise; cos_ft symmetric."""
    rng = np.random.default_rng(seed)
    doms = [f"d{i}" for i in range(n_dom)]
    cos = rng.uniform(0.0, 0.6, (n_dom, n_dom))
    cos = (cos + cos.T) / 2
    q = rng.uniform(0, 1, n_dom)            # source quality, e.g. its in-domain E-RMSE
    offset = rng.normal(0, 0.2, n_dom)      # target difficulty (same for all its sources)
    acc_ft = rng.uniform(0.7, 0.95, n_dom)
    ermse_ft = 1.5 + offset
    rows = []
    for s in range(n_dom):
        for t in range(n_dom):
            if s == t:
                continue
            ermse = 1.5 - 0.8 * cos[s, t] + 0.3 * q[s] + offset[t] + rng.normal(0, noise)
            rows.append({"source": doms[s], "target": doms[t], "cos_ft": cos[s, t], "ermse_star_source": q[s],
                         "norm_ft_target": 1 + rng.uniform(), "ermse": ermse, "ermse_ft_target": ermse_ft[t],
                         "accuracy": acc_ft[t] * (1 - 0.05 * q[s]), "accuracy_ft_target": acc_ft[t],
                         "cos_star": cos[s, t] + rng.normal(0, 0.05), "risk_card": np.nan})
    return pd.DataFrame(rows)


def test_tier_features_and_oracle_refusal():
    df = synthetic_pairs()
    df["cos_ft.block.3"] = df["cos_ft"]
    df["risk_diag"] = 1.0
    assert tier_features(df, 0) == ["cos_ft", "norm_ft_target", "ermse_star_source", "cos_ft.block.3"]
    assert tier_features(df, 1)[-1] == "risk_diag"      # risk_card is all NaN: skipped
    assert "cos_star" not in tier_features(df, 2)
    with pytest.raises(UnknownNameError):
        tier_features(df, 3)
    with pytest.raises(DataError, match="target explanation labels"):
        fit_predictor(df, ["cos_ft", "cos_star"])
    with pytest.raises(DataError, match="lacks feature"):
        fit_predictor(df, ["cos_ft", "nope"])
    with pytest.raises(UnknownNameError):
        fit_predictor(df, ["cos_ft"], model="svm")
    oracle = fit_predictor(df, ["cos_star"], allow_oracle=True)
    assert oracle.n_train == len(df)


def test_fit_predictor_recovers_linear_law():
    df = synthetic_pairs(noise=0.001)
    p = fit_predictor(df, ["cos_ft", "ermse_star_source"], target="ermse", model="ridge")
    assert p.train_rmse < 0.25      # the target offsets are not in the features
    pred = p.predict(df)
    within = df.assign(pred=pred).groupby("target")[["pred", "ermse"]].corr(method="spearman").xs("pred", level=1)
    assert within["ermse"].min() > 0.95
    model = fit_pair_predictor(df, ["cos_ft", "ermse_star_source"])
    out = model.predict(df)
    # the accuracy drop is +0.05 q_source exactly (accuracy lost: positive, as every measured drop): recovered
    np.testing.assert_allclose(out["predicted_acc_drop"], 0.05 * df["ermse_star_source"], atol=2e-3)
    assert model.summary()["acc_drop"]["predictable"] and model.summary()["acc_drop"]["loto_r2"] > 0.9
    ranked = rank_sources(df[df.target == "d0"], model)
    assert list(ranked["rank"]) == list(range(1, 8))
    assert ranked["predicted_ermse_norm"].is_monotonic_increasing


def test_loto_picks_known_best_source():
    df = synthetic_pairs(noise=0.01)
    seen = []

    def spy(train):
        seen.append(set(train["source"]) | set(train["target"]))
        return fit_predictor(train, ["cos_ft", "ermse_star_source"], target="ermse")

    preds = {"ridge": "ridge", "gbr": "gbr", "proxy": {"model": "proxy", "features": ["cos_ft"]}, "spy": spy}
    res = {e.name: e for e in evaluate_loto(df, ["cos_ft", "ermse_star_source"], predictors=preds, n_boot=300)}
    assert list(res) == ["ridge", "gbr", "proxy", "spy", "random"]
    ridge = res["ridge"]
    assert ridge.n_targets == 8 and len(ridge.per_target) == 8
    assert ridge.mean_spearman > 0.9 and ridge.ci95[0] > 0.8
    assert ridge.mean_top1_regret < 0.02
    assert ridge.random_top1_regret > 0.1
    # pooled over targets the unpredictable target offsets dilute r; within a target the ranking is near perfect
    assert 0.2 < ridge.pooled_r < 0.9 and ridge.pooled_ci95[0] < ridge.pooled_r < ridge.pooled_ci95[1]
    assert (ridge.per_target["chosen_source"] == ridge.per_target["best_source"]).mean() >= 0.75
    assert res["gbr"].mean_spearman > 0.5
    # the single proxy ignores source quality: positive but weaker ranking, more regret
    assert 0 < res["proxy"].mean_spearman < ridge.mean_spearman
    assert res["proxy"].mean_top1_regret > ridge.mean_top1_regret
    rnd = res["random"]
    assert abs(rnd.mean_spearman) < 0.1 and rnd.mean_top1_regret == pytest.approx(rnd.random_top1_regret)
    # leakage rule: the held-out target never appears in its training pairs, as target or source
    doms = sorted(df["target"].unique())
    assert len(seen) == 8 and all(d not in s for d, s in zip(doms, seen))
    d = ridge.to_dict()
    assert {"name", "mean_spearman", "ci95", "mean_top1_regret", "random_top1_regret"} <= set(d)


def test_loto_constant_predictions_warn_and_few_targets_raise():
    df = synthetic_pairs(n_dom=4)
    df["flat"] = 1.0
    with pytest.warns(PredictorWarning, match="constant predictions"):
        res = evaluate_loto(df, ["cos_ft"], predictors={"flat": {"model": "proxy", "features": ["flat"]}}, n_boot=50)
    assert res[0].n_degenerate == 4 and math.isnan(res[0].mean_spearman)
    with pytest.raises(DataError, match="at least 3 targets"):
        evaluate_loto(synthetic_pairs(n_dom=2), ["cos_ft"], n_boot=10)


def test_recommend_lambda2_on_grid():
    lam = np.round(np.arange(0.4, 1.21, 0.1), 1)
    drop = 1 - np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.90, 0.85])
    grid = pd.DataFrame({"lambda2": lam, "acc_drop": drop})
    assert recommend_lambda2(grid, 0.05) == pytest.approx(0.9)
    assert recommend_lambda2(grid, 0.02) == pytest.approx(0.6)
    # two seeds per λ2 are averaged
    seeds = pd.DataFrame({"lambda2": np.repeat(lam, 2), "acc_drop": np.repeat(drop, 2) + np.tile([0.01, -0.01], 9)})
    assert recommend_lambda2(seeds, 0.05) == pytest.approx(0.9)
    assert recommend_lambda2(grid.assign(acc_drop=0.5), 0.05) == 0.0
    with pytest.raises(DataError):
        recommend_lambda2(grid.drop(columns="lambda2"), 0.05)
    with pytest.raises(DataError):
        recommend_lambda2(grid, -0.1)


def test_lambda2_from_predicted_drop_is_the_quadratic_model():
    # drop(λ) = drop(0.7)·(λ/0.7)²: drop(0.7) = 0.05 and a 5 % budget allow exactly λ2 = 0.7
    assert lambda2_from_predicted_drop(0.05, 0.05) == pytest.approx(0.7)
    # budget 0.05, drop(0.7) = 0.1: λ_max = 0.7·sqrt(0.5) ≈ 0.495 → grid 0.4
    assert lambda2_from_predicted_drop(0.1, 0.05) == pytest.approx(0.4)
    assert lambda2_from_predicted_drop(-0.01, 0.05) == pytest.approx(1.2)  # no predicted drop: the whole grid
    assert lambda2_from_predicted_drop(1.0, 0.05) == 0.0
    assert grid_floor(0.85) == pytest.approx(0.8) and grid_floor(0.39) == 0.0


def test_quadratic_lambda_max():
    assert quadratic_lambda_max(2.0, 0.01) == pytest.approx(0.1)
    lam = quadratic_lambda_max(3.7, 0.2)
    assert loss_model(lam, 3.7) == pytest.approx(0.2)
    assert quadratic_lambda_max(-1.0, 0.1) == math.inf
    with pytest.raises(DataError):
        quadratic_lambda_max(1.0, -0.1)


# ------------------------------------------------------------ intervals over held-out targets and their coverage


def test_jackknife_plus_by_hand():
    from diag.stats import jackknife_plus

    # one residual per unit, level 0.6, n = 4: t = 0.6·5 = 3 → hi = 3rd smallest of μ₋ᵢ + Rᵢ, lo = ⌊0.4·5⌋ = 2nd
    # smallest of μ₋ᵢ − Rᵢ. μ₋ᵢ + R = 1.5, 3, 3.1, 6 → 3.1; μ₋ᵢ − R = 0.5, 1, 2.9, 2 → 1
    centres, res = np.array([[1.0, 2.0, 3.0, 4.0]]), [np.array([0.5]), np.array([1.0]), np.array([0.1]), np.array([2.0])]
    lo, hi = jackknife_plus(centres, res, 0.6)
    assert (lo[0], hi[0]) == (1.0, 3.1)
    # several residuals per unit weigh 1/mᵢ each: units 0 (two residuals), 1, 2; level 0.5, t = 2.
    # μ₋ᵢ + R: 1 (½), 3 (½), 3 (1), 2.5 (1) → running weight ½, 1½ at 2.5, 2 at 3 → hi = 3
    # μ₋ᵢ − R: −1 (½), −3 (½), −1 (1), 1.5 (1) → from the top 1, then 2 at −1 → lo = −1
    lo, hi = jackknife_plus(np.array([[0.0, 1.0, 2.0]]), [np.array([1.0, 3.0]), np.array([2.0]), np.array([0.5])], 0.5)
    assert (lo[0], hi[0]) == (-1.0, 3.0)
    # too few units for the level: (n + 1)·level > n → unbounded
    lo, hi = jackknife_plus(centres, res, 0.9)
    assert lo[0] == -np.inf and hi[0] == np.inf
    with pytest.raises(DataError):
        jackknife_plus(centres, res, 1.0)


def exchangeable_runs(n_dom=9, seeds=3, seed=0):
    """Study rows whose targets are exchangeable: every pair independent given its features (no target effect).

    E-RMSE ÷ θ_ftᵀ = 1 − (0.3 cos_ft − 0.2 q_source + t₅ noise)·λ2/0.7 at λ2 = 0.4, 0.7, 1.0 (the gain is linear
    in the size); accuracy drop 0.1 + 0.1 q_source + normal noise.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for run in range(seeds):
        q = rng.uniform(0, 1, n_dom)
        for s in range(n_dom):
            for t in range(n_dom):
                if s != t:
                    cos, drop = rng.uniform(0, 0.6), 0.1 + 0.1 * q[s] + 0.03 * rng.normal()
                    for lam in (0.4, 0.7, 1.0):
                        ratio = 1.0 - (0.3 * cos - 0.2 * q[s] + 0.05 * rng.standard_t(5)) * lam / 0.7
                        rows.append({"seed": run, "lambda2": lam, "source": f"d{s}", "target": f"d{t}", "cos_ft": cos,
                                     "ermse_star_source": q[s], "ermse_ft_target": 1.0, "ermse": ratio,
                                     "accuracy_ft_target": 0.9, "accuracy": 0.9 * (1 - drop)})
    return pd.DataFrame(rows)


def test_loto_coverage_on_exchangeable_targets():
    """Coverage of the intervals on held-out targets is at the stated level (up to the small-n conservatism).

    With n exchangeable known targets (here 8 once one is held out) the intervals' coverage lies between the level
    and about level·(n + 1)/n in practice; the pairs are independent given the features, so the binomial standard
    error √(p(1 − p)/N) of N scored pairs bounds the draw: 3 of them either side (fixed seed: not flaky).
    """
    from diag.decide.evaluation import loto_coverage

    table = exchangeable_runs()
    found = {}
    for level in (0.5, 0.8):
        cov, scored = loto_coverage(table, tier=0, level=level)
        found[level] = {c.quantity: c for c in cov}
        for c in cov:
            se = math.sqrt(level * (1 - level) / c.n)
            assert level - 3 * se <= c.coverage <= level * 9 / 8 + 3 * se, (level, c.quantity, c.coverage)
            assert c.ci[0] < c.coverage < c.ci[1] and len(c.per_seed) == 3 and c.n_targets == 27
        assert set(scored["quantity"]) == {"ermse_norm", "acc_drop", "gain"}
        assert (found[level]["gain"].n, found[level]["ermse_norm"].n) == (3 * 216, 216)  # gain: every λ2 row
    ratio = found[0.8]["ermse_norm"]
    assert abs(ratio.bias) < 3 * ratio.bias_se  # the predictor is unbiased on held-out targets here
    assert found[0.5]["ermse_norm"].coverage < found[0.8]["ermse_norm"].coverage - 0.2  # the level is what moves it


def test_ranking_prints_and_serialises_the_same_predictions():
    """One set of numbers: the JSON fields are the rows' values, and the table prints exactly those."""
    from diag.decide.predictor import fit_pair_predictor
    from diag.decide.record import training_pairs
    from diag.decide.ranking import SourceRanking
    from diag.decide.recommend import predicted_gain

    df = synthetic_pairs(noise=0.05)
    pred = fit_pair_predictor(training_pairs(df, "d0"), ["cos_ft", "ermse_star_source"])
    rows = rank_sources(df[df["target"] == "d0"], pred)
    gains = [predicted_gain(r["predicted_ermse_norm"], r["predicted_ermse_norm_lo"], r["predicted_ermse_norm_hi"],
                            1.0, True) for _, r in rows.iterrows()]
    rows = rows.assign(predicted_gain=[g[0] for g in gains], predicted_gain_lo=[g[1] for g in gains],
                       predicted_gain_hi=[g[2] for g in gains], method="plain", method_param="0.7",
                       method_scale=0.7, method_acc_drop=0.01, drop_measured=False, safe=True, lambda2=0.7)
    ranking = SourceRanking("d0", 0, 0.05, rows, 42, [], level=0.8, predictions=pred.summary())
    d = ranking.to_dict()
    assert d["level"] == 0.8 and set(d["predictions"]) == {"ermse_norm", "acc_drop"}
    text = ranking.table()
    for s, (_, r) in zip(d["sources"], rows.iterrows()):
        for q in ("ermse_norm", "acc_drop", "gain"):
            assert s[f"predicted_{q}"] == r[f"predicted_{q}"]
            assert s[f"predicted_{q}_interval"] == [r[f"predicted_{q}_lo"], r[f"predicted_{q}_hi"]]
        lo, hi = s["predicted_gain_interval"]
        assert f"{s['predicted_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text
        assert f"{s['predicted_ermse_norm']:.3f} [{s['predicted_ermse_norm_interval'][0]:.3f}," in text
    # the gain interval is the ratio's mapped through g = 1 − ratio
    s = d["sources"][0]
    assert s["predicted_gain_interval"] == pytest.approx([1 - s["predicted_ermse_norm_interval"][1],
                                                          1 - s["predicted_ermse_norm_interval"][0]])
    # one line when no source's gain interval lies above 0, and not otherwise
    beyond = [h for h in d["headline"] if h.startswith("no source is predicted to help beyond noise")]
    assert bool(beyond) == (not (rows["predicted_gain_lo"] > 0).any()) == d["no_source_beyond_noise"]
    noise = SourceRanking("d0", 0, 0.05, rows.assign(predicted_gain_lo=-0.01), 42, [], predictions=pred.summary())
    assert noise.no_source_beyond_noise() and "no source is predicted to help beyond noise" in noise.table()
    helps = SourceRanking("d0", 0, 0.05, rows.assign(predicted_gain_lo=0.01), 42, [], predictions=pred.summary())
    assert helps.no_source_beyond_noise() is False and "beyond noise" not in helps.table()
    # a quantity no better than the training mean: said once at the top, no per-source number
    summary = pred.summary()
    summary["acc_drop"] |= {"predictable": False, "loto_r2": -0.2}
    flat = SourceRanking("d0", 0, 0.05, rows, 42, [], predictions=summary).to_dict()
    assert all(s["predicted_acc_drop"] is None and s["predicted_acc_drop_interval"] is None for s in flat["sources"])
    assert any(h.startswith("accuracy drop (1 − accuracy ÷ θ_ftᵀ's) is not predictable") for h in flat["headline"])
    mean = flat["predictions"]["acc_drop"]  # the training mean and its interval, as values beside the headline
    assert mean["training_mean"] == rows["predicted_acc_drop"].iloc[0] and mean["training_mean_interval"] == [
        rows["predicted_acc_drop_lo"].iloc[0], rows["predicted_acc_drop_hi"].iloc[0]]
    assert f"training mean {mean['training_mean']:.3f}" in " ".join(flat["headline"])
    assert "training_mean" not in flat["predictions"]["ermse_norm"]


def test_features_beyond_the_known_range_are_clipped_not_extrapolated():
    """A target whose feature exceeds every known pair's is predicted at the edge of the known range."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 40)
    df = pd.DataFrame({"source": "s", "target": "t", "cos_ft": x, "ermse": 1.0 - 0.3 * x + 0.01 * rng.normal(size=40),
                       "ermse_ft_target": 1.0})
    pred = fit_predictor(df, ["cos_ft"], target="ermse_norm")
    edge = pred.predict(pd.DataFrame({"cos_ft": [x.max(), 5.0, x.min(), -3.0]}))
    assert edge[0] == edge[1] and edge[2] == edge[3] and edge[1] < edge[2]  # clipped, still in order
    inside = pred.predict(pd.DataFrame({"cos_ft": [0.5]}))[0]
    assert edge[1] < inside < edge[2]


def test_source_record_is_the_source_effect_of_an_additive_fit():
    """The record fits outcome = a_source + b_target on the training pairs and predicts a_source: exact on
    additive data even though each source meets a different set of targets; an unknown source gets the
    mean effect; on such data it ranks every held-out target's sources perfectly."""
    df = synthetic_pairs()
    q = {d: i / 10 for i, d in enumerate(sorted(df["source"].unique()))}
    off = {d: math.sin(i) for i, d in enumerate(sorted(df["target"].unique()))}
    df["ermse"] = [q[s] + off[t] for s, t in zip(df["source"], df["target"])]
    train = df[(df["target"] != "d0") & (df["source"] != "d0")]
    rec = fit_predictor(train, [], target="ermse", model="record")
    test = df[df["target"] == "d0"]
    pred = rec.predict(test)
    shift = pred[0] - q[test["source"].iloc[0]]  # effects are identified up to one constant
    assert np.allclose(pred - shift, [q[s] for s in test["source"]], atol=1e-9) and rec.train_rmse < 1e-9
    unknown_source = test.iloc[:1].assign(source="new")
    assert rec.predict(unknown_source)[0] == pytest.approx(np.mean([rec.estimator[0][s] for s in rec.estimator[0]]))
    res = {e.name: e for e in evaluate_loto(df, ["cos_ft"], predictors={"record": "record"}, n_boot=50)}
    assert res["record"].mean_spearman == pytest.approx(1.0) and res["record"].mean_top1_regret == 0.0
    # a plain mean over each source's pairs is biased by which targets it met: not a perfect ranking here
    naive = {s: g["ermse"].mean() for s, g in train.groupby("source")}
    assert not np.allclose(np.array([naive[s] for s in test["source"]]) - (naive["d1"] - q["d1"]),
                           [q[s] for s in test["source"]], atol=1e-3)


def test_record_note_lists_the_sources_best_first():
    """The ranking's note of the sources' record: effects centred, lowest E-RMSE ratio first; unknown sources named."""
    from diag.decide.record import record_note

    df = synthetic_pairs()
    q = {d: i / 10 for i, d in enumerate(sorted(df["source"].unique()))}
    df["ermse"] = [df["ermse_ft_target"].iloc[k] * (1 + q[s]) for k, s in enumerate(df["source"])]
    note = record_note(df[(df["target"] != "d0") & (df["source"] != "d0")], ["d3", "d1", "d2", "new"])
    listed = note.split("): ")[1]
    assert listed.startswith("d1 ") and listed.index("d2 ") < listed.index("d3 ") and note.endswith("no known pair: new")


def test_the_record_as_the_pair_predictor_ranks_by_each_sources_effect():
    """rank-sources --model record: E-RMSE ÷ θ_ftᵀ's predicted as the source's effect (no feature of the pair), with
    the jackknife+ intervals of the other models; the accuracy drop alike."""
    from diag.decide.record import source_effects
    from diag.stats import with_normalised

    df = synthetic_pairs(noise=0.001)
    train = df[(df["target"] != "d0") & (df["source"] != "d0")]
    pred = fit_pair_predictor(train, [], model="record")
    assert pred.summary()["ermse_norm"]["model"] == "record"
    cands = df[df["target"] == "d0"]
    ranked = rank_sources(cands, pred)
    t = with_normalised(train)
    effects, _ = source_effects(t["source"], t["target"], t["ermse_norm"])
    assert list(ranked["predicted_ermse_norm"]) == pytest.approx([effects[s] for s in ranked["source"]], abs=1e-9)
    assert list(ranked["source"]) == sorted(ranked["source"], key=effects.get)
    assert (ranked["predicted_ermse_norm_lo"] <= ranked["predicted_ermse_norm"]).all()
    assert (ranked["predicted_ermse_norm"] <= ranked["predicted_ermse_norm_hi"]).all()
    # an accuracy drop no source's record predicts (pure pair noise): the training mean stands in, and the note says
    # what failed to predict it
    noisy = train.assign(accuracy=train["accuracy_ft_target"] * (1 - 0.05 * np.random.default_rng(3).random(len(train))))
    for features in (["cos_ft"], []):  # with no feature at all the fallback is the training mean too
        fallback = fit_pair_predictor(noisy, features, model="record")
        assert any("not predictable from the sources' record" in n for n in fallback.notes())
        drop = with_normalised(noisy)["acc_drop"]
        assert list(fallback.predict(cands)["predicted_acc_drop"]) == pytest.approx([drop.mean()] * len(cands))
