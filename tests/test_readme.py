"""The README's Python example runs as written (on the shared smoke store, so nothing is rebuilt)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from _smoke import smoke_store

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    store = smoke_store()
    env = {**os.environ, "TVDIAG_STORE": str(store.root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(README.parent)}
    proc = subprocess.run([sys.executable, "-c", blocks[0]], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transfer mnist → gtsrb" in proc.stdout and "control: random" in proc.stdout
    # the example reused the store: no artifact was added
    assert not list(Path(store.root).rglob("*.tmp"))
