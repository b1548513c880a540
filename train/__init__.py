"""tvdiag training core: data, the self-explaining CLIP, losses, fine-tuning, task vectors, the store."""

__version__ = "0.1.0"
