"""CLIP's image tower (``model.nn.clip``), the CLIP-I of ``anydoor eval``: checked against Hugging Face's
``CLIPVisionModelWithProjection`` on tiny random weights, in each checkpoint layout the loader reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.nn.clip import CLIP_MEAN, CLIP_STD, load_clip_vision
from model.weights.checkpoint import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS = 64, 4  # 16 per head: not OpenAI's 64, so the head count has to come from config.json or the caller


def tiny_hf(activation: str = "quick_gelu", image_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
        image_size=image_size, patch_size=16, projection_dim=24, hidden_act=activation)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # the default init leaves the norms at 1/0 and the class embedding small: perturb all
        for value in model.state_dict().values():
            value.add_(torch.randn_like(value) * 0.05)
    return model


def hf_embeddings(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


def openai_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same weights as OpenAI's CLIP names them (the whole model's state dict: a text tower beside)."""
    sd = model.state_dict()
    out = {"visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous(),
           "token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.tensor(4.6)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{ours}.{kind}"] = sd[f"vision_model.{theirs}.{kind}"]
    for i in range(2):
        hf, oa = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oa + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[oa + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
            out[oa + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
            out[oa + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
            out[oa + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[oa + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_a_hugging_face_checkpoint_with_its_config_gives_their_embeddings(tmp_path: Path,
                                                                          images: torch.Tensor) -> None:
    model = tiny_hf()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": model.config.to_dict()}))
    ours = load_clip_vision(tmp_path / "model.safetensors")
    assert (ours.config.heads, ours.config.image_size, ours.config.embed_dim) == (HEADS, 64, 24)
    torch.testing.assert_close(ours(images), hf_embeddings(model, images), atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_openai_state_dicts_and_torchscript_archives_load_key_for_key(tmp_path: Path, images: torch.Tensor) -> None:
    model = tiny_hf()
    expected = hf_embeddings(model, images)
    torch.save(openai_layout(model), tmp_path / "ViT-tiny.pt")
    ours = load_clip_vision(tmp_path / "ViT-tiny.pt", heads=HEADS)
    torch.testing.assert_close(ours(images), expected, atol=2e-5, rtol=1e-4)

    class Clip(torch.nn.Module):  # OpenAI ships the whole model scripted: its tower is under ``visual``
        def __init__(self) -> None:
            super().__init__()
            self.visual = ours

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    torch.jit.trace(Clip(), images).save(str(tmp_path / "scripted.pt"))
    scripted = load_clip_vision(tmp_path / "scripted.pt", heads=HEADS)
    torch.testing.assert_close(scripted(images), expected, atol=2e-5, rtol=1e-4)
    # The default head count is OpenAI's width / 64: one head here, and other numbers.
    assert load_clip_vision(tmp_path / "ViT-tiny.pt").config.heads == 1


def test_gelu_towers_and_other_input_sizes(tmp_path: Path) -> None:
    model = tiny_hf("gelu", image_size=32)
    torch.save(openai_layout(model), tmp_path / "gelu.pt")
    ours = load_clip_vision(tmp_path / "gelu.pt", heads=HEADS, activation="gelu")
    small = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(small), hf_embeddings(model, small), atol=2e-5, rtol=1e-4)
    assert ours(torch.rand(2, 3, 224, 224)).shape == (2, 24)  # the eval's 224 views are resized to its 32


def test_files_that_are_not_clip_image_towers_are_refused_by_name(tmp_path: Path) -> None:
    save_file({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a CLIP ViT image tower: no conv1.weight"):
        load_clip_vision(tmp_path / "other.safetensors")
    broken = openai_layout(tiny_hf())
    del broken["visual.transformer.resblocks.1.ln_2.bias"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing transformer.resblocks.1.ln_2.bias"):
        load_clip_vision(tmp_path / "broken.pt", heads=HEADS)
    with pytest.raises(CheckpointError, match="does not split into 3 heads"):
        load_clip_vision(tmp_path / "broken.pt", heads=3)
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        load_clip_vision(tmp_path / "absent.pt")
