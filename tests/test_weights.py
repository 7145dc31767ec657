"""Loading weights: formats, strictness, damaged files, safety and host memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import tiny_config
from model.errors import CheckpointError
from model.nn.anydoor import AnyDoorModel
from tests.conftest import REFERENCE

WEIGHTS = REFERENCE / "case_a" / "model.safetensors"
CONFIG = REFERENCE / "case_a" / "model.yaml"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(WEIGHTS)


def _probe(model: AnyDoorModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    return model.predict_noise(x, 500, ctx, torch.rand(1, 4, 128, 128, generator=g))


class _RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_lightning_ckpt_with_optimizer_state_and_foreign_objects(tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "code-was-executed"
    ckpt = tmp_path / "epoch=1-step=8687.ckpt"
    torch.save(
        {
            "epoch": 1,
            "global_step": 8687,
            "pytorch-lightning_version": "1.5.0",
            "state_dict": {k: v.float() for k, v in state.items()},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(64, 64)}}, "param_groups": [{"lr": 1e-5}]}],
            "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.1)}},
            "hyper_parameters": {"danger": _RunsCode(marker)},
        },
        ckpt,
    )
    from_ckpt = AnyDoorModel.from_checkpoint(ckpt, CONFIG, device="cpu")
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    from_st = AnyDoorModel.from_checkpoint(WEIGHTS, CONFIG, device="cpu")
    torch.testing.assert_close(_probe(from_ckpt), _probe(from_st), rtol=0, atol=0)


def test_safetensors_loads_strictly_in_eval_mode() -> None:
    model = AnyDoorModel.from_checkpoint(WEIGHTS, CONFIG, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.compute_dtype == torch.float32 and model.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_missing_key_is_named(tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    sd = dict(state)
    del sd["control_model.zero_convs.3.0.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing keys: control_model\.zero_convs\.3\.0\.weight"):
        AnyDoorModel.from_checkpoint(_save(tmp_path, sd), CONFIG, device="cpu")


def test_unexpected_key_is_named(tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    sd = dict(state)
    sd["model_ema.decay"] = torch.tensor(0.999)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: model_ema\.decay"):
        AnyDoorModel.from_checkpoint(_save(tmp_path, sd), CONFIG, device="cpu")


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    sd = dict(state)
    sd["cond_stage_model.projector.weight"] = torch.zeros(16, 64)
    expected = r"cond_stage_model\.projector\.weight: expected \[32, 64\], found \[16, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        AnyDoorModel.from_checkpoint(_save(tmp_path, sd), CONFIG, device="cpu")


def test_released_config_rejects_tiny_weights_listing_the_problem() -> None:
    with pytest.raises(CheckpointError, match="wrong shapes") as info:
        AnyDoorModel.from_checkpoint(WEIGHTS, device="cpu")  # default config = released model
    assert "missing keys" in str(info.value)  # ViT-g has 40 blocks, the tiny one 2


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tmp_path: Path, state, suffix: str) -> None:  # type: ignore[no-untyped-def]
    full = tmp_path / f"full{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": dict(state)}, full)
    else:
        save_file(dict(state), full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(cut.name)):
        AnyDoorModel.from_checkpoint(cut, CONFIG, device="cpu")


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    odd = tmp_path / "weights.onnx"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unknown weights format '.onnx'"):
        AnyDoorModel.from_checkpoint(odd, CONFIG)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        AnyDoorModel.from_checkpoint(tmp_path / "nope.safetensors", CONFIG)


def test_schedule_mismatch_is_detected(tmp_path: Path, state) -> None:  # type: ignore[no-untyped-def]
    sd = dict(state)
    sd["alphas_cumprod"] = sd["alphas_cumprod"] * 0.9
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        AnyDoorModel.from_checkpoint(_save(tmp_path, sd), CONFIG, device="cpu")


def test_dtype_choices() -> None:
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        AnyDoorModel.from_checkpoint(WEIGHTS, CONFIG, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        AnyDoorModel.from_checkpoint(WEIGHTS, CONFIG, device="cpu", dtype="int8")
    bf16 = AnyDoorModel.from_checkpoint(WEIGHTS, CONFIG, device="cpu", dtype="bf16")
    assert bf16.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert bf16.first_stage_model.decoder.conv_out.weight.dtype == torch.float32  # the VAE stays fp32


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from model.nn.anydoor import AnyDoorModel
    from model.config import AnyDoorConfig, ControlNetConfig, DinoV2Config, UNetConfig, VAEConfig

    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

    trunk = dict(model_channels=64, context_dim=256)
    cfg = AnyDoorConfig(unet=UNetConfig(**trunk), controlnet=ControlNetConfig(**trunk), vae=VAEConfig(ch=64),
                        dino=DinoV2Config(embed_dim=384, depth=6, num_heads=6, context_dim=256))
    base = anon_mb()
    peak = [base]
    done = threading.Event()
    def watch():
        while not done.is_set():
            peak.append(anon_mb())
            time.sleep(0.001)
    thread = threading.Thread(target=watch)
    thread.start()
    model = AnyDoorModel.from_checkpoint(sys.argv[1], cfg, device="cpu")
    done.set()
    thread.join()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(json.dumps({"peak_mb": max(peak) - base, "model_mb": size}))
    """
)


def test_loading_holds_one_copy_of_the_weights(tmp_path: Path) -> None:
    """A float16 file loaded for float32 compute: anonymous memory peaks near one float32 copy, not two."""
    from model.config import AnyDoorConfig, ControlNetConfig, DinoV2Config, UNetConfig, VAEConfig

    trunk = dict(model_channels=64, context_dim=256)
    cfg = AnyDoorConfig(unet=UNetConfig(**trunk), controlnet=ControlNetConfig(**trunk), vae=VAEConfig(ch=64),
                        dino=DinoV2Config(embed_dim=384, depth=6, num_heads=6, context_dim=256))
    model = AnyDoorModel(cfg)
    path = tmp_path / "medium.safetensors"
    save_file({k: (v.half() if v.ndim > 1 else v).contiguous() for k, v in model.state_dict().items()}, path)
    del model
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["model_mb"] > 250
    assert figures["peak_mb"] < 1.25 * figures["model_mb"] + 40, figures


def test_tiny_preset_builds_without_a_file() -> None:
    model = AnyDoorModel(tiny_config())
    assert set(model.state_dict()) == set(load_file(WEIGHTS))
