"""Property-based tests (hypothesis) over names, store paths and numeric options."""

from __future__ import annotations

import argparse
import math
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diag.commands.options import ALPHA, LAMBDA, K, seed
from tests.adversarial._helpers import run, tree_hash
from train.errors import TvdiagError
from train.store import NAME_PATTERN, Store, check_name

NAME = re.compile(NAME_PATTERN + r"\Z")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# text biased towards path tricks
names = st.one_of(st.text(max_size=70), st.from_regex(r"[a-z0-9./_\- ]{0,12}", fullmatch=True),
                  st.sampled_from(["..", ".", "/", "~", "a/../b", "mnist/..", "\x00", "con", "ä"]))


@SETTINGS
@given(names)
def test_every_name_is_refused_or_a_safe_single_component(tmp_path, name):
    store = Store(tmp_path / "root", "tiny")
    try:
        paths = [store.head_path(name), store.vector_path(name, "ft"), store.curvature_dir(name),
                 store.attribution_path(name), store.study_dir(name)]
    except TvdiagError:
        assert not (NAME.match(name) and len(name) <= 64)
        return
    assert check_name(name) == name and NAME.match(name)
    root = (tmp_path / "root").resolve()
    for path in paths:
        assert root in path.resolve().parents
    assert not (tmp_path / "root").exists()  # computing a path creates nothing


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10 ** 30, max_value=10 ** 30),
                 st.text(max_size=8)))
def test_numeric_options_are_finite_and_in_range_or_refused(value):
    text = repr(value) if isinstance(value, float) else str(value)
    for parse, lo, hi in ((LAMBDA, -10, 10), (ALPHA, 0, 1), (K, 1, 1000), (seed, 0, 2 ** 63 - 1)):
        try:
            got = parse(text)
        except argparse.ArgumentTypeError as err:
            assert repr(text) in str(err)
            continue
        assert math.isfinite(got) and lo <= got <= hi


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, value=st.sampled_from(["nan", "inf", "1e30", "-1e400", "1e-400", "0.7", "x"]))
def test_cli_never_writes_and_always_answers_in_one_line(tmp_path, capsys, name, value):
    """Any target name with any λ2 on an empty store: one line, exit 2, nothing created."""
    before = tree_hash(tmp_path)
    code, out, err = run(capsys, ["transfer", "--source", "mnist", f"--target={name}", f"--lambda2={value}",
                                  "--store", tmp_path / "s", "--preset", "smoke", "--quiet", "--json"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert tree_hash(tmp_path) == before
