"""Service settings: read once from the environment (or ``anydoor serve`` flags), validated, documented here.

Every setting is a field of :class:`Settings` whose metadata names its environment variable, its command-line
flag and its help text. ``service/cli.py`` builds the flags from that metadata and :func:`settings_table` renders
the README table (``python -m service.config`` prints it), so code, ``--help`` and documentation cannot drift.
Precedence: command-line flag, then environment variable, then the default.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from model.config import DTYPE_NAMES
from model.errors import ErrorCode
from model.spec.limits import Limits, limit_fields
from model.weights.download import is_url

DTYPES = ("auto", *DTYPE_NAMES)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting with an unusable value; the message names the environment variable and the value."""


# --- parsers: text from the environment -> typed value ------------------------------------------------------


def _text(raw: str) -> str | None:
    value = raw.strip()
    return value or None


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE - {''})}, got {raw!r}")


def _int(raw: str) -> int:
    return int(raw.strip().replace("_", ""))


def _float(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _setting(
    default: Any,
    env: str,
    help: str,
    parse: Callable[[str], Any],
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    limit: ErrorCode | None = None,
) -> Any:
    """A :class:`Settings` field. ``flag=None`` keeps a setting out of the command line (secrets). ``limit`` marks a
    bound on what one request may make the server hold or do, with the code a request over it is refused with;
    those fields make the README's limits table."""
    return field(
        default=default,
        metadata={"env": env, "help": help, "parse": parse, "flag": flag, "metavar": metavar, "choices": choices,
                  "secret": secret, "limit": limit},
    )


def _limit_setting(name: str, parse: Callable[[str], Any]) -> Any:
    """A setting that is one of the request :class:`Limits`: its default, variable, flag and help come from there."""
    f = next(f for f in limit_fields() if f.name == name)
    meta = f.metadata
    return _setting(f.default, meta["env"], meta["help"], parse, flag=meta["flag"], metavar=meta["metavar"],
                    limit=meta["code"])


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told. Build with :meth:`from_env`; invalid values raise SettingsError."""

    weights: str | None = _setting(
        None, "ANYDOOR_WEIGHTS", "Weights to serve: a .safetensors or .ckpt file, or an http(s) URL downloaded "
        "once into the cache. Required unless demo mode is on.", _text, flag="--weights", metavar="PATH|URL")
    weights_sha256: str | None = _setting(
        None, "ANYDOOR_WEIGHTS_SHA256", "Expected SHA-256 of the weights file; checked after download (and for a "
        "local file when given).", _text, flag="--weights-sha256", metavar="HEX")
    cache_dir: str | None = _setting(
        None, "ANYDOOR_CACHE_DIR", "Download cache for URL weights (default: $XDG_CACHE_HOME/anydoor or "
        "~/.cache/anydoor).", _text, flag="--cache-dir", metavar="DIR")
    config: str | None = _setting(
        None, "ANYDOOR_CONFIG", "Model config: an upstream-layout YAML (default: the released AnyDoor model).",
        _text, flag="--config", metavar="YAML")
    demo: bool = _setting(
        False, "ANYDOOR_DEMO", "Demo mode: serve a tiny model with fixed random weights instead of real weights, so "
        "the whole HTTP path can be tried on any machine. Its pictures are noise; every response says so "
        "(`X-AnyDoor-Demo: true`, `\"demo\": true`, a PNG text chunk).", _bool, flag="--demo")
    device: str = _setting(
        "auto", "ANYDOOR_DEVICE", "Torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N.",
        str.strip, flag="--device", metavar="DEVICE")
    dtype: str = _setting(
        "auto", "ANYDOOR_DTYPE", "Compute dtype of UNet, ControlNet and DINOv2: auto (fp16 on CUDA, fp32 on CPU), "
        "fp16, bf16, fp32. The VAE always runs in fp32.", str.strip, flag="--dtype", choices=DTYPES)
    host: str = _setting(
        "127.0.0.1", "ANYDOOR_HOST", "Address to listen on (0.0.0.0 in a container).", str.strip, flag="--host",
        metavar="ADDR")
    port: int = _setting(8000, "ANYDOOR_PORT", "TCP port to listen on.", _int, flag="--port", metavar="N")
    root_path: str = _setting(
        "", "ANYDOOR_ROOT_PATH", "The path prefix a reverse proxy serves the app under (e.g. `/api`), as uvicorn's "
        "`--root-path`; routes, the API key and the limits hold with or without it.", str.strip, flag="--root-path",
        metavar="PREFIX")
    max_queue: int = _setting(
        16, "ANYDOOR_MAX_QUEUE", "Requests that may be admitted and not yet started on the GPU (uploading, "
        "preprocessing or queued); one more gets 429 with Retry-After, before its body is read.", _int,
        flag="--max-queue", metavar="N", limit=ErrorCode.OVERLOADED)
    queue_timeout_s: float = _setting(
        60.0, "ANYDOOR_QUEUE_TIMEOUT_S", "A request that has waited this long without starting gets 504.", _float,
        flag="--queue-timeout-s", metavar="SECONDS")
    # The request limits: the same defaults, names and help as every other surface's (model.spec.limits).
    max_upload_mb: float = _limit_setting("max_upload_mb", _float)
    max_pixels: int = _limit_setting("max_pixels", _int)
    max_regions: int = _limit_setting("max_regions", _int)
    max_form_fields: int = _setting(
        32, "ANYDOOR_MAX_FORM_FIELDS", "Most parts (fields and files) in one multipart request.", _int,
        flag="--max-form-fields", metavar="N", limit=ErrorCode.TOO_MANY_FIELDS)
    max_field_chars: int = _limit_setting("max_field_chars", _int)
    max_uploads: int = _setting(
        4, "ANYDOOR_MAX_UPLOADS", "Request bodies read at the same time past their first 64 KiB; more wait unread "
        "(TCP backpressure keeps their bytes in the clients' sockets), so concurrent uploads hold at most this many "
        "bodies in memory or on disk while a burst within ANYDOOR_MAX_QUEUE is still served. A body takes a slot "
        "(and a place in ANYDOOR_MAX_QUEUE) only once its first 64 KiB have arrived, so slow uploads cannot hold "
        "them.", _int, flag="--max-uploads", metavar="N")
    min_body_rate: float = _setting(
        1024.0, "ANYDOOR_MIN_BODY_RATE", "Slowest accepted request body, in bytes per second over each "
        "ANYDOOR_BODY_RATE_WINDOW_S spent waiting for the client (as reverse proxies enforce it). A slower body gets "
        "408 `request_timeout` and its upload slot and queue place are freed; time the server spends waiting for an "
        "upload slot or parsing is not counted, and while another request waits for a slot, a holder below the rate "
        "is dropped after 1 s. 0 turns the rule off.", _float, flag="--min-body-rate", metavar="BYTES_PER_S",
        limit=ErrorCode.REQUEST_TIMEOUT)
    body_rate_window_s: float = _setting(
        5.0, "ANYDOOR_BODY_RATE_WINDOW_S", "The window over which ANYDOOR_MIN_BODY_RATE is judged.", _float,
        flag="--body-rate-window-s", metavar="SECONDS")
    api_key: str | None = _setting(
        None, "ANYDOOR_API_KEY", "When set, every route but the health checks and /metrics requires "
        "`Authorization: Bearer <key>` (401 otherwise), under any path prefix. Environment only, so the key never "
        "shows in a process list.", _text,
        secret=True)
    shutdown_grace_s: float = _setting(
        20.0, "ANYDOOR_SHUTDOWN_GRACE_S", "On SIGTERM, queued and running requests get this long to finish; then "
        "they are cancelled (503 `shutting_down`). Keep it below the orchestrator's kill timeout.", _float,
        flag="--shutdown-grace-s", metavar="SECONDS")
    shutdown_delay_s: float = _setting(
        0.0, "ANYDOOR_SHUTDOWN_DELAY_S", "On SIGTERM, keep the listener open this long, answering 503 (`draining`) "
        "to new requests and to /health/ready, so load balancers notice before connections are refused.", _float,
        flag="--shutdown-delay-s", metavar="SECONDS")
    max_batch: int = _setting(
        4, "ANYDOOR_MAX_BATCH", "Most target regions generated together in one batch: queued requests with the same "
        "steps and sampler run as one batch, each with its own seed, guidance and control strength. 1 turns "
        "batching off.", _int, flag="--max-batch", metavar="N")
    max_batch_delay_ms: float = _setting(
        5.0, "ANYDOOR_MAX_BATCH_DELAY_MS", "How long the worker waits for more compatible requests to fill a batch "
        "once it has one to run (0: batch only what is already queued).", _float, flag="--max-batch-delay-ms",
        metavar="MS")
    compile: bool = _setting(
        False, "ANYDOOR_COMPILE", "torch.compile the UNet and the ControlNet (off by default). The warm-up "
        "generation pays for the compilation before the service turns ready; each new batch size compiles once "
        "more on first use.", _bool, flag="--compile")
    mask_refine_weights: str | None = _setting(
        None, "ANYDOOR_MASK_REFINE_WEIGHTS", "Weights of upstream's reference-mask refiner (`coarse_mask_refine.pth` "
        "or its safetensors conversion), a path or an http(s) URL through the download cache; requests may then "
        "ask for `refine_reference_mask`. Unset: the option is refused with `refiner_unavailable`.", _text,
        flag="--mask-refine-weights", metavar="PATH|URL")
    warmup_steps: int = _setting(
        2, "ANYDOOR_WARMUP_STEPS", "Denoising steps of the warm-up generation that must pass before the service is "
        "ready.", _int, flag="--warmup-steps", metavar="N")
    log_level: str = _setting(
        "info", "ANYDOOR_LOG_LEVEL", "Log level of the service and of uvicorn.", lambda raw: raw.strip().lower(),
        flag="--log-level", choices=LOG_LEVELS)
    # Slow and idle clients (service/connections.py): each costs one socket for a bounded time.
    header_timeout_s: float = _setting(
        10.0, "ANYDOOR_HEADER_TIMEOUT_S", "A connection must deliver its whole request head (request line and "
        "headers) within this time of being accepted (or, on a kept-alive connection, of the first byte of its next "
        "request), else it is closed (408 if it sent part of one). Also closes connections that send nothing.",
        _float, flag="--header-timeout-s", metavar="SECONDS")
    body_timeout_s: float = _setting(
        120.0, "ANYDOOR_BODY_TIMEOUT_S", "The whole request body must arrive within this time after the head, else "
        "408 and the connection is closed. The largest body (81 MiB at the default upload limit) then needs about "
        "6 Mbit/s; a typical request of a few MB, well under 1 Mbit/s.", _float, flag="--body-timeout-s",
        metavar="SECONDS")
    idle_timeout_s: float = _setting(
        15.0, "ANYDOOR_IDLE_TIMEOUT_S", "Longest silence allowed while a request body streams in (408, closed), and "
        "longest a response may wait for the client to read it (closed).", _float, flag="--idle-timeout-s",
        metavar="SECONDS")
    keep_alive_s: int = _setting(
        5, "ANYDOOR_KEEP_ALIVE_S", "An idle kept-alive connection is closed after this many seconds (0: close after "
        "every response).", _int, flag="--keep-alive-s", metavar="SECONDS")
    max_connections: int = _setting(
        256, "ANYDOOR_MAX_CONNECTIONS", "Open connections served normally. At the cap a new connection evicts the "
        "one that has waited longest (over 0.25 s) for its request head; failing that, one eighth more (at least 8), "
        "then 16 more that send their request at once, serve health checks and metrics only (other requests get 429 "
        "`overloaded`), and connections past those are dropped. Lowered at start, with a warning, where it does not "
        "fit under the open-files limit (RLIMIT_NOFILE, raised to its hard limit first).", _int,
        flag="--max-connections", metavar="N")

    # Async predictions (/predictions, service/predictions/): the job store, webhooks and input URLs.
    job_store: str | None = _setting(
        None, "ANYDOOR_JOB_STORE", "The SQLite file that keeps async predictions (input, status, output or error, "
        "timestamps, undelivered webhooks) across restarts; `:memory:` keeps them in memory only. Default: "
        "`predictions.sqlite3` in the cache directory (ANYDOOR_CACHE_DIR). One store per replica.", _text,
        flag="--job-store", metavar="PATH")
    prediction_ttl_s: float = _setting(
        3600.0, "ANYDOOR_PREDICTION_TTL", "Seconds a finished async prediction (its output or error) is kept after "
        "it completed; then it is deleted and `GET /predictions/{id}` answers 404.", _float,
        flag="--prediction-ttl", metavar="SECONDS")
    max_predictions: int = _setting(
        256, "ANYDOOR_MAX_PREDICTIONS", "Async predictions the store may hold (queued, running and finished ones "
        "not yet expired); one more gets 429 with Retry-After. With the output size this bounds the store's size.",
        _int, flag="--max-predictions", metavar="N", limit=ErrorCode.OVERLOADED)
    webhook_secret: str | None = _setting(
        None, "ANYDOOR_WEBHOOK_SECRET", "Signs every webhook per Standard Webhooks (`webhook-id`, "
        "`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`); a `whsec_` + base64 secret. Unset: "
        "webhooks are sent unsigned. Environment only.", _text, secret=True)
    webhook_auth_token: str | None = _setting(
        None, "WEBHOOK_AUTH_TOKEN", "Sent as `Authorization: Bearer <token>` with every webhook, as Cog does. "
        "Environment only.", _text, secret=True)
    webhook_allow_hosts: tuple[str, ...] = _setting(
        (), "ANYDOOR_WEBHOOK_ALLOW_HOSTS", "Comma-separated host names, IP addresses or networks (CIDR) that "
        "webhook and input URLs may reach although they are loopback, link-local or private (checked after DNS "
        "resolution, on every redirect). Empty: only public addresses.", lambda raw: _hosts(raw),
        flag="--webhook-allow-hosts", metavar="HOSTS")
    webhook_retry_s: float = _setting(
        300.0, "ANYDOOR_WEBHOOK_RETRY_S", "How long a `completed` webhook is retried (with exponential backoff) "
        "before it is given up; other events are sent once.", _float, flag="--webhook-retry-s", metavar="SECONDS")
    webhook_timeout_s: float = _setting(
        10.0, "ANYDOOR_WEBHOOK_TIMEOUT_S", "Longest one webhook request may take (connect and answer).", _float,
        flag="--webhook-timeout-s", metavar="SECONDS")
    fetch_timeout_s: float = _setting(
        30.0, "ANYDOOR_FETCH_TIMEOUT_S", "Longest the download of one input URL may take (each redirect included).",
        _float, flag="--fetch-timeout-s", metavar="SECONDS")

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> None:
            raise SettingsError(f"{env_name(name)}: {message}, got {getattr(self, name)!r}")

        if self.demo and self.weights:
            raise SettingsError("ANYDOOR_DEMO and ANYDOOR_WEIGHTS exclude each other: demo mode serves its own tiny "
                                "random model; unset one of them")
        if not self.demo and not self.weights:
            raise SettingsError(
                "no weights configured: set ANYDOOR_WEIGHTS (or --weights) to a .safetensors/.ckpt file or an "
                "http(s) URL, or set ANYDOOR_DEMO=1 (or --demo) to try the service with a tiny random demo model")
        if self.weights and not is_url(self.weights):
            if not Path(self.weights).expanduser().is_file():
                fail("weights", "no such file")
        if self.config and not Path(self.config).expanduser().is_file():
            fail("config", "no such file")
        if self.mask_refine_weights and not is_url(self.mask_refine_weights):
            if not Path(self.mask_refine_weights).expanduser().is_file():
                fail("mask_refine_weights", "no such file")
        if self.weights_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.weights_sha256):
            fail("weights_sha256", "expected 64 hexadecimal digits")
        if not _DEVICE.match(self.device):
            fail("device", "expected auto, cpu, mps, cuda or cuda:N")
        if self.dtype not in DTYPES:
            fail("dtype", f"expected one of {', '.join(DTYPES)}")
        if self.log_level not in LOG_LEVELS:
            fail("log_level", f"expected one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.port <= 65535:
            fail("port", "expected 0..65535")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            fail("root_path", "expected a path like /api (a leading slash, no trailing one)")
        if self.max_queue < 1:
            fail("max_queue", "expected at least 1")
        if self.max_batch < 1:
            fail("max_batch", "expected at least 1")
        if not 0 <= self.max_batch_delay_ms <= 1000:
            fail("max_batch_delay_ms", "expected between 0 and 1000")
        if self.warmup_steps < 1:
            fail("warmup_steps", "expected at least 1")
        for name in ("queue_timeout_s", "max_upload_mb", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                fail(name, "expected a positive number")
        if self.shutdown_delay_s < 0:
            fail("shutdown_delay_s", "expected 0 or more")
        if self.max_pixels < 64 * 64:
            fail("max_pixels", "expected at least 4096")
        for name in ("max_regions", "max_form_fields", "max_uploads"):
            if getattr(self, name) < 1:
                fail(name, "expected at least 1")
        if self.max_form_fields < 6:
            fail("max_form_fields", "expected at least 6 (the images and a box)")
        if self.max_field_chars < 64:
            fail("max_field_chars", "expected at least 64")
        # Upper bounds too: a deadline of hours would make the guard against slow clients meaningless.
        for name, top in (("header_timeout_s", 300), ("body_timeout_s", 3600), ("idle_timeout_s", 600)):
            if not 0 < getattr(self, name) <= top:
                fail(name, f"expected more than 0 and at most {top}")
        if self.min_body_rate < 0:
            fail("min_body_rate", "expected 0 or more")
        if not 0 < self.body_rate_window_s <= 600:
            fail("body_rate_window_s", "expected more than 0 and at most 600")
        if self.idle_timeout_s > self.body_timeout_s:
            fail("idle_timeout_s", "expected at most ANYDOOR_BODY_TIMEOUT_S")
        if not 0 <= self.keep_alive_s <= 300:
            fail("keep_alive_s", "expected 0..300")
        if not 1 <= self.max_connections <= 1_000_000:
            fail("max_connections", "expected 1..1000000")
        if self.max_predictions < 1:
            fail("max_predictions", "expected at least 1")
        for name in ("prediction_ttl_s", "webhook_retry_s", "webhook_timeout_s", "fetch_timeout_s"):
            if getattr(self, name) <= 0:
                fail(name, "expected a positive number")
        if self.webhook_secret is not None:
            try:
                webhook_key(self.webhook_secret)
            except ValueError as exc:
                raise SettingsError(f"ANYDOOR_WEBHOOK_SECRET: {exc}") from None

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` that are not None win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
            elif f.metadata["env"] in env:
                raw = env[f.metadata["env"]]
                try:
                    values[f.name] = f.metadata["parse"](raw)
                except ValueError as exc:
                    raise SettingsError(f"{f.metadata['env']}: cannot read {raw!r}: {exc}") from None
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        return cls(**values)

    # --- derived values -------------------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The request limits, as every surface has them."""
        return Limits(max_pixels=self.max_pixels, max_regions=self.max_regions, max_upload_mb=self.max_upload_mb,
                      max_field_chars=self.max_field_chars)

    def load_spec(self) -> Any:
        """What to load (:class:`model.pipeline.loader.LoadSpec`)."""
        from model.pipeline.loader import LoadSpec

        return LoadSpec(weights=self.weights, demo=self.demo, config=self.config, device=self.device,
                        dtype=self.dtype, sha256=self.weights_sha256, cache_dir=self.cache_dir, compile=self.compile,
                        mask_refine_weights=self.mask_refine_weights)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_body_bytes(self) -> int:
        """The whole multipart body: four image fields at the per-file limit plus room for the small fields."""
        return 4 * self.max_upload_bytes + MIB

    def public(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs."""
        return {f.name: ("***" if f.metadata["secret"] and getattr(self, f.name) else getattr(self, f.name))
                for f in fields(self)}


def _hosts(raw: str) -> tuple[str, ...]:
    """``ANYDOOR_WEBHOOK_ALLOW_HOSTS``: host names, addresses and CIDR networks, comma-separated."""
    import ipaddress

    hosts = []
    for item in raw.split(","):
        host = item.strip().lower()
        if not host:
            continue
        if "/" in host:
            ipaddress.ip_network(host, strict=False)  # ValueError for a bad network
        elif not re.fullmatch(r"[a-z0-9.:_\[\]-]{1,253}", host):
            raise ValueError(f"not a host name, address or network: {item.strip()!r}")
        hosts.append(host.strip("[]"))
    return tuple(hosts)


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_`` + base64; ValueError if it is not one."""
    import base64
    import binascii

    if not secret.startswith("whsec_"):
        raise ValueError("expected a secret of the form whsec_<base64>")
    try:
        key = base64.b64decode(secret[len("whsec_"):] + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("expected at least 16 bytes of key after whsec_")
    return key


def default_job_store(settings: Settings) -> str:
    """Where the job store lives when ANYDOOR_JOB_STORE is unset: the cache directory."""
    if settings.job_store:
        return settings.job_store
    from model.weights.download import default_cache_dir

    base = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
    return str(base / "predictions.sqlite3")


def env_name(name: str) -> str:
    return str(next(f.metadata["env"] for f in fields(Settings) if f.name == name))


def _default_text(f: Any) -> str:
    default = f.default if f.default is not MISSING else None
    if default is None or default == ():
        return "—"
    if isinstance(default, bool):
        return "`1`" if default else "`0`"
    return f"`{default}`"


def limits_table() -> str:
    """The Markdown table of the per-request limits (the settings marked ``limit``), as the README shows it."""
    rows = ["| Limit | Variable | Default | Refused with |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        code = f.metadata["limit"]
        if code is not None:
            first = f.metadata["help"].split(". ")[0].rstrip(".")
            rows.append(f"| {first} | `{f.metadata['env']}` | {_default_text(f)} | `{code.value}` |")
    return "\n".join(rows) + "\n"


def settings_table() -> str:
    """The Markdown table of every setting, as the README shows it."""
    rows = ["| Variable | Flag of `anydoor serve` | Default | Meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        flag = f"`{f.metadata['flag']}`" if f.metadata["flag"] else "(environment only)"
        rows.append(f"| `{f.metadata['env']}` | {flag} | {_default_text(f)} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    print(limits_table() if sys.argv[1:] == ["--limits"] else settings_table(), end="")
