"""The all-pairs study (diag.study.run), its table (diag.table), summaries, the Kernel SHAP budget, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from _smoke import DOMAINS, LAMBDAS, one_thread, smoke_study


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def study():
    return smoke_study()


def _row(df, source, target, lam=0.7):
    sel = df[(df["source"] == source) & (df["target"] == target) & (np.isclose(df["lambda2"], lam))]
    assert len(sel) == 1
    return sel.iloc[0]


def test_table_shape_and_columns(study):
    store, out, df = study
    n = len(DOMAINS)
    assert len(df) == n * (n - 1) * len(LAMBDAS)
    assert (df["source"] != df["target"]).all()
    assert not df.duplicated(["source", "target", "lambda2"]).any()
    from diag.decide.predictor import tier_features

    # the predictor's tier-0 features and the figures' columns are there
    assert set(tier_features(df, 0)) >= {"cos_ft", "norm_star_source", "norm_ft_source", "norm_ft_target",
                                        "ermse_star_source", "accuracy_ft_source", "cos_ft.block.0"}
    assert (df["variant"] == "paper").all() and (df["seed"] == 0).all()
    for col in ("variant", "seed", "ermse_img", "ermse_img_ft_target", "ermse_img_meanmap", "accuracy_val",
                "accuracy_val_ft_target", "iou10_ft_target", "ermse_norm", "acc_norm", "ermse_random", "ermse_random_sd",
                "ermse_meanmap", "accuracy_random", "ermse_other", "ermse_other_rescaled", "cos_star", "absent",
                "base_hash", "tvdiag_version", "alpha", "pair_key"):
        assert col in df.columns, col
    # risks were not requested: absent, with the reason, never a silent NaN feature
    assert "risk_exact" not in df.columns and "card_form" not in df.columns
    assert df["absent"].str.contains("risk_exact: curvature not requested").all()
    assert (df["n_random"] >= 5).all() and (df["ermse_random_sd"] > 0).all()
    # per-target references are computed once and identical for every source
    assert (df.groupby("target")["ermse_ft_target"].nunique() == 1).all()
    # the source's own quality (ranker features) is measured on its val split, never on its test split
    from diag.runtime.context import Workspace
    from diag.transfer.eq8 import evaluate_state

    ws = Workspace(store, 0.8)
    for d in DOMAINS:
        as_src = df[df["source"] == d].iloc[0]
        val = ws.target_set(d, "val", explained=True)
        assert val.split == "val" and val.phi is not None
        ftx = evaluate_state(ws, val, ws.state(ws.vector(d, "ftx")), "θ_ft*ˢ")
        assert as_src["ermse_star_source"] == pytest.approx(ftx.ermse, rel=1e-12)
        assert as_src["ermse_star_source"] != df[df["target"] == d].iloc[0]["ermse_ftx_target"]
    assert (out / "pairs.csv").is_file()


def test_transfer_json_rows_equal_study_rows(study, capsys):
    """`diag transfer --json` and the study table give byte-identical numbers for the same pair, seed and λ."""
    from diag.table import read_table
    from diag.transfer.evaluate import CONTROL_RANDOM, METRICS, PLAIN_ROW, ROW_SUFFIX

    store, out, _ = study
    table = read_table(out / "pairs.csv")
    source, target = DOMAINS[1], DOMAINS[0]
    for lam in (0.7, 1.0):
        code, cap = _cli(capsys, "transfer", *_common(store), "--source", source, "--target", target,
                         "--lambda2", str(lam), "--domains", *DOMAINS, "--json")
        assert code == 0, cap.err
        res = json.loads(cap.out)
        row = _row(table, source, target, lam)
        assert res["other_source"] == row["other_source"] and res["n_random"] == row["n_random"]
        assert {r["model"] for r in res["rows"]} == set(ROW_SUFFIX) - {PLAIN_ROW}  # PLAIN_ROW: --method only
        for r in res["rows"]:
            suffix = ROW_SUFFIX[r["model"]]
            for m in METRICS:
                col = f"{m}_{suffix}" if suffix else m
                assert repr(float(row[col])) == repr(r[m]), (r["model"], m)
        for m in METRICS:
            assert repr(float(row[f"{m}_random_sd"])) == repr(res["spread"][CONTROL_RANDOM][f"{m}_sd"])


def test_control_seeding_is_per_pair(study):
    from diag.transfer.evaluate import other_source, pair_seed

    assert pair_seed(0, "a", "b") == pair_seed(0, "a", "b")
    assert len({pair_seed(0, "a", "b"), pair_seed(0, "b", "a"), pair_seed(1, "a", "b"),
                pair_seed(0, "a", "b", "random1")}) == 4
    _, _, df = study
    at07 = df[np.isclose(df["lambda2"], 0.7)]
    # the random control is a different direction for every pair: its E-RMSE differs across pairs of one target
    assert at07.groupby("target")["ermse_random"].nunique().min() == len(DOMAINS) - 1
    assert other_source(0, "a", "b", ["a", "b"]) is None and other_source(0, "a", "b", ["c", "a"]) == "c"


def test_cosines_and_norms_match_dense_float64(study):
    store, _, df = study
    s, t = DOMAINS[0], DOMAINS[2]
    ft_s, ft_t = store.load_vector(s, "ft"), store.load_vector(t, "ft")

    def flat(d, kind):  # dense float64 reference; τ* = θ_ft* − θ_ft is the store's float32 difference
        if kind == "star":
            ft = store.load_vector(d, "ft")
            v = store.load_vector(d, "ftx", 0.8)
            return np.concatenate([(v.tensors[k] - ft.tensors[k]).double().ravel().numpy() for k in sorted(v.tensors)])
        v = store.load_vector(d, kind, None if kind == "ft" else 0.8)
        return np.concatenate([v.tensors[k].double().ravel().numpy() for k in sorted(v.tensors)])

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    star_s, star_t = flat(s, "star"), flat(t, "star")
    row = _row(df, s, t)
    assert row["cos_ft"] == pytest.approx(cos(flat(s, "ft"), flat(t, "ft")), rel=1e-10, abs=1e-12)
    assert row["cos_star"] == pytest.approx(cos(star_s, star_t), rel=1e-10, abs=1e-12)
    assert row["norm_star_source"] == pytest.approx(np.linalg.norm(star_s), rel=1e-10)
    assert row["norm_ft_target"] == pytest.approx(np.linalg.norm(flat(t, "ft")), rel=1e-10)
    block = [k for k in ft_s.tensors if ".resblocks.1." in k]
    a = np.concatenate([ft_s.tensors[k].double().ravel().numpy() for k in block])
    b = np.concatenate([ft_t.tensors[k].double().ravel().numpy() for k in block])
    assert row["cos_ft.block.1"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-10)
    assert _row(df, t, s)["cos_ft"] == pytest.approx(row["cos_ft"], rel=1e-12)


def test_resume_skips_done_pairs_and_fills_gaps(study, tmp_path):
    from diag.table import read_table, write_table
    from diag.study.run import run_study, StudySettings

    store, out, df = study
    work = tmp_path / "study"
    shutil.copytree(out, work)
    table = read_table(work / "pairs.csv")
    s0, t0 = DOMAINS[1], DOMAINS[0]
    s1, t1 = DOMAINS[2], DOMAINS[1]
    tampered = (table["source"] == s0) & (table["target"] == t0)
    table.loc[tampered, "ermse"] = 99.0  # a skipped pair keeps what is on disk
    table = table[~((table["source"] == s1) & (table["target"] == t1))]  # a "killed" pair is recomputed
    write_table(table, work / "pairs.csv")
    again = run_study(store, DOMAINS, StudySettings(lambda2s=LAMBDAS, curvature=False), out_dir=work, progress=False)
    assert len(again) == len(df)
    assert (again.loc[(again["source"] == s0) & (again["target"] == t0), "ermse"] == 99.0).all()
    for lam in LAMBDAS:
        assert _row(again, s1, t1, lam)["ermse"] == pytest.approx(_row(df, s1, t1, lam)["ermse"], rel=1e-12)
    assert len(pd.read_csv(work / "pairs.csv")) == len(df)
    # other settings are other rows, not a skip; load_study shows each pair once (the latest)
    run_study(store, DOMAINS[:2], StudySettings(lambda2s=(0.7,), curvature=False, controls=False), out_dir=work,
              progress=False)
    assert len(pd.read_csv(work / "pairs.csv")) == len(df) + 2
    from diag.table import load_study

    latest = load_study(work, lambda2=0.7)
    assert len(latest) == 6 and latest["ermse_random"].isna().sum() == 2


def test_shards_partition_pairs_and_merge(study, tmp_path, monkeypatch):
    from diag.table import default_shard, load_study, merge_shards, parse_shard
    from diag.study.run import run_study, StudySettings

    store, _, df = study
    parts = [run_study(store, DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False, controls=False),
                       out_dir=tmp_path, shard=(i, 2), progress=False) for i in range(2)]
    assert (tmp_path / "pairs-shard0of2.csv").is_file() and (tmp_path / "pairs-shard1of2.csv").is_file()
    keys = [set(zip(p["source"], p["target"])) for p in parts]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == len(DOMAINS) * (len(DOMAINS) - 1)
    merged = merge_shards(tmp_path)
    assert len(merged) == 6 and (tmp_path / "pairs.csv").is_file()
    ref = df[np.isclose(df["lambda2"], 0.7)].set_index(["source", "target"])["ermse"]
    got = load_study(tmp_path, lambda2=0.7).set_index(["source", "target"])["ermse"]
    pd.testing.assert_series_equal(got.sort_index(), ref.sort_index(), rtol=1e-12)
    assert np.isnan(merged["ermse_random"]).all() if "ermse_random" in merged else True
    assert default_shard() == (0, 1)  # no process group: diag.cli.main initialises the only one
    assert parse_shard("2/4") == (2, 4)
    from train.errors import TvdiagError

    for bad in ("4/4", "x", "-1/2"):
        with pytest.raises(TvdiagError):
            parse_shard(bad)


def test_study_settings_normalise_and_key_runs():
    """The settings object run_study takes: λ2s rounded and deduplicated, seeds deduplicated, plain first;
    a run's pair_key payload names its training seed and, for another method, that method and budget (and a
    ranked mix its ranker and the runs it learns from)."""
    from diag.study.run import StudySettings
    from train.errors import DataError, TvdiagError

    s = StudySettings(lambda2s=(0.7, 0.70000001, 0.4), seeds=(1, 1, 0), methods=("mix", "plain"))
    assert s.lambda2s == (0.7, 0.4) and s.seeds == (1, 0) and s.methods == ("plain", "mix")
    plain = s.key_payload(1)
    assert plain == {"alpha": 0.8, "lambda1": 1.0, "controls": True, "curvature": True, "seed": 1, "n_random": 5,
                     "variant": "paper", "curvature_settings": plain["curvature_settings"]}
    assert s.key_payload(0, "mix") == {**s.key_payload(0), "method": "mix", "max_acc_drop": 0.05}
    # a ranked mix's rows depend on the ranker: its name is in their key (another ranker's rows are not reused)
    assert s.key_payload(0, "mix-ranked") == {**s.key_payload(0, "mix"), "method": "mix-ranked", "ranker": "record",
                                              "ranker_seeds": [1, 0]}  # the runs whose pairs the ranker learns
    with pytest.raises(DataError):
        StudySettings(lambda2s=())
    with pytest.raises(DataError):
        StudySettings(seeds=())
    with pytest.raises(TvdiagError, match="mixx"):
        StudySettings(methods=("mixx",))


def test_summary_counts_handmade():
    from diag.study.summary import summarize

    df = pd.DataFrame({
        "source": ["a", "a", "b", "b"], "target": ["b", "c", "a", "c"], "lambda2": 0.7,
        "accuracy": [0.95, 0.80, 0.50, 0.99], "accuracy_ft_target": [1.0, 1.0, 0.5, 1.0],
        "ermse": [1.0, 1.0, 2.0, 0.5], "ermse_ft_target": [2.0, 2.0, 1.0, 1.0],
        "ermse_random": [0.5, 2.0, 3.0, np.nan], "ermse_meanmap": [3.0, 3.0, 3.0, 3.0],
        "ermse_other": [np.nan] * 4})
    s = summarize(df)
    assert (s.n_pairs, s.n_lower_ermse, s.n_keep90, s.n_better_keep90) == (4, 3, 3, 2)
    assert (s.n_beat_random, s.n_controls["random"], s.n_beat_meanmap, s.n_controls["other"]) == (2, 3, 4, 0)
    assert s.mean_ermse_norm == pytest.approx(np.mean([0.5, 0.5, 2.0, 0.5]))
    assert s.mean_ermse_norm_se == pytest.approx(np.std([0.5, 0.5, 2.0, 0.5], ddof=1) / 2)
    text = " ".join(s.verdicts())
    assert "2/4 pairs" in text and "beats the control 'mean φ map (source)'" in text
    assert json.dumps(s.to_dict())


def test_table1_and_figure2_frame(study):
    from diag.study.summary import figure2_frame, table1
    from train.errors import UnknownNameError

    _, _, df = study
    t = table1(df, DOMAINS[0])
    assert t.loc["proposed", "n_targets"] == len(DOMAINS) - 1
    mine = df[(df["source"] == DOMAINS[0]) & np.isclose(df["lambda2"], 0.7)]
    assert t.loc["proposed", "ermse_mean"] == pytest.approx(mine["ermse"].mean(), rel=1e-12)
    assert t.loc["θ_ftᵀ", "paper_ermse"] == pytest.approx(1.562)
    with pytest.raises(UnknownNameError):
        table1(df, "nosuch")
    f2 = figure2_frame(df)
    assert set(f2["row"]) >= {"proposed", "random τ (τ*ˢ norms)", "mean φ map (source)"}
    assert (f2.loc[f2["row"] == "mean φ map (source)", "acc_norm"].dropna() == 1.0).all()


def test_kernelshap_budget_reproduces_ground_truth(study):
    from diag.study.kernelshap_budget import kernelshap_budget
    from train.errors import DataError
    from train.zoo import preset

    store, _, _ = study
    cfg = preset("smoke")
    ks = kernelshap_budget(store, DOMAINS[0], DOMAINS[1], budgets=(cfg.shap_samples, 64), n_images=cfg.shap_test)
    same = ks[(ks["method"] == "kernelshap") & (ks["n_perturbations"] == cfg.shap_samples)].iloc[0]
    # same P, same seed, same images: Kernel SHAP reproduces the stored ground truth exactly
    assert same["ermse"] < 1e-5 and same["iou1"] == 1.0
    assert set(ks["method"]) == {"kernelshap", "proposed"} and (ks["wall_s"] > 0).all()
    with pytest.raises(DataError):
        kernelshap_budget(store, DOMAINS[0], DOMAINS[1], budgets=(15,))


# ------------------------------------------------------------------------------------ CLI


def _cli(capsys, *argv):
    from diag.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr()


def _common(store):
    return ["--store", str(store.root), "--preset", "smoke", "--quiet"]


def test_cli_study_correlate_similarity(study, capsys, tmp_path):
    store, out, _ = study
    code, cap = _cli(capsys, "study", *_common(store), "--domains", *DOMAINS, "--no-curvature", "--json")
    assert code == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["summary"]["n_pairs"] == 6 and rep["study"] == str(out)
    (variant,) = rep["report"]["variants"]
    assert variant["variant"] == "paper" and variant["seeds"] == [0] and variant["fixed_lambda2"]["n_pairs"]["mean"] == 6
    # this run asked for λ2 = 0.7 only: no validation-chosen headline, and the report says why
    assert variant["chosen_lambda2"] is None and any("--lambda-grid" in n for n in rep["report"]["notes"])
    assert (out / "figure2.png").stat().st_size > 0

    code, cap = _cli(capsys, "correlate", *_common(store), "--n-boot", "100", "--n-perm", "50", "--json")
    assert code == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["n_pairs"] == 6
    assert [(c["x"], c["y"], c["paper_r"]) for c in rep["correlations"]] == [
        ("cos_star", "ermse", -0.51), ("cos_star", "cos_ft", 0.73), ("cos_ft", "ermse", -0.32)]
    for c in rep["correlations"]:
        assert set(c) >= {"x", "y", "pearson_r", "pearson_p", "spearman_rho", "ci95", "perm_p", "paper_r"}
        assert len(c["ci95"]) == 2
    assert (out / "figure6.png").is_file()
    code, cap = _cli(capsys, "correlate", *_common(store))
    assert code == 0 and "paper r" in cap.out and "-0.51" in cap.out

    code, cap = _cli(capsys, "similarity", *_common(store), "--domains", *DOMAINS, "--by", "block", "--json",
                     "--out", str(tmp_path / "sim"))
    assert code == 0, cap.err
    rep = json.loads(cap.out)
    g = pd.DataFrame(rep["ft"]["global"])
    assert np.allclose(np.diag(g.loc[DOMAINS, DOMAINS]), 1.0) and np.allclose(g, g.T)
    assert "block.0" in rep["star"] and (tmp_path / "sim" / "cos_star.png").is_file()
    code, cap = _cli(capsys, "similarity", *_common(store), "--domains", *DOMAINS)
    assert code == 0 and "cos(τ_ftˢ, τ_ftᵀ)" in cap.out


def test_cli_bad_input_exits_2(study, capsys, tmp_path):
    store, _, _ = study
    for argv in (["study", *_common(store), "--domains", *DOMAINS, "--shard", "2/2"],
                 ["study", *_common(store), "--domains", "nosuch", "mnist"],
                 ["study", *_common(store), "--domains", "mnist"],
                 ["correlate", *_common(store), "--n-boot", "0"],
                 ["correlate", *_common(store), "--lambda2", "0.3"]):
        code, cap = _cli(capsys, *argv)
        assert code == 2, (argv, cap.err)
        assert cap.err.count("\n") == 1 and "error" in cap.err


# ------------------------------------------------------------------------- damaged tables


def _damaged(out, tmp_path, how):
    from diag.table import check_path, read_table, write_table

    work = tmp_path / "damaged"
    shutil.copytree(out, work)
    path = work / "pairs.csv"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "edited":  # a changed value the check file does not know
        path.write_bytes(data.replace(b"mnist", b"mnisT", 1))
    elif how == "half-row":  # a complete line, but a row cut short (written with a fresh check file)
        lines = data.decode().splitlines()
        path.write_text("\n".join(lines[:-1] + [",".join(lines[-1].split(",")[:6])]) + "\n")
        check_path(path).unlink()
    elif how == "columns":
        write_table(read_table(path).drop(columns=["pair_key"]), path)
    elif how == "nan":
        t = read_table(path)
        t.loc[0, "ermse"] = float("nan")
        write_table(t, path)
    elif how == "check":
        check_path(path).write_text("{not json")
    return work, path


@pytest.mark.parametrize("how", ["truncated", "edited", "half-row", "columns", "nan", "check"])
def test_damaged_table_is_refused_and_never_extended(study, tmp_path, how):
    from diag.table import load_study
    from diag.study.run import run_study, StudySettings
    from train.errors import ArtifactError

    store, out, _ = study
    work, path = _damaged(out, tmp_path, how)
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match="pairs.csv"):
        load_study(work)
    with pytest.raises(ArtifactError, match="pairs.csv"):
        run_study(store, DOMAINS, StudySettings(lambda2s=(0.4,), curvature=False), out_dir=work, progress=False)
    assert path.read_bytes() == before


def test_cli_refuses_damaged_table_and_reads_given_study(study, capsys, tmp_path):
    store, out, _ = study
    work, path = _damaged(out, tmp_path, "truncated")
    code, cap = _cli(capsys, "correlate", *_common(store), "--study", str(work), "--n-boot", "20", "--n-perm", "20")
    assert code == 2 and cap.err.count("\n") == 1 and "truncated" in cap.err and str(path) in cap.err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, cap = _cli(capsys, "correlate", *_common(store), "--study", str(empty))
    assert code == 2 and "no study table" in cap.err and not list(empty.iterdir())  # read, never extended


def test_kill_between_check_and_table_leaves_a_readable_table(study, tmp_path):
    """write_table replaces the check file first; the old table it names as 'previous' still reads."""
    from diag.table import check_path, read_table, write_table

    _, out, _ = study
    path = tmp_path / "pairs.csv"
    shutil.copy(out / "pairs.csv", path)
    shutil.copy(check_path(out / "pairs.csv"), check_path(path))  # a table tvdiag wrote: its check file with it
    old = read_table(out / "pairs.csv")
    write_table(old, path)
    saved = path.read_bytes()
    write_table(old.iloc[:3], path)          # simulate: the new check file landed, the table rename did not
    path.write_bytes(saved)
    assert len(read_table(path)) == len(old)
    check_path(path).write_text(check_path(path).read_text().replace('"previous"', '"gone"'))
    with pytest.raises(Exception, match="check file"):
        read_table(path)
