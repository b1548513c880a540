"""The ranker-weighted mix: weights from the ranker's predicted gain, never the target's pairs."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from diag.decide.recommend import ranker_gains
from diag.transfer.mixing import mix_weights

DOMAINS = ["a", "b", "c", "d", "e", "f"]
OUTCOMES = ("ermse", "ermse_ft_target", "ermse_norm", "accuracy", "accuracy_ft_target", "ermse_img")


def _table(noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Every ordered pair of 6 domains with tier-0 features; E-RMSE ÷ θ_ftᵀ = 1.1 − 0.5·cos_ft (+ noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in DOMAINS:
        for t in DOMAINS:
            if s != t:
                cos = rng.uniform(-0.2, 0.8)
                rows.append({"source": s, "target": t, "cos_ft": cos, "norm_star_source": 1.0 + DOMAINS.index(s),
                             "ermse_ft_target": 1.0, "ermse": 1.1 - 0.5 * cos + noise * rng.normal(),
                             "accuracy": 0.9, "accuracy_ft_target": 0.95, "ermse_img": 1.0})
    df = pd.DataFrame(rows)
    return df.assign(ermse_norm=df["ermse"] / df["ermse_ft_target"])


def test_mix_weights_are_normalised_nonnegative_and_never_the_target():
    w = mix_weights({"a": 0.3, "b": 0.1, "c": -0.2, "t": 5.0, "d": math.nan}, target="t")
    assert set(w) == {"a", "b", "c", "d"}  # the target gets no weight, not even a zero
    assert w == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0, "d": 0.0})
    assert sum(w.values()) == pytest.approx(1.0)
    assert mix_weights({"a": -0.1, "b": 0.0}, target="t") == {}  # no positive gain: nothing to mix


def test_ranker_gains_follow_the_prediction_and_ignore_the_target():
    df = _table()
    gains, how = ranker_gains(df, "a", model="ridge")
    assert how == "ridge (tier 0)" and set(gains) == {"b", "c", "d", "e", "f"}
    cands = df[df["target"] == "a"].set_index("source")
    # noise-free linear truth: the gain is 0.5·cos_ft − 0.1 up to ridge shrinkage, with cos_ft clipped to the range
    # of the known pairs (those without 'a'): the predictor does not extrapolate
    known = df[(df["target"] != "a") & (df["source"] != "a")]["cos_ft"]
    for s, g in gains.items():
        assert g == pytest.approx(0.5 * min(max(cands.at[s, "cos_ft"], known.min()), known.max()) - 0.1, abs=0.02)
    w = mix_weights(gains, "a")
    order = sorted(gains, key=gains.get)
    assert [w[s] for s in order] == sorted(w.values())  # a higher predicted gain gets more weight
    assert all(w[s] == 0 for s in gains if gains[s] <= 0)


def test_ranker_gains_default_to_the_sources_record_like_rank_sources():
    """The study's ranked mix weights with the predictor rank-sources ranks with (RANKER, the sources' record):
    gₛ = 1 − aₛ, aₛ the source's term of the additive fit (targets' terms centred) on the pairs without the target."""
    from diag.decide.predictor import RANKER
    from diag.decide.record import known_effects

    df = _table(noise=0.02)
    quality = {s: 0.3 * i for i, s in enumerate(DOMAINS)}  # a source effect the record can find
    df = df.assign(ermse_norm=df["ermse_norm"] + df["source"].map(quality))
    gains, how = ranker_gains(df, "a")
    assert RANKER == "record" and how == "record" and set(gains) == {"b", "c", "d", "e", "f"}
    effects, _, _ = known_effects(df[(df["target"] != "a") & (df["source"] != "a")], "ermse_norm")
    assert gains == pytest.approx({s: 1.0 - effects[s] for s in gains}, abs=1e-12)
    assert max(gains, key=gains.get) == "b" and min(gains, key=gains.get) == "f"  # the record's order
    # a record with no skill out of sample (pure noise): the training mean for every source, said in 'how'
    rng = np.random.default_rng(5)
    flat = df.assign(ermse_norm=1.0 + 0.05 * rng.normal(size=len(df)))
    gains, how = ranker_gains(flat, "a")
    assert how == "record → training mean (no out-of-sample skill)" and np.ptp(list(gains.values())) == 0


@pytest.mark.parametrize("model", ["record", "ridge"])
def test_poisoning_the_target_outcomes_does_not_change_the_weights(model):
    """The target's measured outcomes (its test split) and every pair with it as source are never read."""
    df = _table(noise=0.05)
    before = ranker_gains(df, "c", model=model)[0]
    poisoned = df.copy()
    hit = (poisoned["target"] == "c") | (poisoned["source"] == "c")
    rng = np.random.default_rng(1)
    for col in OUTCOMES:
        poisoned.loc[hit, col] = rng.uniform(-5, 5, hit.sum())
    assert ranker_gains(poisoned, "c", model=model)[0] == before
    # control: the same poison on a pair the ranker does learn from changes the weights (the test can fail)
    other = df.copy()
    other.loc[(other["target"] == "d") & (other["source"] == "e"), ["ermse", "ermse_norm"]] = 40.0
    assert ranker_gains(other, "c", model=model)[0] != before


