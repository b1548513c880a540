import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# CLI commands in tests build in this process unless a test asks for --workers (tests/test_distributed_cli.py)
os.environ.setdefault("TVDIAG_WORKERS", "1")


@pytest.fixture(scope="session")
def tiny_backbone():
    from train.backbones import create_backbone

    return create_backbone("tiny", seed=0)
