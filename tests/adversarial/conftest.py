"""Shared fixtures of the adversarial suite: one smoke store per session, copied per test.

Every refusal test checks the same contract through ``_helpers.refused``: exit code 2,
exactly one stderr line naming the bad value, empty stdout (the commands run with
``--json``) and a store tree byte-identical before and after (``tree_hash`` covers folders
too, so an empty folder left behind is a change).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests._smoke import one_thread, smoke_store


@pytest.fixture(scope="session")
def smoke():
    """The session's smoke store (mnist, animals, gtsrb), built once on one thread."""
    return smoke_store()


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture()
def store_copy(smoke, tmp_path) -> Path:
    """A private copy of the smoke store root that a test may damage (mtimes preserved)."""
    dst = tmp_path / "store"
    shutil.copytree(smoke.root, dst)
    return dst