def test_too_few_pairs_fall_back_to_the_cos_proxy():
    df = _table()
    few = df[df["source"].isin(["a", "b", "c"]) & df["target"].isin(["a", "b", "c"])]
    gains, how = ranker_gains(few, "a")
    assert how == "cos_ft proxy"
    assert gains == dict(zip(few[few["target"] == "a"]["source"], few[few["target"] == "a"]["cos_ft"]))


def test_intervals_are_out_of_sample_and_fall_back_honestly():
    """fit_quantity: targets held out when they can be, pairs otherwise; the training mean where features do not help."""
    from diag.decide.predictor import fit_quantity

    exact = fit_quantity(_table(), ["cos_ft"], "ermse_norm")
    assert exact.unit == "target" and len(exact.folds) == 6 and exact.loto_r2 > 0.99 and exact.predictable
    noisy = _table(noise=0.1)
    feats = ["cos_ft", "norm_star_source"]
    m = fit_quantity(noisy, feats, "ermse_norm")
    held = np.concatenate(m.residuals)
    assert len(held) == 30 and np.sqrt(np.mean(held ** 2)) > m.full.train_rmse  # out of sample: larger than in sample
    # 3 domains: no target can be held out (2 pairs would remain): each of the 6 pairs is, in turn
    three = noisy[noisy["source"].isin(["a", "b", "c"]) & noisy["target"].isin(["a", "b", "c"])]
    assert fit_quantity(three, feats, "ermse_norm").unit == "pair"
    assert fit_quantity(three.iloc[:3], feats, "ermse_norm").unit == "none"
    # an outcome the features do not carry: LOTO R² ≤ 0, the training mean (and its interval) stands in
    rng = np.random.default_rng(3)
    pure = noisy.assign(ermse=1.0 + 0.1 * rng.normal(size=len(noisy))).drop(columns="ermse_norm")
    mean = fit_quantity(pure, feats, "ermse_norm", model="gbr")  # boosted trees fit the noise: worse than the mean
    assert mean.loto_r2 <= 0 and not mean.predictable and mean.full.model == "mean"
    point, lo, hi = mean.predict(noisy[noisy["target"] == "a"], 0.8)
    assert np.ptp(point) == np.ptp(lo) == np.ptp(hi) == 0  # one number for every source
    assert point[0] == pytest.approx(pure["ermse"].mean()) and lo[0] < point[0] < hi[0]


def test_bad_tier_and_method_are_named_with_the_choices():
    """tier_methods and a cached ranking with an unknown tier raise tvdiag errors, not a KeyError."""
    from pathlib import Path

    from diag.decide.ranking import SourceRanking
    from diag.decide.recommend import tier_methods
    from train.errors import ArtifactError, UnknownNameError

    assert tier_methods(1, ["project", "mix"]) == ("plain", "project")
    with pytest.raises(UnknownNameError, match="Unknown tier '3'. Available: 0, 1, 2"):
        tier_methods(3)
    with pytest.raises(UnknownNameError, match="Unknown recommendation method 'blox'. Available: .*mix"):
        tier_methods(2, ["blox"])
    ranking = SourceRanking("t", 0, 0.05, pd.DataFrame({"source": ["a"], "rank": [1]}), 4)
    assert SourceRanking.from_json(ranking.to_json(), Path("r.json")).rows.equals(ranking.rows)
    damaged = json.loads(ranking.to_json()) | {"tier": 7}
    with pytest.raises(ArtifactError, match="tier 7 is none of"):
        SourceRanking.from_json(json.dumps(damaged), Path("r.json"))


# ------------------------------------------------------------------------------ smoke store


