"""The first-build notice says what is built, and states no measured time (the README holds those)."""

import re

from diag.runtime.context import Context
from diag.runtime.shards import _announce_first_build


def test_first_build_notice_names_the_build_and_no_measurement(tmp_path, capsys):
    _announce_first_build(Context(tmp_path, preset="smoke"), ["cifar10", "dtd"], [0, 1])
    err = capsys.readouterr().err
    assert "building θ_base by contrastive pretraining, then θ_ft, φ and θ_ft* of 2 domain(s) for seed(s) 0, 1" in err
    assert "long on a CPU" in err
    assert not re.search(r"\d+\s*(min|minutes|s|seconds|h|hours)\b|\bcores?\b", err), err
    _announce_first_build(Context(tmp_path, preset="default"), ["cifar10"], [0])  # tiny: the repository ships it
    assert "building θ_base (copied from the repository), then" in capsys.readouterr().err
    _announce_first_build(Context(tmp_path, preset="default", rebuild=("base",)), ["cifar10"], [0])
    assert "θ_base by contrastive pretraining" in capsys.readouterr().err


def test_first_build_notice_is_silent_when_quiet_or_built(tmp_path, capsys):
    _announce_first_build(Context(tmp_path, preset="smoke", progress=False), ["cifar10"], [0])
    ctx = Context(tmp_path, preset="smoke")
    ctx.store.base_path().parent.mkdir(parents=True, exist_ok=True)
    ctx.store.base_path().write_bytes(b"")
    _announce_first_build(ctx, ["cifar10"], [0])
    assert capsys.readouterr().err == ""
