"""Reading, checking and converting AnyDoor weights.

* ``.safetensors``: read tensor by tensor (the file is memory-mapped), so loading holds one copy of the weights.
* ``.ckpt`` (the released Lightning checkpoint): loaded with ``mmap=True`` so the optimizer state it also carries
  is never read into memory, and never by plain pickle: first PyTorch's ``weights_only`` unpickler, and where the
  checkpoint holds other objects (Lightning callbacks, hyper-parameters), an unpickler that turns every class
  outside a small allow-list into an inert placeholder instead of importing and calling it.
"""

from __future__ import annotations

import collections
import pickle
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.errors import CheckpointError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # keys: model.config.DTYPE_NAMES
# The DDPM schedule buffers stay float32 in every conversion: they index the noise schedule, not the networks.
SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


class _Inert:
    """Stands in for any pickled object whose class is not allow-listed; its state is kept as data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        # torch's own tensor/storage rebuild helpers and dtypes: the only callables a state_dict needs.
        if module in ("torch._utils", "torch") and (name.startswith("_rebuild_") or name.endswith("Storage")):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Inert,), {"__module__": f"inert.{module}"})


_safe_pickle = types.SimpleNamespace(Unpickler=_SafeUnpickler, load=pickle.load, __name__="anydoor_safe_pickle")


def _load_ckpt(path: Path) -> Mapping[str, Any]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        pass  # a global outside the weights-only allow-list: retry with the inert unpickler below
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_safe_pickle)
    except Exception as exc:  # noqa: BLE001 - any failure here means a damaged or foreign file
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc


def _tensors_of(obj: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no state_dict in checkpoint")
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path}: the checkpoint's state_dict holds no tensors")
    return out


class WeightsFile:
    """A weights file opened for reading: key names, shapes, and tensors one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"weights file not found: {self.path}")
        self._st: Any = None
        self._sd: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(self.path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: cannot read safetensors file ({exc})") from exc
        elif self.path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._sd = _tensors_of(_load_ckpt(self.path), self.path)
        else:
            raise CheckpointError(f"{self.path}: unknown weights format {self.path.suffix!r} (.safetensors or .ckpt)")

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd or {})

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        assert self._sd is not None
        return tuple(self._sd[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        if self._st is not None:
            try:
                return self._st.get_tensor(key)
            except SafetensorError as exc:
                raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({exc})") from exc
        assert self._sd is not None
        return self._sd[key]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.tensor(key)


def check_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: expected {list(expected[k])}, found {list(found[k])}"
        for k in set(expected) & set(found)
        if tuple(expected[k]) != tuple(found[k])
    )
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str = "fp16",
    expected: Mapping[str, tuple[int, ...]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write ``src`` (.ckpt or .safetensors) as safetensors with the same key names, networks cast to ``dtype``.

    With ``expected`` (key -> shape of the target config) the keys are checked first, so a converted file
    always loads. Returns the number of tensors written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    wf = WeightsFile(src)
    if expected is not None:
        check_keys(expected, {k: wf.shape(k) for k in wf.keys()}, str(src))
    out: dict[str, torch.Tensor] = {}
    keys = wf.keys()
    for i, key in enumerate(keys):
        t = wf.tensor(key)
        target = torch.float32 if key in SCHEDULE_KEYS or not t.is_floating_point() else DTYPES[dtype]
        out[key] = t.to(target).contiguous()
        if progress:
            progress(i + 1, len(keys))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    save_file(out, str(tmp), metadata={"format": "pt", "source": Path(src).name, "dtype": dtype})
    tmp.replace(dst)
    return len(out)