def _cli(capsys, *argv):
    from _smoke import one_thread
    from diag.cli import main

    with one_thread():
        code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_transfer_mix_ranked_weights_the_sources_by_the_study_ranker(capsys):
    """`diag transfer --method mix-ranked` on the smoke study (3 domains: the cos_ft proxy ranks)."""
    from _smoke import DOMAINS as SMOKE, smoke_study
    from diag.table import load_study
    from diag.decide.recommend import study_gains

    store, out, _ = smoke_study()
    common = ["transfer", "--preset", "smoke", "--store", str(store.root), "--source", "mnist", "--target", "animals",
              "--domains", *SMOKE, "--json", "--quiet"]
    code, text, err = _cli(capsys, *common, "--method", "mix-ranked")
    assert code == 0, err
    res = json.loads(text)
    assert res["method"] == "mix-ranked" and res["repair"]["param"] == "ranked"
    gains, how = study_gains(out, "animals")
    plain = load_study(out, lambda2=0.7)
    assert how == "cos_ft proxy" and set(gains) == {"mnist", "gtsrb"}
    assert gains["gtsrb"] == float(plain[(plain["source"] == "gtsrb") & (plain["target"] == "animals")]["cos_ft"].iloc[0])
    w = mix_weights(gains, "animals")
    assert res["repair"]["vector"] == ("mix of " + ", ".join(f"{d}:{w[d]:.3g}" for d in sorted(w) if w[d] > 0)
                                       if w else "no positive predicted gain")
    code, _, err = _cli(capsys, *common, "--method", "mix-ranked", "--study", str(out.parent / "none"))
    assert code == 2 and "mix-ranked needs a study of known pairs" in err


def test_study_mix_ranked_is_a_second_pass_over_the_plain_rows(tmp_path):
    """Resuming the two-domain method study with mix-ranked: plain and mix rows kept, one ranked row per pair.

    With one other domain the ranked mix is that source's τ* alone (weight 1) when its cos_ft is
    positive, and the zero vector (θ_ftᵀ, 'transfer nothing') otherwise.
    """
    from _smoke import METHOD_DOMAINS, one_thread, smoke_method_study
    from diag.study.run import run_study, StudySettings

    store, shared, df = smoke_method_study()
    out = tmp_path / "methods"  # a copy: the shared study keeps its two methods for the other tests
    shutil.copytree(shared, out)
    before = json.loads((out / "pairs.csv.timings.json").read_text())  # wall-clock seconds per row
    with one_thread():
        again = run_study(store, METHOD_DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False,
                                                        methods=("plain", "mix", "mix-ranked")),
                          out_dir=out, progress=False)
    after = json.loads((out / "pairs.csv.timings.json").read_text())
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 2  # only the 2 new rows timed
    ranked = again[again["method"] == "mix-ranked"].set_index(["source", "target"]).sort_index()
    plain = again[again["method"] == "plain"].set_index(["source", "target"]).sort_index()
    assert len(ranked) == len(plain) == 2 and ranked["repair_choice"].eq("ranked").all()
    for (s, t), r in ranked.iterrows():
        if plain.at[(s, t), "cos_ft"] > 0:  # τ*ˢ itself at the λ2 chosen on val
            assert r["repair_size"] == pytest.approx(r["repair_scale"] * plain.at[(s, t), "norm_star_source"], rel=1e-6)
        else:
            assert r["repair_size"] == 0 and r["ermse"] == pytest.approx(r["ermse_ft_target"])


def test_study_mix_ranked_in_local_workers(tmp_path, capsys):
    """`study --methods plain mix-ranked --workers 2`: the workers score the plain rows (a shard each), the
    parent then the ranked mix, whose ranker needs every pair's plain row (no shard has them all)."""
    from _smoke import METHOD_DOMAINS, smoke_method_study

    store, _, _ = smoke_method_study()
    out = tmp_path / "study"
    code, _, err = _cli(capsys, "study", "--preset", "smoke", "--store", str(store.root), "--domains",
                        *METHOD_DOMAINS, "--no-curvature", "--methods", "plain", "mix-ranked", "--workers", "2",
                        "--out", str(out), "--quiet", "--json")
    assert code == 0, err
    assert sorted(p.name for p in out.glob("pairs-shard*of2.csv")) == ["pairs-shard0of2.csv", "pairs-shard1of2.csv"]
    table = pd.read_csv(out / "pairs.csv")
    assert table.groupby("method").size().to_dict() == {"mix-ranked": 2, "plain": 2}


