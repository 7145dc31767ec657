"""Settings from the environment and the ``anydoor serve`` command line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from service import cli
from service.settings import Settings, SettingsError, settings_table
from tests.support.server import CASE_A, REPO

WEIGHTS = str(CASE_A / "model.safetensors")


def test_every_setting_is_read_from_its_variable() -> None:
    env = {
        "ANYDOOR_WEIGHTS": WEIGHTS, "ANYDOOR_CONFIG": str(CASE_A / "model.yaml"), "ANYDOOR_DEVICE": "cuda:1",
        "ANYDOOR_DTYPE": "bf16", "ANYDOOR_HOST": "0.0.0.0", "ANYDOOR_PORT": "9000", "ANYDOOR_MAX_QUEUE": "3",
        "ANYDOOR_QUEUE_TIMEOUT_S": "2.5", "ANYDOOR_MAX_UPLOAD_MB": "0.5", "ANYDOOR_MAX_PIXELS": "1_000_000",
        "ANYDOOR_API_KEY": " secret ", "ANYDOOR_SHUTDOWN_GRACE_S": "5", "ANYDOOR_SHUTDOWN_DELAY_S": "1",
        "ANYDOOR_WARMUP_STEPS": "4", "ANYDOOR_LOG_LEVEL": "DEBUG", "ANYDOOR_WEIGHTS_SHA256": "ab" * 32,
        "ANYDOOR_CACHE_DIR": "/tmp/cache",
    }
    s = Settings.from_env(env)
    assert (s.device, s.dtype, s.host, s.port, s.max_queue, s.queue_timeout_s) == ("cuda:1", "bf16", "0.0.0.0",
                                                                                  9000, 3, 2.5)
    assert (s.max_pixels, s.api_key, s.shutdown_grace_s, s.shutdown_delay_s, s.warmup_steps, s.log_level) == (
        1_000_000, "secret", 5.0, 1.0, 4, "debug")
    assert s.max_upload_bytes == 512 * 1024 and s.max_body_bytes == 4 * 512 * 1024 + 1024 * 1024
    assert s.public()["api_key"] == "***"
    # Flags win over the environment.
    assert Settings.from_env(env, max_queue=7, port=None).max_queue == 7
    assert Settings.from_env({}, demo=True).demo is True
    assert {f.metadata["env"] for f in fields(Settings)} >= {
        "ANYDOOR_WEIGHTS", "ANYDOOR_CONFIG", "ANYDOOR_DEVICE", "ANYDOOR_DTYPE", "ANYDOOR_MAX_QUEUE",
        "ANYDOOR_QUEUE_TIMEOUT_S", "ANYDOOR_MAX_UPLOAD_MB", "ANYDOOR_MAX_PIXELS", "ANYDOOR_API_KEY"}


def test_no_weights_says_so_clearly() -> None:
    with pytest.raises(SettingsError, match="no weights configured.*ANYDOOR_WEIGHTS.*ANYDOOR_DEMO"):
        Settings.from_env({})
    with pytest.raises(SettingsError, match="exclude each other"):
        Settings.from_env({"ANYDOOR_WEIGHTS": WEIGHTS, "ANYDOOR_DEMO": "1"})
    with pytest.raises(SettingsError, match="ANYDOOR_WEIGHTS: no such file"):
        Settings.from_env({"ANYDOOR_WEIGHTS": "/nonexistent/anydoor.safetensors"})
    assert Settings.from_env({"ANYDOOR_WEIGHTS": "https://example.com/anydoor.safetensors"}).weights


@pytest.mark.parametrize(
    ("variable", "value", "pattern"),
    [
        ("ANYDOOR_MAX_QUEUE", "many", "ANYDOOR_MAX_QUEUE: cannot read 'many'"),
        ("ANYDOOR_MAX_QUEUE", "0", "ANYDOOR_MAX_QUEUE: expected at least 1, got 0"),
        ("ANYDOOR_QUEUE_TIMEOUT_S", "-1", "ANYDOOR_QUEUE_TIMEOUT_S: expected a positive number"),
        ("ANYDOOR_QUEUE_TIMEOUT_S", "inf", "ANYDOOR_QUEUE_TIMEOUT_S: cannot read"),
        ("ANYDOOR_DTYPE", "fp8", "ANYDOOR_DTYPE: expected one of auto, fp16, bf16, fp32"),
        ("ANYDOOR_DEVICE", "tpu", "ANYDOOR_DEVICE: expected auto, cpu"),
        ("ANYDOOR_DEMO", "maybe", "ANYDOOR_DEMO: cannot read 'maybe'"),
        ("ANYDOOR_PORT", "70000", "ANYDOOR_PORT: expected 0..65535"),
        ("ANYDOOR_WEIGHTS_SHA256", "abc", "ANYDOOR_WEIGHTS_SHA256: expected 64 hexadecimal digits"),
        ("ANYDOOR_LOG_LEVEL", "loud", "ANYDOOR_LOG_LEVEL: expected one of"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, pattern: str) -> None:
    with pytest.raises(SettingsError, match=pattern):
        Settings.from_env({"ANYDOOR_WEIGHTS": WEIGHTS, variable: value})


def test_the_documented_table_matches_the_settings() -> None:
    table = settings_table()
    for f in fields(Settings):
        assert f"`{f.metadata['env']}`" in table
    readme = (REPO / "README.md").read_text()
    assert table in readme, "README.md's settings table is out of date: regenerate it with python -m service.config"


def test_serve_help_lists_every_option_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="anydoor")
    cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    for f in fields(Settings):
        if f.metadata["flag"]:
            assert f.metadata["flag"] in text
            assert f"[env {f.metadata['env']}," in text
        else:
            assert f"{f.metadata['env']}:" in text  # listed as environment only
    args = parser.parse_args(["serve", "--weights", WEIGHTS, "--max-queue", "5", "--demo"])
    assert args.func is cli.serve and args.weights == WEIGHTS and args.max_queue == 5 and args.demo is True
    assert parser.parse_args(["serve"]).max_queue is None  # unset flags leave the environment in charge


def test_serve_without_weights_exits_2_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for f in fields(Settings):
        monkeypatch.delenv(f.metadata["env"], raising=False)
    parser = argparse.ArgumentParser(prog="anydoor")
    cli.register(parser.add_subparsers(dest="command"))
    assert cli.serve(parser.parse_args(["serve"])) == 2
    assert "no weights configured" in capsys.readouterr().err


def test_python_dash_m_service_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--max-queue" in done.stdout
