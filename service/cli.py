"""The ``anydoor`` command line, and ``anydoor serve`` (also ``python -m service``): the HTTP service under uvicorn.

This is the top of the import graph, the one module that assembles every side: the model-side subcommands
(``generate``, ``weights``, from :mod:`model.cli`), the dataset commands (``batch``, ``merge``, from
:mod:`anydoor_batch`) and ``serve``, registered explicitly in :func:`build_parser`.

Every ``serve`` flag is generated from :class:`service.settings.Settings`, whose fields also name the environment
variable each flag overrides; ``--help`` shows both. Secrets (the API key) are read from the environment only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, fields
from typing import Any

from anydoor_batch import cli as batch_command
from anydoor_batch import merge as merge_command
from model.cli import evaluate as eval_command
from model.cli import generate as generate_command
from model.cli import weights as weights_command
from service.settings import Settings, SettingsError, env_name

DESCRIPTION = (
    "Serve AnyDoor over HTTP: POST /predict, health checks and Prometheus metrics. The model is loaded once and "
    "warmed up before /health/ready turns 200. Settings come from these flags, else the environment variable "
    "named with each, else the default."
)


def _arg_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {raw!r}: {exc}") from None

    convert.__name__ = name
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting that has one; each defaults to None so that the environment applies."""
    env_only = []
    for f in fields(Settings):
        meta = f.metadata
        default = "none" if f.default is MISSING or f.default is None or f.default == () else f.default
        if isinstance(default, bool):
            default = "off"
        help_text = f"{meta['help']} [env {meta['env']}, default: {default}]".replace("%", "%%")
        if meta["flag"] is None:
            env_only.append(f"  {meta['env']}: {meta['help']}")
            continue
        if isinstance(f.default, bool):
            parser.add_argument(meta["flag"], dest=f.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(meta["flag"], dest=f.name, type=_arg_type(meta["parse"], f.name), default=None,
                                choices=meta["choices"], metavar=None if meta["choices"] else meta["metavar"],
                                help=help_text)
    parser.epilog = "settings read from the environment only:\n" + "\n".join(env_only)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run the HTTP service (POST /predict, health, metrics)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    try:
        settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        print(f"anydoor serve: error: {exc}", file=sys.stderr)
        return 2
    problem = _device_problem(settings, args)
    if problem:
        print(f"anydoor serve: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from service import connections
    from service.app import create_app

    app = create_app(settings)
    limits = connections.connection_limits(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, server_header=False,
        root_path=settings.root_path,
        # A backstop only: the worker cancels running work at the end of the grace period by itself; the margin
        # covers the denoising step under way then.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_delay_s + settings.shutdown_grace_s + 15),
        # Read deadlines and the connection cap (service/connections.py); no WebSocket routes, so no upgrades.
        http=connections.protocol_class(limits), ws="none", backlog=limits.backlog,
        timeout_keep_alive=settings.keep_alive_s,
    )
    connections.install_log_filters()  # after Config, which configures logging
    server = uvicorn.Server(config)
    with _signals_exit_cleanly(server):
        server.run()
    if server.force_exit:
        return 130  # a second Ctrl-C cut the drain short: not a clean shutdown
    return 0 if server.started else 3


def _device_problem(settings: Settings, args: argparse.Namespace) -> str | None:
    """Why the configured device or dtype cannot work on this machine, or None.

    Settings only check the spelling (``cuda`` is a valid name); without this, a machine without CUDA would start,
    fail to load the model in the background and sit in ``setup_failed``. ``auto`` and ``cpu`` (with the dtype
    left to ``auto``) always work, so they are not checked and do not import torch here.
    """
    dtype = "auto" if settings.demo else settings.dtype  # the demo model ignores the dtype
    if settings.device in ("auto", "cpu") and dtype == "auto":
        return None
    from model.nn.anydoor import DeviceError, resolve_device, resolve_dtype  # imports torch

    try:
        resolve_dtype(dtype, resolve_device(settings.device))
    except DeviceError as exc:
        source = f"--{exc.setting}" if getattr(args, exc.setting, None) is not None else env_name(exc.setting)
        return f"{source} {exc.value}: {exc.reason}"
    return None


@contextlib.contextmanager
def _signals_exit_cleanly(server: Any) -> Iterator[None]:
    """Make a graceful shutdown on SIGTERM or Ctrl-C (SIGINT) end with exit status 0.

    After its graceful shutdown uvicorn re-raises the signal that stopped it under the handler that was there
    before its own, so that the default action follows: death by SIGTERM (status 143), or KeyboardInterrupt for
    SIGINT (status 130). Process managers and the README expect 0 from a clean shutdown, so the handler underneath
    uvicorn's only asks the server to exit (which also covers a signal arriving before uvicorn has installed its
    handlers). A second Ctrl-C still reaches uvicorn's handler first, which then force-quits.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_exit(sig: int, frame: Any) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``anydoor`` parser: ``generate``, ``batch``, ``merge``, ``weights convert|download``, ``serve``."""
    parser = argparse.ArgumentParser(
        prog="anydoor",
        description="AnyDoor Serve: zero-shot object insertion (generate, convert/download weights, serve HTTP).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    generate_command.register(sub)
    batch_command.register(sub)
    eval_command.register(sub)
    merge_command.register(sub)
    weights_command.register(sub)
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``anydoor``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``python -m service``: the same as ``anydoor serve``."""
    parser = argparse.ArgumentParser(prog="python -m service", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