def test_study_mix_ranked_matched_is_the_ranked_mix_at_the_source_step(tmp_path):
    """`mix-ranked-matched` is scored in the ranker's second pass beside `mix-ranked`. With one other domain the
    ranked mix is that source's τ* (cos_ft > 0), which at plain eq. 8's step is plain eq. 8 itself; the zero
    mix ('transfer nothing') stays θ_ftᵀ at any step."""
    from _smoke import METHOD_DOMAINS, one_thread, smoke_method_study
    from diag.study.run import run_study, StudySettings

    store, shared, _ = smoke_method_study()
    out = tmp_path / "methods"
    shutil.copytree(shared, out)
    with one_thread():
        again = run_study(store, METHOD_DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False,
                                                        methods=("plain", "mix-ranked", "mix-ranked-matched")),
                          out_dir=out, progress=False)
    matched = again[again["method"] == "mix-ranked-matched"].set_index(["source", "target"]).sort_index()
    plain = again[again["method"] == "plain"].set_index(["source", "target"]).sort_index()
    assert len(matched) == 2 and (again["method"] == "mix-ranked").sum() == 2
    for (s, t), r in matched.iterrows():
        if plain.at[(s, t), "cos_ft"] > 0:
            assert r["repair_scale"] == pytest.approx(0.7, rel=1e-6)
            assert r["ermse"] == pytest.approx(plain.at[(s, t), "ermse"], abs=1e-6)
            assert r["accuracy"] == pytest.approx(plain.at[(s, t), "accuracy"], abs=1e-9)
        else:
            assert r["repair_size"] == 0 and r["ermse"] == pytest.approx(r["ermse_ft_target"])


def test_study_ranked_pass_fits_the_record_on_every_run(tmp_path):
    """The study's ranked mix (run.ranked_gains) fits the ranker on the plain rows of every run (training seed), as
    rank-sources does, while reading the candidates of this run only; with this run's rows alone the gains differ."""
    from diag.study.run import ranked_gains
    from diag.table import write_table

    quality = {s: 0.3 * i for i, s in enumerate(DOMAINS)}
    runs = []
    for seed in (0, 1):
        df = _table(noise=0.05, seed=seed)
        df = df.assign(seed=seed, lambda2=0.7, method="plain", pair_key=[f"s{seed}-{k}" for k in range(len(df))],
                       ermse_norm=df["ermse_norm"] + df["source"].map(quality))
        runs.append(df)
    table = pd.concat(runs, ignore_index=True)
    write_table(table, tmp_path / "pairs.csv")
    keys0, keys1 = set(runs[0]["pair_key"]), set(runs[1]["pair_key"])
    every = ranked_gains(tmp_path, tmp_path / "pairs.csv", keys0, len(runs[0]), keys0 | keys1)
    alone = ranked_gains(tmp_path, tmp_path / "pairs.csv", keys0, len(runs[0]))
    assert set(every) == set(DOMAINS)
    for t in DOMAINS:
        assert every[t] == pytest.approx(ranker_gains(runs[0], t, known=table)[0], abs=1e-12)
        assert alone[t] == pytest.approx(ranker_gains(runs[0], t)[0], abs=1e-12)
    assert any(every[t] != pytest.approx(alone[t], abs=1e-6) for t in DOMAINS)


def test_study_gains_fit_the_ranker_on_every_seed_of_the_folder(tmp_path):
    """`diag transfer --method mix-ranked` (study_gains): one run's candidates, the ranker fitted on every seed's pairs."""
    from diag.decide.recommend import study_gains
    from diag.table import write_table

    quality = {d: 0.3 * i for i, d in enumerate(DOMAINS)}  # a source effect the record can find
    runs = []
    for s in (0, 1):
        df = _table(noise=0.05, seed=s).assign(seed=s, lambda2=0.7, method="plain", variant="paper", alpha=0.8)
        df["ermse"] += df["source"].map(quality)
        runs.append(df.assign(ermse_norm=df["ermse"] / df["ermse_ft_target"]))
    table = pd.concat(runs, ignore_index=True).assign(pair_key=lambda d: [f"k{i}" for i in range(len(d))])
    write_table(table, tmp_path / "pairs.csv")
    gains, how = study_gains(tmp_path, "a", seed=1)
    assert how == "record"
    assert gains == pytest.approx(ranker_gains(runs[1], "a", known=table)[0], abs=1e-12)
    assert gains != pytest.approx(ranker_gains(runs[1], "a")[0], abs=1e-6)  # one seed's pairs alone differ
