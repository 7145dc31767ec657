"""Conformance with Cog: the same prediction requests to the Cog predictor under Cog's own server
(``python -m cog.server.http``, started by ``tests/support/cog.py`` as for ``tests/test_cog.py``) and to
``anydoor serve``.

Ours must carry at least every key Cog's carry (Cog answers a 202 with ``id`` and ``status`` only and sends
webhooks with ``id, input, status, logs, metrics, output``; ours add ``input`` where Cog has none and the
timestamps), go through the same statuses in the same order, and give the same output type. Where the servers
differ on purpose, the test says so: Cog answers ``GET /predictions/{id}`` with 405, ours with the prediction.
Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cog import cog_server
from tests.support.server import CASE_A, ServerProcess, tiny_model_env
from tests.support.webhooks import Received, WebhookReceiver

pytest.importorskip("cog", reason="the Cog SDK is a test dependency: pip install cog==0.23.1")
pytestmark = pytest.mark.slow

TOKEN = "conformance-token"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


INPUT = {"reference": data_uri(CASE_A / "reference.png"), "background": data_uri(CASE_A / "background.png"),
         "background_mask": data_uri(CASE_A / "background_mask.png"), "steps": 2, "seed": 9}


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


def call(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, method=method, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            raw = response.read()
            return Answer(response.status, json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return Answer(exc.code, json.loads(raw) if raw else None)
        except json.JSONDecodeError:
            return Answer(exc.code, raw.decode(errors="replace"))


@pytest.fixture(scope="module")
def cog_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cog_server(tmp_path_factory.mktemp("cog"), WEBHOOK_AUTH_TOKEN=TOKEN) as server:
        yield server.url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
    env = {**tiny_model_env(), "ANYDOOR_JOB_STORE": str(store), "ANYDOOR_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
           "WEBHOOK_AUTH_TOKEN": TOKEN, "ANYDOOR_WARMUP_STEPS": "1"}
    with ServerProcess(env) as proc:
        proc.start()
        yield proc


@dataclass
class Exchange:
    """What one server answered to the same sequence of requests."""

    sync: Answer
    accepted: Answer
    webhooks: list[Received]
    get: Answer
    put: list[Answer]
    put_webhooks: list[Received]


def exchange(url: str, receiver: WebhookReceiver) -> Exchange:
    """The same requests, in the same order, to the server at ``url``; waits on webhooks, never on sleeps."""
    sync = call(url, "POST", "/predictions", {"input": INPUT})
    accepted = call(url, "POST", "/predictions", {"id": "conf-async", "input": INPUT,
                                                  "webhook": f"{receiver.url}/async"}, {"Prefer": "respond-async"})

    def finished(prediction_id: str) -> Any:
        return lambda got: any(r.json.get("id") == prediction_id and r.json.get("status") in (
            "succeeded", "failed", "canceled") for r in got)

    receiver.wait_for(finished("conf-async"), timeout=240)
    webhooks = receiver.for_prediction("conf-async")
    get = call(url, "GET", "/predictions/conf-async")
    put_body = {"input": INPUT, "webhook": f"{receiver.url}/put", "webhook_events_filter": ["completed"]}
    puts = [call(url, "PUT", "/predictions/conf-put", put_body, {"Prefer": "respond-async"}) for _ in range(2)]
    receiver.wait_for(finished("conf-put"), timeout=240)
    return Exchange(sync, accepted, webhooks, get, puts, receiver.for_prediction("conf-put"))


def statuses(webhooks: list[Received]) -> list[str]:
    """The statuses the webhooks went through, repeats collapsed (Cog sends one per log line, ours coalesce)."""
    out: list[str] = []
    for received in webhooks:
        status = received.json["status"]
        if not out or out[-1] != status:
            out.append(status)
    return out


@pytest.fixture(scope="module")
def answers(cog_url: str, server: ServerProcess) -> tuple[Exchange, Exchange]:
    with WebhookReceiver() as cog_hooks, WebhookReceiver() as our_hooks:
        cog = exchange(cog_url, cog_hooks)
        ours = exchange(server.url, our_hooks)
    return cog, ours


def test_sync_answers_match(answers: tuple[Exchange, Exchange]) -> None:
    cog, ours = answers
    assert cog.sync.status == ours.sync.status == 200
    assert set(ours.sync.body) >= set(cog.sync.body), set(cog.sync.body) - set(ours.sync.body)
    assert cog.sync.body["status"] == ours.sync.body["status"] == "succeeded", (cog.sync.body.get("error"),
                                                                               ours.sync.body.get("error"))
    assert type(cog.sync.body["output"]) is type(ours.sync.body["output"]) is list  # the predictor's list[Path]
    assert cog.sync.body["output"][0].startswith("data:image/png;base64,")
    assert ours.sync.body["output"][0].startswith("data:image/png;base64,")
    # The same predictor and seed: the same image, byte for byte.
    assert ours.sync.body["output"] == cog.sync.body["output"]
    assert set(ours.sync.body["metrics"]) >= set(cog.sync.body["metrics"])
    assert set(ours.sync.body["metrics"]["timing"]) >= set(cog.sync.body["metrics"]["timing"])


def test_async_accepts_match_and_webhooks_go_through_the_same_statuses(answers: tuple[Exchange, Exchange]) -> None:
    cog, ours = answers
    assert cog.accepted.status == ours.accepted.status == 202
    assert set(cog.accepted.body) == {"id", "status"}
    assert set(ours.accepted.body) >= set(cog.accepted.body) | {"input", "created_at"}
    assert cog.accepted.body["status"] == ours.accepted.body["status"]
    assert cog.accepted.body["id"] == ours.accepted.body["id"] == "conf-async"

    assert statuses(cog.webhooks) == statuses(ours.webhooks) == ["processing", "succeeded"]
    cog_keys = set().union(*(set(r.json) for r in cog.webhooks))
    assert cog_keys >= {"id", "status", "logs", "metrics", "output"}
    for received in ours.webhooks:
        assert set(received.json) >= cog_keys, cog_keys - set(received.json)
        assert received.headers["authorization"] == f"Bearer {TOKEN}"
        assert received.headers["content-type"] == "application/json"
    assert type(cog.webhooks[-1].json["output"]) is type(ours.webhooks[-1].json["output"]) is list
    assert ours.webhooks[-1].json["output"] == cog.webhooks[-1].json["output"]


def test_get_is_405_on_cog_and_the_prediction_on_ours(answers: tuple[Exchange, Exchange]) -> None:
    cog, ours = answers
    assert cog.get.status == 405
    assert ours.get.status == 200 and ours.get.body["id"] == "conf-async" and ours.get.body["status"] == "succeeded"


def test_put_twice_is_accepted_twice_for_one_prediction(answers: tuple[Exchange, Exchange]) -> None:
    cog, ours = answers
    assert [a.status for a in cog.put] == [a.status for a in ours.put] == [202, 202]
    assert all(a.body["id"] == "conf-put" for a in cog.put + ours.put)
    for exchanged in (cog, ours):
        completed = [r for r in exchanged.put_webhooks if r.json["status"] == "succeeded"]
        assert len(completed) == 1  # one prediction, one completed webhook
        assert statuses(exchanged.put_webhooks) == ["succeeded"]  # the filter: completed only
