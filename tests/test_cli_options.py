"""The command line's shared option blocks and its three seeds, parsed without a store.

``--train-seed`` (``--seed`` its alias where a command has one training seed), ``--probe-seed``
and ``--bootstrap-seed`` are three options; where ``--seed`` once meant a probe or bootstrap
seed it is refused with one line naming the new option, never read as another seed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from diag.cli import build_parser, main
from diag.commands.options import curvature_settings
from diag.constants import DEFAULT_MAX_ACC_DROP, PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.features.pair_features import CurvatureSettings


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _option(command: str, flag: str) -> argparse.Action | None:
    return next((a for a in _sub(command)._actions if flag in a.option_strings), None)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv,dest", [
    (["hessian", "--domain", "mnist", "--probe-seed", "7"], "probe_seed"),
    (["spectrum", "--domain", "mnist", "--probe-seed", "7"], "probe_seed"),
    (["risk", "--source", "a", "--target", "b", "--probe-seed", "7"], "probe_seed"),
    (["card", "--target", "t", "--model", "m", "--out", "card.safetensors", "--probe-seed", "7"], "probe_seed"),
    (["correlate", "--bootstrap-seed", "7"], "bootstrap_seed"),
    (["transfer", "--source", "a", "--target", "b", "--train-seed", "7"], "train_seed"),
    (["transfer", "--source", "a", "--target", "b", "--seed", "7"], "train_seed"),
    (["import", "--kind", "ft", "--input", "x.safetensors", "--seed", "7"], "train_seed"),
    (["correlate", "--train-seed", "7"], "train_seed"),
    (["rank-sources", "--train-seed", "7"], "train_seed"),
])
def test_each_seed_lands_in_its_own_name(argv, dest):
    args = parse(*argv)
    assert getattr(args, dest) == 7
    assert "seed" not in vars(args)
    others = {"probe_seed", "bootstrap_seed", "train_seed"} - {dest}
    assert all(getattr(args, o, None) != 7 for o in others)


@pytest.mark.parametrize("argv,new", [
    (["hessian", "--domain", "mnist"], "--probe-seed"),
    (["spectrum", "--domain", "mnist"], "--probe-seed"),
    (["risk", "--source", "a", "--target", "b"], "--probe-seed"),
    (["card", "--target", "t", "--model", "m", "--out", "card.safetensors"], "--probe-seed"),
    (["correlate"], "--bootstrap-seed"),
])
def test_old_seed_spelling_is_refused_where_it_was_not_a_training_seed(capsys, argv, new):
    code = main([*argv, "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--seed" in err[0] and new in err[0]


def test_seed_defaults_are_the_settings_defaults():
    assert parse("hessian", "--domain", "d").probe_seed == CurvatureSettings().seed
    assert parse("correlate").bootstrap_seed == 0
    assert parse("transfer", "--source", "a", "--target", "b").train_seed == 0
    assert parse("correlate").train_seed is None and parse("rank-sources").train_seed is None


SHARED = {  # option → commands that add it from one block of diag.commands.options
    "--alpha": ("transfer", "similarity", "study", "ceilings", "rank-sources", "screen", "hessian", "spectrum",
                "risk", "import"),
    "--lambda1": ("transfer", "study"),
    "--lambda2": ("transfer", "correlate", "screen", "risk"),
    "--max-acc-drop": ("transfer", "rank-sources", "screen"),
    "--n-images": ("hessian", "spectrum", "risk", "rank-sources", "screen", "card"),
    "--batch-size": ("hessian", "spectrum", "risk", "card"),
    "--probes": ("risk", "rank-sources", "screen", "card"),
    "--k": ("risk", "rank-sources", "screen", "card"),
    "--card-form": ("risk", "rank-sources", "screen", "card"),
    "--seeds": ("zoo", "study", "ceilings"),
    "--variant": ("transfer", "study", "ceilings", "import"),
}
DEFAULTS = {"--alpha": PAPER_ALPHA, "--lambda1": PAPER_LAMBDA1, "--lambda2": PAPER_LAMBDA2,
            "--max-acc-drop": DEFAULT_MAX_ACC_DROP, "--seeds": [0], "--variant": "paper",
            # not given, the curvature options are the preset's (test_curvature_settings_follow_the_preset)
            "--n-images": None, "--batch-size": None, "--probes": None, "--k": None, "--card-form": None}


@pytest.mark.parametrize("flag", sorted(SHARED))
def test_shared_options_agree_across_commands(flag):
    """One block per option: the same type, range and default wherever it appears."""
    actions = [_option(c, flag) for c in SHARED[flag]]
    assert all(a is not None for a in actions)
    assert {a.default if not isinstance(a.default, list) else tuple(a.default) for a in actions} == {
        tuple(DEFAULTS[flag]) if isinstance(DEFAULTS[flag], list) else DEFAULTS[flag]}
    assert len({getattr(a.type, "__name__", a.type) for a in actions}) == 1
    assert len({a.choices and tuple(a.choices) for a in actions}) == 1


CURVATURE_COMMANDS = (["rank-sources"], ["screen", "--source", "a", "--target", "b"], ["risk", "--source", "a",
                      "--target", "b"], ["card", "--target", "t", "--model", "m", "--out", "c.safetensors"], ["study"],
                      ["correlate"], ["transfer", "--source", "a", "--target", "b"], ["hessian", "--domain", "d"])


@pytest.mark.parametrize("preset", ["default", "smoke", "vitb-smoke", "dense"])
@pytest.mark.parametrize("argv", CURVATURE_COMMANDS, ids=lambda argv: argv[0])
def test_curvature_settings_follow_the_preset(argv, preset):
    """Every command that estimates Hᵀ takes the preset's settings unless an option is given (one resolver)."""
    assert curvature_settings(parse(*argv, "--preset", preset)) == CurvatureSettings.for_preset(preset)
    given = {"--n-images": ("n_images", 40), "--batch-size": ("batch_size", 20), "--probes": ("probes", 5),
             "--k": ("k", 3)}
    flags = [f for f in given if _option(argv[0], f) is not None]
    args = parse(*argv, "--preset", preset, *[v for f in flags for v in (f, str(given[f][1]))])
    assert curvature_settings(args) == replace(CurvatureSettings.for_preset(preset),
                                               **{given[f][0]: given[f][1] for f in flags})


def test_smoke_presets_estimate_a_smaller_curvature():
    """The smoke presets' Hᵀ is cheaper than the default's on every count, and the default preset's is the
    dataclass's."""
    assert CurvatureSettings.for_preset("default") == CurvatureSettings()
    for name in ("smoke", "vitb-smoke"):
        small, full = CurvatureSettings.for_preset(name), CurvatureSettings()
        assert small.n_images < full.n_images and small.probes < full.probes and small.k < full.k


def test_repeatable_lambda2_and_grid():
    args = parse("study")
    assert args.lambda2 is None and not args.lambda_grid and args.lambda1 == PAPER_LAMBDA1
    assert parse("study", "--lambda2", "0.4", "--lambda2", "0.9").lambda2 == [0.4, 0.9]
