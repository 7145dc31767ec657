"""The demo's "Reference Mask Refine" network against upstream's numbers (reference case ``mask_refine_a``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.nn.mask_refine import (
    MaskRefiner,
    convert_mask_refiner,
    load_mask_refiner_state_dict,
    mask_refiner_state_dict_keys,
)

CASE = Path(__file__).parent / "fixtures" / "reference" / "mask_refine_a"
WEIGHTS = CASE / "mask_refine.safetensors"


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


@pytest.fixture(scope="module")
def refiner() -> MaskRefiner:
    return MaskRefiner.from_checkpoint(WEIGHTS, device="cpu")


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(CASE / "image.png").convert("RGB"))
    mask = np.asarray(Image.open(CASE / "coarse_mask.png").convert("L")) > 128
    return image, mask


@pytest.fixture(scope="module")
def probability(refiner: MaskRefiner, inputs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return refiner.probability(*inputs)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS))


def _save_pth(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_probability_matches_upstream(probability: np.ndarray) -> None:
    settings = json.loads((CASE / "case.json").read_text())
    expected = np.load(CASE / "expected.npz")["probability"]
    assert probability.shape == expected.shape == (settings["height"], settings["width"])
    assert probability.dtype == np.float32
    err = rel_l2(probability, expected)
    print(f"mask_refine_a probability relative L2: {err:.3e}")
    assert err < 1e-4


@pytest.mark.parity
def test_refined_mask_matches_upstream(
    refiner: MaskRefiner, inputs: tuple[np.ndarray, np.ndarray], probability: np.ndarray
) -> None:
    expected = np.asarray(Image.open(CASE / "refined_mask.png").convert("L")) > 128
    refined = refiner(*inputs)
    assert refined.dtype == np.bool_ and refined.shape == expected.shape
    decided = np.abs(probability - 0.5) > 1e-3
    assert decided.mean() > 0.9
    assert np.array_equal(refined[decided], expected[decided])
    # the network changes the coarse mask: the test is not passing on an identity
    assert (refined != inputs[1]).sum() > 100


@pytest.mark.parity
def test_upstream_pth_checkpoint_gives_the_same_output(
    tmp_path: Path, state: dict[str, torch.Tensor], inputs: tuple[np.ndarray, np.ndarray], probability: np.ndarray
) -> None:
    pth = _save_pth({"state_dict": state}, tmp_path / "coarse_mask_refine.pth")
    assert np.array_equal(MaskRefiner.from_checkpoint(pth, device="cpu").probability(*inputs), probability)


def test_bare_and_module_prefixed_state_dicts_load(
    tmp_path: Path, state: dict[str, torch.Tensor], inputs: tuple[np.ndarray, np.ndarray], probability: np.ndarray
) -> None:
    bare = _save_pth(dict(state), tmp_path / "bare.pth")
    prefixed = _save_pth({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pth")
    for path in (bare, prefixed):
        assert np.array_equal(MaskRefiner.from_checkpoint(path, device="cpu").probability(*inputs), probability)


def test_conversion_round_trip(
    tmp_path: Path, state: dict[str, torch.Tensor], inputs: tuple[np.ndarray, np.ndarray], probability: np.ndarray
) -> None:
    pth = _save_pth({"state_dict": state}, tmp_path / "coarse_mask_refine.pth")
    out = convert_mask_refiner(pth, tmp_path / "weights" / "mask_refine.safetensors")
    converted = load_file(str(out))
    assert converted.keys() == state.keys()
    assert all(v.dtype == torch.float32 for k, v in converted.items() if not k.endswith("num_batches_tracked"))
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert np.array_equal(MaskRefiner.from_checkpoint(out, device="cpu").probability(*inputs), probability)
    assert not list(out.parent.glob("*.tmp"))


def test_state_dict_keys_match_upstream_checkpoint(state: dict[str, torch.Tensor]) -> None:
    keys = mask_refiner_state_dict_keys()
    assert len(keys) == len(state) == 326
    assert keys == {k: tuple(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------- bad weights


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    marker = tmp_path / "pwned"
    pth = _save_pth({"state_dict": dict(state), "hook": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights-only"):
        MaskRefiner.from_checkpoint(pth, device="cpu")
    assert not marker.exists()


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    bad = dict(state)
    del bad["feature_extractor.head.weight"]
    bad["feature_extractor.extra.weight"] = torch.zeros(3)
    bad["maps_transform.3.scale"] = torch.ones(2)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(CheckpointError) as err:
        MaskRefiner.from_checkpoint(path, device="cpu")
    message = str(err.value)
    assert "missing keys: feature_extractor.head.weight" in message
    assert "unexpected keys: feature_extractor.extra.weight" in message
    assert "mis-shaped keys: maps_transform.3.scale (2,) (expected (1,))" in message


def test_non_tensor_entries_are_refused(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    pth = _save_pth({"state_dict": {**state, "epoch": 3}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="epoch"):
        load_mask_refiner_state_dict(pth)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_checkpoint_error(tmp_path: Path, state: dict[str, torch.Tensor], suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        _save_pth({"state_dict": state}, whole)
    else:
        save_file(state, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        MaskRefiner.from_checkpoint(cut, device="cpu")
    with pytest.raises(CheckpointError):
        MaskRefiner.from_checkpoint(tmp_path / f"absent{suffix}", device="cpu")


# ---------------------------------------------------------------------------------------------------- sizes, inputs


@pytest.mark.parametrize("size", [(17, 23), (1, 1), (5, 3), (257, 97), (61, 250)])
def test_arbitrary_sizes(refiner: MaskRefiner, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, dtype=np.uint8)
    mask[size[0] // 4 : size[0] // 4 * 3 + 1, size[1] // 4 : size[1] // 4 * 3 + 1] = 1
    p = refiner.probability(image, mask)
    assert p.shape == size and p.dtype == np.float32
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    refined = refiner(image, mask.astype(bool))
    assert refined.shape == size and refined.dtype == np.bool_


def test_read_only_and_strided_inputs(refiner: MaskRefiner, inputs: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = inputs
    flipped = image[:, ::-1]
    flipped.flags.writeable = False
    expected = refiner.probability(np.ascontiguousarray(flipped), mask[:, ::-1].copy())
    assert np.array_equal(refiner.probability(flipped, mask[:, ::-1]), expected)


@pytest.mark.parametrize(
    ("image", "mask", "argument"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), bool), "image"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), "image"),
        (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8), bool), "image"),
        (np.zeros((0, 8, 3), np.uint8), np.zeros((0, 8), bool), "image"),
        ([[0, 0, 0]], np.zeros((1, 1), bool), "image"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), bool), "mask"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 1), bool), "mask"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), "mask"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8), "mask"),
    ],
)
def test_input_validation(refiner: MaskRefiner, image: object, mask: object, argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}: "):
        refiner.probability(image, mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"^{argument}: "):
        refiner(image, mask)  # type: ignore[arg-type]


def test_default_device_and_eval_mode(refiner: MaskRefiner) -> None:
    default = MaskRefiner.from_checkpoint(WEIGHTS)
    assert default.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not default.net.training and not any(p.requires_grad for p in default.net.parameters())
    assert all(p.dtype == torch.float32 for p in refiner.net.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_close_to_cpu(inputs: tuple[np.ndarray, np.ndarray], probability: np.ndarray) -> None:
    # cuDNN may run float32 convolutions in TF32, hence the looser bound than the CPU parity
    p = MaskRefiner.from_checkpoint(WEIGHTS, device="cuda").probability(*inputs)
    assert rel_l2(p, probability) < 1e-2
    decided = np.abs(probability - 0.5) > 5e-2
    assert np.array_equal((p > 0.5)[decided], (probability > 0.5)[decided])
