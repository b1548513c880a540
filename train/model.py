"""The self-explaining CLIP classifier of the paper (§4.1, Fig. 1).

A vision tower f_θ maps an image to M + 1 tokens. A fixed head W ∈ R^{K×C} of class-name
text embeddings maps the projected CLS token to logits l = s · normalize(f_CLS) W and every
projected patch token to unnormalised patch attributions Φ̃ = (f_patches W)ᵀ ∈ R^{C×M}.
Prediction-only mode is the same model reading only the logits. θ is the vision tower's
parameters; W and the logit scale s are buffers, never trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.errors import DataError


class SelfExplainingCLIP(nn.Module):
    """Vision tower + fixed text head producing logits and patch attributions.

    Args:
        visual: an open_clip ``VisionTransformer``.
        head: W, shape (K, C): normalised class text embeddings as columns.
        logit_scale: s, the temperature multiplying the cosine logits.
    """

    def __init__(self, visual: nn.Module, head: torch.Tensor, logit_scale: float = 100.0):
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self) -> int:
        return int(self.head.shape[1])

    def set_head(self, head: torch.Tensor) -> None:
        """Swap the domain head W (same embedding width K)."""
        if head.shape[0] != self.head.shape[0]:
            raise DataError(f"Head width {head.shape[0]} does not match the model's {self.head.shape[0]}")
        self.head = head.detach().clone().to(self.head.device, self.head.dtype)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.visual(x)
        return pooled, tokens @ self.visual.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from the projected, normalised CLS feature."""
        pooled, _ = self.visual(x)
        return self.logit_scale * F.normalize(pooled, dim=-1) @ self.head

    def explain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and unnormalised patch attributions Φ̃ (B, C, M) in one forward pass."""
        pooled, patches = self._tokens(x)
        logits = self.logit_scale * F.normalize(pooled, dim=-1) @ self.head
        phi = (patches @ self.head).transpose(1, 2)
        return logits, phi


@torch.no_grad()
def text_head(clip: nn.Module, tokenizer, classnames, templates, batch_size: int = 256) -> torch.Tensor:
    """W (K, C): per class, the normalised mean of normalised template embeddings.

    Follows CLIP's zero-shot recipe: W_{·,c} = normalize(mean_t normalize(E(template_t(c)))).
    """
    if not classnames or not templates:
        raise DataError("A head needs at least one class name and one template")
    was_training = clip.training
    clip.eval()
    texts = [t.format(c=c) for c in classnames for t in templates]
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size])
        chunks.append(F.normalize(clip.encode_text(tokens), dim=-1))
    emb = torch.cat(chunks).reshape(len(classnames), len(templates), -1).mean(dim=1)
    clip.train(was_training)
    return F.normalize(emb, dim=-1).T.contiguous()


def visual_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """θ as a name → tensor dict with the ``visual.`` prefix (the task-vector key space)."""
    return {f"visual.{k}": v for k, v in model.visual.state_dict().items()}


def load_visual_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load θ (``visual.``-prefixed keys) into the model, strictly."""
    stripped = {k.removeprefix("visual."): v for k, v in state.items()}
    model.visual.load_state_dict(stripped, strict=True)
