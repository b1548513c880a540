"""``diag transfer --method``: a curvature-aware or multi-source vector beside plain eq. 8."""

from __future__ import annotations

import json

from _smoke import DOMAINS, one_thread, smoke_store
from diag.cli import main

PLAIN = "plain eq. 8 (same λ2)"


def _run(capsys, *argv):
    with one_thread():
        code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_mix_method_scores_beside_plain_and_never_mixes_the_target(capsys):
    root = str(smoke_store().root)
    common = ["transfer", "--preset", "smoke", "--store", root, "--source", "mnist", "--target", "animals",
              "--domains", *DOMAINS, "--json", "--quiet"]
    plain = _run(capsys, *common)
    mixed = _run(capsys, *common, "--method", "mix")
    rows = {r["model"]: r for r in mixed["rows"]}
    assert mixed["method"] == "mix" and "method" not in plain
    # the plain row of a method run is exactly `--method plain`'s proposed model
    plain_prop = next(r for r in plain["rows"] if r["model"] == "proposed")
    assert {k: v for k, v in rows[PLAIN].items() if k != "model"} == \
        {k: v for k, v in plain_prop.items() if k != "model"}
    assert mixed["repair"]["predicted_loss_increase"] is None  # no curvature given: absent, not NaN
    assert 0 <= mixed["repair"]["val_accuracy"] <= 1
    # the mix is the uniform mix of every other domain's τ*: the target's own τ* never enters it
    parts = dict(p.split(":") for p in mixed["repair"]["vector"].removeprefix("mix of ").split(", "))
    assert set(parts) == set(DOMAINS) - {"animals"}
    assert all(abs(float(w) - 1 / len(parts)) < 1e-3 for w in parts.values())
