"""Bad values at the command-line boundary: unsafe names, non-finite or out-of-range numbers,
unwritable outputs. Each is refused before any work with one line and exit 2, and neither
the store nor anything beside it changes."""

from __future__ import annotations

import pytest

from tests.adversarial._helpers import common, refused

SRC_TGT = ["transfer", "--source", "mnist", "--target", "animals"]
RISK = ["risk", "--source", "mnist", "--target", "animals"]
SPEC = ["spectrum", "--domain", "mnist"]
HESS = ["hessian", "--domain", "mnist"]

# class 1: a user-given name joined into store paths (security)
BAD_NAMES = ["../../../somewhere/model", "/abs/path", "..", ".", "a/b", "Mnist", "_x", "", "x" * 65, "a b",
             "mnist\n", "é"]
NAME_CASES = (
    [(["transfer", "--source", "mnist", "--target", n], n) for n in BAD_NAMES]
    + [(["transfer", "--source", n, "--target", "mnist"], n) for n in BAD_NAMES[:4]]
    + [([*SRC_TGT, "--data", f"{n}=/tmp"], n) for n in BAD_NAMES[:5]]
    + [(["hessian", "--domain", n], n) for n in BAD_NAMES[:3]]
    + [(["spectrum", "--domain", n], n) for n in BAD_NAMES[:3]]
    + [(["risk", "--source", n, "--target", "mnist"], n) for n in BAD_NAMES[:3]]
    + [(["zoo", "--domains", "mnist", n], n) for n in BAD_NAMES[:3]]
    + [(["screen", "--source", "mnist", "--target", n], n) for n in BAD_NAMES[:2]]
    + [(["similarity", "--domains", n], n) for n in BAD_NAMES[:2]]
    + [([*SRC_TGT, "--rebuild", n], n) for n in BAD_NAMES[:3]]
)


@pytest.mark.parametrize("argv,bad", NAME_CASES, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(NAME_CASES)])
def test_unsafe_name_is_refused(smoke, tmp_path, capsys, argv, bad):
    """`--target ../../../somewhere/model` used to write outside the store, exit 0."""
    line = refused(capsys, [*argv, *common(smoke.root)], "name", smoke.root, tmp_path)
    assert repr(bad) in line


# class 5/7: numeric options — non-finite, out of range, not an integer
NUMERIC = [
    ([*SRC_TGT, "--lambda2", "1e30"], "1e30"), ([*SRC_TGT, "--lambda2", "nan"], "nan"),
    ([*SRC_TGT, "--lambda1", "inf"], "inf"), ([*SRC_TGT, "--lambda1", "-inf"], "-inf"),
    ([*SRC_TGT, "--alpha", "1.5"], "1.5"), ([*SRC_TGT, "--alpha", "nan"], "nan"),
    ([*SRC_TGT, "--seed", str(10 ** 23)], str(10 ** 23)), ([*SRC_TGT, "--seed", "-1"], "-1"),
    ([*SRC_TGT, "--seed", str(2 ** 63)], str(2 ** 63)), ([*SRC_TGT, "--seed", "1e3"], "1e3"),
    ([*RISK, "--lambda2", "nan"], "nan"), ([*RISK, "--check", "nan"], "nan"), ([*RISK, "--check", "0"], "0"),
    ([*RISK, "--check", "0.5", "inf"], "inf"), ([*RISK, "--probes", "0"], "0"), ([*RISK, "--k", "-2"], "-2"),
    ([*SPEC, "--k", "0"], "0"), ([*SPEC, "--k", "1e9"], "1e9"), ([*SPEC, "--k", "1000000000"], "1000000000"),
    ([*SPEC, "--probes", "0"], "0"), ([*SPEC, "--iters", "0"], "0"), ([*SPEC, "--n-images", "0"], "0"),
    ([*HESS, "--batch-size", "0"], "0"), ([*HESS, "--rel-stderr", "0"], "0"), ([*HESS, "--rel-stderr", "nan"], "nan"),
    ([*HESS, "--probes", "1"], "1"), ([*HESS, "--alpha", "-0.1"], "-0.1"), ([*HESS, "--probe-seed", "x"], "x"),
    ([*HESS, "--probe-seed", "-1"], "-1"),
    (["screen", "--source", "mnist", "--target", "animals", "--max-acc-drop", "2"], "2"),
    (["screen", "--source", "mnist", "--target", "animals", "--lambda2", "inf"], "inf"),
    (["rank-sources", "--target", "mnist", "--n-boot", "0"], "0"),
    (["correlate", "--n-boot", "0"], "0"), (["correlate", "--n-perm", "-5"], "-5"),
    (["study", "--ks-images", "0"], "0"), (["study", "--lambda2", "nan"], "nan"),
    (["similarity", "--alpha", "2"], "2"),
]


@pytest.mark.parametrize("argv,bad", NUMERIC, ids=[f"{a[0]}-{a[-2]}-{b}" for a, b in NUMERIC])
def test_bad_number_is_refused(smoke, capsys, argv, bad):
    if bad.startswith("-"):  # argparse reads '-inf' as an option unless it is attached with '='
        argv = [*argv[:-2], f"{argv[-2]}={bad}"]
    line = refused(capsys, [*argv, *common(smoke.root)], "argument", smoke.root)
    assert repr(bad) in line


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bench_repeats_must_be_positive(capsys, value):
    """`bench --repeats 0` used to be ignored (it ran 3 repeats)."""
    line = refused(capsys, ["bench", "curvature", "--repeats", value, "--json"], "--repeats")
    assert repr(value) in line


def test_unwritable_out_is_refused_before_compute(smoke, tmp_path, capsys):
    """An unwritable `--out` used to fail after 44 s of compute."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(capsys, [*SPEC, "--out", blocker / "sub" / "spectrum.png", *common(smoke.root)], "not a folder",
            smoke.root, tmp_path)
    refused(capsys, [*SPEC, "--out", tmp_path, *common(smoke.root)], "is a folder", smoke.root, tmp_path)
    refused(capsys, ["study", "--out", blocker, *common(smoke.root)], "not a folder", smoke.root, tmp_path)


def test_study_pointing_at_a_file_is_refused(smoke, tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text("source,target\n")
    refused(capsys, ["correlate", "--study", table, *common(smoke.root)], "is a file", smoke.root, tmp_path)
    refused(capsys, ["rank-sources", "--target", "mnist", "--study", table, *common(smoke.root)], "is a file",
            smoke.root, tmp_path)


def test_unknown_option_and_missing_argument_are_one_line(smoke, capsys):
    refused(capsys, [*SRC_TGT, "--lambda3", "1", *common(smoke.root)], "--lambda3", smoke.root)
    refused(capsys, ["transfer", "--source", "mnist", *common(smoke.root)], "--target", smoke.root)
    refused(capsys, ["nosuchcommand"], "nosuchcommand")
