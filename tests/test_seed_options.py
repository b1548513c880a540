"""Three seeds, three names: --train-seed (alias --seed), --probe-seed, --bootstrap-seed."""

from __future__ import annotations

import pytest

from diag.cli import _ArgumentError, build_parser


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_training_seed_is_train_seed_or_seed():
    for flag in ("--seed", "--train-seed"):
        args = _parse("transfer", "--source", "mnist", "--target", "gtsrb", flag, "3")
        assert args.train_seed == 3
    assert _parse("import", "--kind", "ft", "--domain", "d", "--input", "x.safetensors", "--seed", "2").train_seed == 2
    assert _parse("correlate", "--seed", "1").train_seed == 1  # the training seed of the rows


def test_probe_seed_is_its_own_flag_and_seed_names_it():
    assert _parse("hessian", "--domain", "mnist", "--probe-seed", "5").probe_seed == 5
    assert _parse("spectrum", "--domain", "mnist").probe_seed == 0
    for command in (["hessian", "--domain", "mnist"], ["spectrum", "--domain", "mnist"],
                    ["card", "--target", "t", "--model", "m.safetensors", "--out", "c.safetensors"]):
        with pytest.raises(_ArgumentError, match=r"argument --seed: '5': .* has no training seed; .*--probe-seed"):
            _parse(*command, "--seed", "5")


def test_bootstrap_seed_is_its_own_flag():
    args = _parse("correlate", "--bootstrap-seed", "7")
    assert args.bootstrap_seed == 7 and args.train_seed is None
