"""``anydoor weights convert|download`` end to end on the tiny reference model."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.cli.weights import register
from model.config import load_config
from model.nn.anydoor import AnyDoorModel
from model.weights.checkpoint import SCHEDULE_KEYS, WeightsFile

CASE = Path(__file__).parent / "fixtures" / "reference" / "case_a"
WEIGHTS = CASE / "model.safetensors"
CONFIG = CASE / "model.yaml"


def build_parser() -> argparse.ArgumentParser:
    from service.cli import build_parser as real

    return real()


def anydoor(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.func(args) or 0)


def test_the_anydoor_command_line_has_the_weights_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["weights", "download", "http://x/y", "--sha256", "0" * 64])
    assert args.func.__module__ == "model.cli.weights"
    assert register.__module__ == "model.cli.weights"


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint laid out as the released one: fp32 state_dict, Adam state, Lightning bookkeeping."""
    state = {k: t.float() for k, t in WeightsFile(WEIGHTS).items()}
    first = next(k for k in state if k.startswith("control_model."))
    ckpt = {
        "epoch": 1,
        "global_step": 8687,
        "pytorch-lightning_version": "1.5.0",
        "state_dict": state,
        "callbacks": {"ModelCheckpoint": {"best_model_path": "", "monitor": None}},
        "optimizer_states": [
            {
                "state": {
                    0: {
                        "step": 8687,
                        "exp_avg": torch.zeros_like(state[first]),
                        "exp_avg_sq": torch.zeros_like(state[first]),
                    }
                },
                "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [],
        # Lightning pickles hyper-parameters as its own classes; Namespace stands in for one outside the
        # weights-only allow-list, so the loader's restricted unpickler is exercised too.
        "hyper_parameters": argparse.Namespace(learning_rate=1e-5, sd_locked=False),
    }
    path = tmp_path_factory.mktemp("ckpt") / "epoch=1-step=8687.ckpt"
    torch.save(ckpt, path)
    return path


def test_convert_writes_fp16_safetensors_with_the_same_keys(
    lightning_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "anydoor-fp16.safetensors"
    assert anydoor("weights", "convert", str(lightning_ckpt), str(out), "--config", str(CONFIG)) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in captured.err

    source = WeightsFile(WEIGHTS)
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(source.keys())
        schedule = [k for k in f.keys() if k in SCHEDULE_KEYS]
        assert len(schedule) >= 12
        wrong_dtype, changed = [], []
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.dtype != (torch.float32 if key in SCHEDULE_KEYS else torch.float16):
                wrong_dtype.append(f"{key}: {tensor.dtype}")
            # The fixture's values are exactly representable in fp16, so the round trip is exact.
            if not torch.equal(tensor.float(), source.tensor(key).float()):
                changed.append(key)
        assert wrong_dtype == [] and changed == []
        assert f.metadata()["dtype"] == "fp16"

    config = load_config(CONFIG)
    model = AnyDoorModel.from_checkpoint(out, config, device="cpu", dtype="fp32")
    reference = AnyDoorModel.from_checkpoint(WEIGHTS, config, device="cpu", dtype="fp32")
    theirs = reference.state_dict()
    assert [name for name, value in model.state_dict().items() if not torch.equal(value, theirs[name])] == []


def test_convert_to_bf16(lightning_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "anydoor-bf16.safetensors"
    assert (
        anydoor(
            "weights", "convert", str(lightning_ckpt), str(out), "--config", str(CONFIG), "--dtype", "bf16", "--quiet"
        )
        == 0
    )
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("alphas_cumprod").dtype == torch.float32
        assert f.get_tensor("control_model.input_hint_block.0.weight").dtype == torch.bfloat16


def test_convert_with_the_wrong_config_names_the_keys(
    lightning_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert anydoor("weights", "convert", str(lightning_ckpt), str(out), "--config", "released") == 1
    err = capsys.readouterr().err
    assert err.startswith("anydoor weights convert: error:")
    # The released ViT-g has 40 blocks where the tiny one has 2, and every network is wider.
    assert "missing keys: cond_stage_model.model.blocks." in err
    assert "wrong shapes" in err and "expected [1536], found [64]" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.ckpt", "out.safetensors"], "checkpoint not found"),
        (["{ckpt}", "out.bin"], "must end in .safetensors"),
        (["{ckpt}", "out.safetensors", "--config", "nope.yaml"], "config 'nope.yaml'"),
    ],
)
def test_convert_rejects_bad_arguments(
    lightning_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert anydoor("weights", "convert", *[a.format(ckpt=lightning_ckpt) for a in args]) == 1
    assert message in capsys.readouterr().err


def test_convert_rejects_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert anydoor("weights", "convert", str(bad), str(tmp_path / "o.safetensors"), "--config", str(CONFIG)) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_download_command(
    case_a_http: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    url = f"{case_a_http}/model.safetensors"
    assert anydoor("weights", "download", url, "--sha256", sha, "--dest", str(tmp_path / "w")) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "w" / "model.safetensors")
    assert "100.0%" in out.err
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == WEIGHTS.read_bytes()

    # Without --dest it lands in the cache, where the service's ANYDOOR_WEIGHTS=URL finds it.
    monkeypatch.setenv("ANYDOOR_CACHE_DIR", str(tmp_path / "cache"))
    assert anydoor("weights", "download", url, "--sha256", sha, "--quiet") == 0
    cached = Path(capsys.readouterr().out.strip())
    assert cached.is_relative_to(tmp_path / "cache") and cached.name == "model.safetensors"

    assert anydoor("weights", "download", url, "--sha256", "f" * 64, "--dest", str(tmp_path / "x"), "--quiet") == 1
    assert "sha256 is" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_download_requires_a_checksum(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        anydoor("weights", "download", "http://127.0.0.1:9/w.safetensors")
    assert "--sha256" in capsys.readouterr().err


def test_convert_refiner_writes_a_loadable_safetensors(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from model.nn.mask_refine import MaskRefiner

    source = Path(__file__).parent / "fixtures" / "reference" / "mask_refine_a" / "mask_refine.safetensors"
    pth = tmp_path / "coarse_mask_refine.pth"
    torch.save({"state_dict": load_file(source)}, pth)
    assert anydoor("weights", "convert-refiner", str(pth), str(tmp_path / "r.safetensors")) == 0
    assert MaskRefiner.from_checkpoint(tmp_path / "r.safetensors", device="cpu") is not None
    assert anydoor("weights", "convert-refiner", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")) == 1
