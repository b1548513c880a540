"""A small 'smoke' store with a finished study, built once per test process and shared.

Both ``tests/test_study.py`` and ``tests/test_notebooks.py`` call :func:`smoke_study`; the
store lives in a temp folder keyed by the process id and is removed at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

DOMAINS = ["mnist", "animals", "gtsrb"]
LAMBDAS = (0.4, 0.7, 1.0)
BACKBONE = "micro"  # the smoke preset's backbone (train.zoo.PRESETS["smoke"])
BACKBONE_ID = f"{BACKBONE}-smoke"  # the store folder `diag ... --preset smoke` resolves to

_CACHE: dict = {}


@contextlib.contextmanager
def one_thread():
    """torch on one thread: on a shared 2-core box two threads spin and run ~5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def smoke_root() -> Path:
    return Path(tempfile.gettempdir()) / f"tvdiag-smoke-{os.getpid()}"


def smoke_store():
    """Store with the smoke-preset zoo of :data:`DOMAINS` (built on first call)."""
    if "store" not in _CACHE:
        from train.store import Store
        from train.zoo import Zoo, preset

        root = smoke_root()
        atexit.register(shutil.rmtree, root, True)
        store = Store(root, BACKBONE_ID)
        with one_thread():
            Zoo(store, preset("smoke"), progress=False).build(DOMAINS)
        _CACHE["store"] = store
    return _CACHE["store"]


def smoke_study():
    """(store, study dir, table) of the study over :data:`DOMAINS` at :data:`LAMBDAS`, no curvature."""
    if "study" not in _CACHE:
        from diag.study.run import run_study, StudySettings

        store = smoke_store()
        out = store.study_dir("allpairs")
        with one_thread():
            df = run_study(store, DOMAINS, StudySettings(lambda2s=LAMBDAS, curvature=False), out_dir=out, progress=False)
        _CACHE["study"] = (store, out, df)
    return _CACHE["study"]


#: The method study smoke run: two domains, one λ2, eq. 8 and the universal mix (no curvature to build).
METHOD_DOMAINS = ["mnist", "gtsrb"]
METHODS = ("plain", "mix")


def smoke_method_study():
    """(store, study dir, table) of :data:`METHODS` over :data:`METHOD_DOMAINS` at λ2 = 0.7 (own folder)."""
    if "methods" not in _CACHE:
        from diag.study.run import run_study, StudySettings

        store = smoke_store()
        out = store.study_dir("methods")
        with one_thread():
            df = run_study(store, METHOD_DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False, methods=METHODS),
                           out_dir=out, progress=False)
        _CACHE["methods"] = (store, out, df)
    return _CACHE["methods"]
