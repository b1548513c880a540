import pytest
import torch
import torch.nn.functional as F

from train.backbones import create_backbone
from train.errors import ArtifactError, UnknownNameError
from train.model import SelfExplainingCLIP, text_head


def test_logits_and_patch_attributions_follow_fig1(tiny_backbone):
    classes, templates = ("cat", "dog", "car"), ("a photo of a {c}.", "a drawing of a {c}.")
    head = text_head(tiny_backbone.clip, tiny_backbone.tokenizer, classes, templates)
    assert head.shape == (64, 3)
    assert torch.allclose(head.norm(dim=0), torch.ones(3), atol=1e-5)
    model = SelfExplainingCLIP(tiny_backbone.clip.visual, head, 10.0).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, phi = model.explain(x)
    assert logits.shape == (2, 3) and phi.shape == (2, 3, 16)
    assert torch.allclose(model(x), logits, atol=1e-5)
    # reference: CLIP's own image encoder for the logits, patch tokens projected by proj for Φ̃
    with torch.no_grad():
        feats = tiny_backbone.clip.encode_image(x)
        if isinstance(feats, tuple):
            feats = feats[0]
        assert torch.allclose(logits, 10.0 * F.normalize(feats, dim=-1) @ head, atol=1e-4)
        pooled, tokens = tiny_backbone.clip.visual(x)
        assert torch.allclose(phi, (tokens @ tiny_backbone.clip.visual.proj @ head).transpose(1, 2), atol=1e-5)


def test_unknown_backbone_lists_choices():
    with pytest.raises(UnknownNameError, match="Unknown backbone 'vit-b-33'.*tiny"):
        create_backbone("vit-b-33")


def test_vit_b32_local_checkpoint_roundtrip(tmp_path):
    """The real-weights path: ViT-B-32 with random weights saved locally and loaded back by name + path."""
    from safetensors.torch import save_file

    original = create_backbone("ViT-B-32", seed=1)
    path = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in original.clip.state_dict().items()}, str(path))
    loaded = create_backbone("ViT-B-32", checkpoint=path, seed=2)
    assert loaded.weights_hash() == original.weights_hash()
    assert loaded.config.num_patches == 49
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.clip.encode_image(x), original.clip.encode_image(x), atol=1e-5)
    # a legacy torch checkpoint is read with weights_only=True
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": original.clip.state_dict()}, legacy)
    assert create_backbone("ViT-B-32", checkpoint=legacy).weights_hash() == original.weights_hash()
    # a checkpoint of another architecture is refused with a clear error
    with pytest.raises(ArtifactError, match="does not match backbone"):
        create_backbone("tiny", checkpoint=path)
    del original, loaded
