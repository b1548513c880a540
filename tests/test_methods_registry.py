"""One registry of transfer methods: every command, the study and the tiers read it."""

from __future__ import annotations

import pytest

from diag.cli import build_parser
from diag.decide.recommend import TIER_METHODS, tier_methods
from diag.study.run import StudySettings
from diag.transfer.methods import CURVED_METHODS, METHODS, MIX_METHODS, REGISTRY, TIERS, candidates
from train.errors import UnknownNameError


def _choices(command: str, option: str) -> tuple:
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and command in a.choices)
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


def test_commands_offer_the_registry():
    assert _choices("transfer", "--method") == METHODS
    assert _choices("study", "--methods") == METHODS
    assert _choices("rank-sources", "--methods") == TIER_METHODS[max(TIERS)]


def test_derived_lists_follow_the_registry():
    assert METHODS == ("plain", "project", "precondition", "blocks", "mix", "mix-ranked", "mix-matched",
                       "mix-ranked-matched")
    assert MIX_METHODS == tuple(n for n, m in REGISTRY.items() if m.mix) == ("mix", "mix-ranked", "mix-matched",
                                                                              "mix-ranked-matched")
    assert set(CURVED_METHODS) == {"project", "precondition", "blocks"}
    assert TIER_METHODS == {0: ("plain",), 1: ("plain", "project", "precondition"),
                            2: ("plain", "project", "precondition", "blocks")}
    assert tier_methods(1, ["precondition", "mix"]) == ("plain", "precondition")
    for tier, names in TIER_METHODS.items():  # a tier's curvature covers what its methods need
        needs = {REGISTRY[n].curvature for n in names} - {None}
        assert needs <= {0: set(), 1: {"eig", "diag"}, 2: {"eig", "diag", "operator"}}[tier], (tier, needs)


def test_unknown_methods_are_refused_everywhere():
    with pytest.raises(UnknownNameError, match="repair method"):
        candidates("sharpen", None, None)
    with pytest.raises(UnknownNameError, match="study method"):
        StudySettings(methods=("sharpen",))
    with pytest.raises(UnknownNameError, match="recommendation method"):
        tier_methods(2, ["sharpen"])
