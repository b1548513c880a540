"""Training seeds and θ_ft* variants through the diagnostics layer: study rows, report, transfer, ceilings.

One module fixture adds seed 1 and the ``from-ft`` variant to the shared smoke store (≈ 1 min)
and runs one two-seed study of the ``from-ft`` variant on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from _smoke import DOMAINS, one_thread, smoke_store

SEEDS = (0, 1)
LAMS = (0.4, 0.7)
VARIANT = "from-ft"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """(store, study folder, table) of a from-ft study over seeds 0 and 1 at λ2 0.4 and 0.7."""
    from diag.study.run import run_study, StudySettings
    from train.zoo import Zoo, preset

    store = smoke_store()
    for s in SEEDS:
        Zoo(store, replace(preset("smoke"), seed=s), progress=False).build(DOMAINS, variants=(VARIANT,))
    out = tmp_path_factory.mktemp("seeded-study")
    df = run_study(store, DOMAINS, StudySettings(lambda2s=LAMS, curvature=False, seeds=SEEDS, variant=VARIANT),
                   out_dir=out, progress=False)
    return store, out, df


def _row(df, source, target, lam, seed):
    sel = df[(df["source"] == source) & (df["target"] == target) & np.isclose(df["lambda2"], lam)
             & (df["seed"] == seed)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_rows_per_seed_and_runs_differ(seeded):
    _, _, df = seeded
    n_pairs = len(DOMAINS) * (len(DOMAINS) - 1)
    assert (df["variant"] == VARIANT).all() and (df["alpha"] == 0.8).all()
    assert df.groupby("seed").size().to_dict() == {s: n_pairs * len(LAMS) for s in SEEDS}
    assert not df.duplicated(["source", "target", "lambda2", "seed"]).any()
    # the seeds are different runs: other θ_ftᵀ, other φ, other pair keys
    a, b = (_row(df, DOMAINS[1], DOMAINS[0], 0.7, s) for s in SEEDS)
    assert a["pair_key"] != b["pair_key"] and a["ermse_ft_target"] != b["ermse_ft_target"]


def test_report_mean_sd_equals_hand_computation(seeded):
    from diag.study.report import study_report

    _, _, df = seeded
    rep = study_report(df)
    (v,) = rep.variants
    assert (v.variant, v.seeds) == (VARIANT, list(SEEDS))

    def by_hand(rows):
        kept = rows["accuracy"] >= 0.9 * rows["accuracy_ft_target"]
        return {"better_keep90": int(((rows["ermse"] < rows["ermse_ft_target"]) & kept).sum()),
                "better_keep90_img": int(((rows["ermse_img"] < rows["ermse_img_ft_target"]) & kept).sum()),
                "wins.meanmap": int((rows["ermse"] < rows["ermse_meanmap"]).sum()),
                "wins_img.random": int((rows["ermse_img"] < rows["ermse_img_random"]).sum())}

    fixed = [by_hand(df[(df["seed"] == s) & np.isclose(df["lambda2"], 0.7)]) for s in SEEDS]
    chosen = []
    for s in SEEDS:  # per pair, the largest λ2 whose val accuracy, and that of every smaller λ2, is within 5 % of
        run, picked = df[df["seed"] == s], []  # θ_ftᵀ's val accuracy (the safe sizes of diag.transfer.budget)
        for _, g in run.groupby(["source", "target"]):
            g = g.sort_values("lambda2")
            ok = g[(1 - g["accuracy_val"] / g["accuracy_val_ft_target"] <= 0.05 + 1e-9).cummin()]
            if len(ok):
                picked.append(ok.loc[ok["lambda2"].idxmax()])
        chosen.append(by_hand(run.loc[[p.name for p in picked]]))
    for agg, per in ((v.fixed, fixed), (v.chosen, chosen)):
        for key in per[0]:
            vals = [p[key] for p in per]
            assert agg[key][0] == pytest.approx(np.mean(vals), abs=1e-12), key
            assert agg[key][1] == pytest.approx(np.std(vals, ddof=1), abs=1e-12), key
    t1 = v.table1  # Table 1: mean over seeds of each seed's mean over the source's targets
    src = rep.source
    per_seed = [df[(df["seed"] == s) & (df["source"] == src) & np.isclose(df["lambda2"], 0.7)]["ermse_img"].mean()
                for s in SEEDS]
    assert t1.loc["proposed", "ermse_img_mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
    assert t1.loc["proposed", "ermse_img_sd_seeds"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-12)
    d = rep.to_dict()
    assert json.dumps(d, default=float) and "seed" in rep.table() and "mean ± sd" in rep.table()


def test_meanmap_control_image_specific_ermse_is_one(seeded):
    """A constant map has a zero centred map: its image-specific E-RMSE is 1 (up to zscore's ε)."""
    _, _, df = seeded
    for col in ("ermse_img_meanmap", "ermse_img_meanmap_target"):
        assert np.abs(df[col].to_numpy() - 1.0).max() < 1e-6, col
    assert (df["ermse_img"] != df["ermse"]).all()


def test_transfer_json_equals_study_row_for_seed1_fromft(seeded, capsys):
    """`diag transfer --train-seed 1 --variant from-ft --json` gives the study row's numbers, byte for byte."""
    from diag.cli import main
    from diag.transfer.evaluate import CONTROL_RANDOM, METRICS, ROW_SUFFIX

    store, _, df = seeded
    source, target = DOMAINS[2], DOMAINS[0]
    capsys.readouterr()
    code = main(["transfer", "--store", str(store.root), "--preset", "smoke", "--quiet", "--source", source,
                 "--target", target, "--lambda2", "0.4", "--train-seed", "1", "--variant", VARIANT,
                 "--domains", *DOMAINS, "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    res = json.loads(cap.out)
    row = _row(df, source, target, 0.4, 1)
    assert (res["seed"], res["variant"], res["other_source"]) == (1, VARIANT, row["other_source"])
    for r in res["rows"]:
        suffix = ROW_SUFFIX[r["model"]]
        for m in METRICS:
            assert repr(float(row[f"{m}_{suffix}" if suffix else m])) == repr(r[m]), (r["model"], m)
    for m in METRICS:
        assert repr(float(row[f"{m}_random_sd"])) == repr(res["spread"][CONTROL_RANDOM][f"{m}_sd"])


def test_resume_is_per_run(seeded):
    """A rerun computes nothing; a new seed list only adds the missing run's rows."""
    from diag.table import read_table
    from diag.study.run import run_study, StudySettings

    store, out, df = seeded
    before = (out / "pairs.csv").read_bytes()
    again = run_study(store, DOMAINS, StudySettings(lambda2s=LAMS, curvature=False, seeds=(1,), variant=VARIANT),
                      out_dir=out, progress=False)
    assert (out / "pairs.csv").read_bytes() == before and len(again) == len(df) // 2
    assert len(read_table(out / "pairs.csv")) == len(df)


def test_ceilings(seeded, capsys):
    from diag.study.ceilings import ceilings, kernelshap_ceiling, seed_cosines, seed_gram
    from diag.runtime.context import Workspace
    from diag.features.similarity import cosine_streamed
    from train.errors import DataError

    store, _, _ = seeded
    ws = Workspace(store, variant=VARIANT)
    g = seed_gram(ws, DOMAINS[:1], (0, 0), "star")
    assert seed_cosines(g, 1, 2) == [[1.0]]  # a seed with itself: exactly 1
    g = seed_gram(ws, DOMAINS[:2], SEEDS, "ft")
    ref = cosine_streamed(store.vector_path(DOMAINS[1], "ft"), store.vector_path(DOMAINS[1], "ft", seed=1))
    assert seed_cosines(g, 2, 2)[1][0] == pytest.approx(ref.cosine, rel=1e-12) and ref.cosine < 1
    with pytest.raises(DataError, match="two different generator seeds"):
        kernelshap_ceiling(ws, DOMAINS[0], 16, (5, 5))  # identical runs measure no noise: refused
    c1, se1, n = kernelshap_ceiling(ws, DOMAINS[0], 16, (1, 2))
    assert (c1, se1, n) == kernelshap_ceiling(ws, DOMAINS[0], 16, (1, 2)) and 0 < c1 < 2 and se1 > 0 and n == 16
    dense, _, _ = kernelshap_ceiling(ws, DOMAINS[0], 16, (1, 2), samples=512)
    assert dense < c1  # more coalitions per image: two runs agree better
    res = ceilings(ws, DOMAINS, SEEDS, n_images=16)
    d = res.to_dict()
    assert [r["domain"] for r in d["domains"]] == DOMAINS and len(d["cross_domain_cos_star"]["per_seed"]) == 2
    assert all(len(r["cos_star_seeds"]) == 1 and math.isfinite(r["kernelshap_noise"]["1"]["ermse"])
               for r in d["domains"])
    from diag.cli import main

    capsys.readouterr()
    code = main(["ceilings", "--store", str(store.root), "--preset", "smoke", "--quiet", "--domains", *DOMAINS[:2],
                 "--seeds", "0", "1", "--variant", VARIANT, "--n-images", "8", "--ks-samples", "128"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "cross-domain cos τ*" in cap.out and "KS noise" in cap.out and "at 128 samples per image" in cap.out


def test_rank_evaluate_reads_one_run_of_a_multi_seed_study(seeded, capsys):
    """`rank-sources --evaluate --study`: the rows of one (variant, seed), never a pair once per seed.

    With 3 domains a leave-one-target-out fold of one run has (3 − 1)·(3 − 2) = 2 training pairs,
    too few to fit (refused, naming the count); rows of both seeds mixed would give it 4.
    """
    from diag.cli import main

    store, out, _ = seeded
    base = ["rank-sources", "--evaluate", "--store", str(store.root), "--preset", "smoke", "--quiet", "--json",
            "--domains", *DOMAINS, "--study", str(out), "--variant", VARIANT]
    capsys.readouterr()
    for s in SEEDS:
        code = main([*base, "--train-seed", str(s)])
        err = capsys.readouterr().err
        assert code == 2 and "need at least 3 pairs" in err and "got 2" in err, err
    code = main([*base, "--train-seed", "7"])
    assert code == 2 and "seed" in capsys.readouterr().err  # a seed the study does not hold: refused


def test_correlate_all_seeds_is_the_mean_and_sd_of_the_per_seed_analyses(seeded, capsys):
    """`correlate --all-seeds`: one analysis per training seed, then each r's mean ± sd (by hand here)."""
    from diag.cli import main
    from diag.stats import correlate_appendix_c
    from diag.table import at_lambda, load_study, select_run

    store, out, _ = seeded
    capsys.readouterr()
    code = main(["correlate", "--all-seeds", "--study", str(out), "--variant", VARIANT, "--n-boot", "20",
                 "--n-perm", "20", "--store", str(store.root), "--preset", "smoke", "--quiet", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    every = select_run(load_study(out), VARIANT, "all")
    per = [correlate_appendix_c(at_lambda(every[every["seed"] == s], 0.7), n_boot=20, n_perm=20, seed=0) for s in SEEDS]
    assert sorted(report["per_seed"]) == [str(s) for s in SEEDS]
    for k, row in enumerate(report["over_seeds"]):
        rs = [p[k].pearson_r for p in per]
        assert row["mean_r"] == pytest.approx(np.mean(rs), rel=1e-12)
        assert row["sd_r"] == pytest.approx(np.std(rs, ddof=1), rel=1e-12) and row["n_seeds"] == 2
