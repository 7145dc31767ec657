"""Async predictions in-process: the Cog prediction API over the fake pipeline, the job store, the URL guard and
the webhook sender (signed, coalesced, retried), without a real server or model."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks

from model.errors import ErrorCode, InputError
from service.predictions.fetch import RemoteFiles, decode_data_uri
from service.predictions.store import JobStore, PredictionRecord, StoreFull
from service.predictions.urlguard import UrlGuard
from service.predictions.webhooks import WebhookSender, sign
from service.settings import Settings, SettingsError
from tests.support.server import metric
from tests.support.webhooks import WebhookReceiver
from tests.test_service_app import FakePipeline, png, run, wait_until

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
ASYNC = {"Prefer": "respond-async"}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


INPUT = {"reference": data_uri(png(mode="RGBA")), "background": data_uri(png()), "box": "4,4,20,20", "steps": 2,
         "seed": 5}



async def poll(client: httpx.AsyncClient, prediction_id: str, statuses: tuple[str, ...] = (
        "succeeded", "failed", "canceled"), timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = (await client.get(f"/predictions/{prediction_id}")).json()
        if body["status"] in statuses:
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


# --- the API ------------------------------------------------------------------------------------------------------


def test_async_then_poll_and_sync_answers() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        accepted = await client.post("/predictions", json={"input": INPUT}, headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        assert body["status"] == "starting" and body["input"] == INPUT and body["created_at"]
        assert set(body) >= {"id", "input", "output", "status", "error", "logs", "metrics", "created_at",
                             "started_at", "completed_at"}
        done = await poll(client, body["id"])
        assert done["status"] == "succeeded", done
        assert isinstance(done["output"], list) and len(done["output"]) == 1  # a list of files, as Cog's predictor
        assert done["output"][0].startswith("data:image/png;base64,")
        assert base64.b64decode(done["output"][0].split(",", 1)[1]).startswith(b"\x89PNG")
        assert done["metrics"]["seed"] == 5 and done["metrics"]["predict_time"] >= 0
        assert set(done["metrics"]["timing"]) >= {"preprocess", "encode", "sample", "decode", "postprocess"}
        assert "step 2/2" in done["logs"] and "seed=5" in done["logs"]
        assert done["started_at"] and done["completed_at"]

        sync = await client.post("/predictions", json={"id": "sync-1", "input": INPUT})
        assert sync.status_code == 200 and sync.json()["status"] == "succeeded"
        assert sync.json()["id"] == "sync-1"

        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_predictions", status="succeeded") == 2
        assert "anydoor_prediction_queue_depth" in text

    run(scenario)


def test_put_is_idempotent_and_a_different_body_is_a_conflict() -> None:
    pipe = FakePipeline()

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        first = await client.put("/predictions/same-id", json={"input": INPUT}, headers=ASYNC)
        second = await client.put("/predictions/same-id", json={"input": INPUT}, headers=ASYNC)
        assert first.status_code == 202 and second.status_code == 202
        assert second.json()["id"] == "same-id"
        await poll(client, "same-id")
        again = await client.put("/predictions/same-id", json={"input": INPUT})
        assert again.status_code == 200 and again.json()["status"] == "succeeded"
        conflict = await client.put("/predictions/same-id", json={"input": {**INPUT, "seed": 6}})
        assert conflict.status_code == 409 and conflict.json()["error"] == "prediction_conflict"
        assert len(pipe.batches) == 2  # the warm-up and one run
        assert app.state.predictions.store.count() == 1

    run(scenario, pipe=pipe)


def test_cancel_of_a_queued_prediction_ends_it_and_it_never_runs() -> None:
    pipe = FakePipeline(step_s=0.05)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        busy = await client.post("/predictions", json={"id": "busy", "input": {**INPUT, "steps": 40}},
                                 headers=ASYNC)
        assert busy.status_code == 202
        await poll(client, "busy", ("processing",))
        queued = await client.post("/predictions", json={"id": "queued", "input": INPUT}, headers=ASYNC)
        assert queued.json()["status"] == "starting"
        canceled = await client.post("/predictions/queued/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        # The running one stops at its next step.
        running = await client.post("/predictions/busy/cancel")
        assert running.json()["status"] == "canceled"
        await wait_until(lambda: app.state.service.worker.queue_depth == 0 and not app.state.service.worker._running)
        assert (await client.get("/predictions/queued")).json()["started_at"] is None
        assert len(pipe.batches) == 2  # the warm-up and the busy one: "queued" never ran
        finished = await client.post("/predictions/busy/cancel")
        assert finished.json()["status"] == "canceled"  # unchanged
        missing = await client.post("/predictions/nope/cancel")
        assert missing.status_code == 404 and missing.json()["error"] == "prediction_not_found"
        assert (await client.get("/predictions/nope")).status_code == 404

    run(scenario, pipe=pipe, max_batch=1)


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"input": {**INPUT, "stpes": 2}}, 422, "unknown_field", "stpes"),
    ({"input": {**INPUT, "steps": 0}}, 422, "out_of_range", "steps"),
    ({"input": {k: v for k, v in INPUT.items() if k != "background"}}, 422, "missing_field", "background"),
    ({"input": {**INPUT, "background": "/etc/passwd"}}, 422, "invalid_parameter", "background"),
    ({"input": {**INPUT, "background": "file:///etc/passwd"}}, 422, "invalid_parameter", "background"),
    ({"input": INPUT, "webhook": "http://127.0.0.1:9/hook"}, 422, "url_forbidden", "webhook"),
    ({"input": INPUT, "webhook": "ftp://example.com/hook"}, 422, "url_forbidden", "webhook"),
    ({"input": {**INPUT, "background": "http://127.0.0.2/b.png"}}, 422, "url_forbidden", "background"),
    ({"input": INPUT, "webhook_events_filter": ["begin"]}, 422, "invalid_parameter", "webhook_events_filter"),
    ({"inputs": INPUT}, 422, "unknown_field", "inputs"),
    ({}, 422, "missing_field", "input"),
    ({"id": "a b", "input": INPUT}, 422, "invalid_parameter", "id"),
])
def test_bad_requests_are_refused_with_the_codes_of_predict(body: dict[str, Any], status: int, code: str,
                                                             field: str) -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        response = await client.post("/predictions", json=body, headers=ASYNC)
        assert response.status_code == status, response.text
        assert response.json()["error"] == code and response.json()["field"] == field, response.json()
        assert app.state.predictions.store.count() == 0

    run(scenario)


def test_bad_json_and_a_bad_image_that_only_decoding_finds() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        bad = await client.post("/predictions", content=b'{"input": {"steps": 1, "steps": 2}}',
                                headers={"Content-Type": "application/json"})
        assert bad.status_code == 422 and bad.json()["error"] == "duplicate_key"
        broken = await client.post("/predictions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"] == "invalid_json"
        garbage = {**INPUT, "background": data_uri(b"not an image at all")}
        failed = await client.post("/predictions", json={"input": garbage})
        assert failed.status_code == 200 and failed.json()["status"] == "failed"
        assert failed.json()["error_code"] == "not_an_image" and "background" in failed.json()["error"]

    run(scenario)


def test_a_full_store_answers_429_with_retry_after() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        for i in range(2):
            assert (await client.post("/predictions", json={"id": f"p{i}", "input": INPUT})).status_code == 200
        full = await client.post("/predictions", json={"id": "p2", "input": INPUT}, headers=ASYNC)
        assert full.status_code == 429 and full.json()["error"] == "overloaded"
        assert 1 <= int(full.headers["retry-after"]) <= 3600
        # An existing id is still answered (idempotency needs no room).
        assert (await client.put("/predictions/p0", json={"input": INPUT})).status_code == 200

    run(scenario, max_predictions=2)


def test_the_api_key_guards_the_prediction_routes() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        assert (await client.post("/predictions", json={"input": INPUT})).status_code == 401
        assert (await client.get("/predictions/x")).status_code == 401
        ok = await client.post("/predictions", json={"input": INPUT}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200

    run(scenario, api_key="k")


def test_predictions_accepted_while_loading_run_once_ready() -> None:
    release = threading.Event()

    def slow_load() -> FakePipeline:
        release.wait(10)
        return FakePipeline()

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        accepted = await client.post("/predictions", json={"input": INPUT}, headers=ASYNC)
        assert accepted.status_code == 202
        release.set()
        assert (await poll(client, accepted.json()["id"]))["status"] == "succeeded"

    run(scenario, load=slow_load, wait_ready=False)


# --- the job store ------------------------------------------------------------------------------------------------


def test_a_restart_runs_what_was_queued(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite3")
    never = threading.Event()

    def stuck_load() -> FakePipeline:  # the first process never gets its model: everything stays queued
        never.wait(30)
        raise RuntimeError("this process dies before its model loads")

    async def first(client: httpx.AsyncClient, app: Any) -> None:
        for i in range(3):
            assert (await client.post("/predictions", json={"id": f"q{i}", "input": {**INPUT, "seed": i}},
                                      headers=ASYNC)).status_code == 202
        never.set()

    try:
        run(first, load=stuck_load, wait_ready=False, job_store=path, shutdown_grace_s=0.1)
    finally:
        never.set()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM predictions WHERE status = 'starting'").fetchone()[0] == 3
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    async def second(client: httpx.AsyncClient, app: Any) -> None:
        for i in range(3):
            done = await poll(client, f"q{i}")
            assert done["status"] == "succeeded" and done["metrics"]["seed"] == i

    run(second, job_store=path)


def test_an_unacknowledged_completed_webhook_is_sent_again_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite3")
    with WebhookReceiver(status=503) as receiver:
        async def first(client: httpx.AsyncClient, app: Any) -> None:
            body = {"id": "w1", "input": INPUT, "webhook": f"{receiver.url}/hook",
                    "webhook_events_filter": ["completed"]}
            assert (await client.post("/predictions", json=body)).json()["status"] == "succeeded"
            await wait_until(lambda: len(receiver.received) >= 1)  # answered 503: still owed

        run(first, job_store=path, webhook_allow_hosts=("127.0.0.1",), webhook_secret=SECRET)
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT webhook_state FROM predictions WHERE id = 'w1'").fetchone()[0] == 1
        receiver.status = 200
        before = len(receiver.received)

        async def second(client: httpx.AsyncClient, app: Any) -> None:
            await wait_until(lambda: len(receiver.received) > before)
            await wait_until(lambda: app.state.predictions.store.undelivered() == [])

        run(second, job_store=path, webhook_allow_hosts=("127.0.0.1",), webhook_secret=SECRET)
        resent = receiver.received[-1]
        assert resent.headers["webhook-id"] == "w1.completed"  # the same message id: receivers can drop repeats
        assert standardwebhooks.Webhook(SECRET).verify(resent.body, resent.headers)["status"] == "succeeded"


def test_store_expires_finished_predictions_and_bounds_its_size() -> None:
    store = JobStore(":memory:", max_predictions=2, ttl_s=10)
    record = PredictionRecord("a", "h", {}, None, (), 1)
    store.create(record)
    store.create(record.with_(id="b"))
    assert store.create(record.with_(id="a"))[1] is False  # known id: returned, not inserted
    with pytest.raises(StoreFull) as full:
        store.create(record.with_(id="c"))
    assert full.value.retry_after_s is None  # nothing finished: nothing will expire
    now = time.time()
    store.update(record.with_(status="succeeded", completed_at=now - 5))
    with pytest.raises(StoreFull) as full:
        store.create(record.with_(id="c"))
    assert full.value.retry_after_s is not None and 4 <= full.value.retry_after_s <= 5.5
    assert store.expire(now + 6) == 1 and store.get("a") is None and store.count() == 1
    store.create(record.with_(id="c"))
    assert [r.id for r in store.active()] == ["b", "c"]


# --- URLs -------------------------------------------------------------------------------------------------------


def stub(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


def test_the_guard_refuses_private_addresses_after_resolution() -> None:
    names = {"public.example": ["93.184.216.34"], "inside.example": ["10.1.2.3"],
             "mixed.example": ["93.184.216.34", "127.0.0.1"], "v6.example": ["::1"],
             "mapped.example": ["::ffff:10.0.0.1"],
             "meta.example": ["169.254.169.254"], "cgnat.example": ["100.64.0.1"]}
    guard = UrlGuard((), resolver=stub(names))
    assert guard.check("https://public.example/x?y=1", "webhook").addresses == ("93.184.216.34",)
    for url in ("http://inside.example/", "http://mixed.example/", "http://v6.example/", "http://mapped.example/",
                "http://meta.example/latest", "http://cgnat.example/", "http://127.0.0.1/", "http://[::1]:8080/",
                "http://0.0.0.0/", "http://user:pw@public.example/"):
        with pytest.raises(InputError) as exc:
            guard.check(url, "webhook")
        assert exc.value.code is ErrorCode.URL_FORBIDDEN and exc.value.field == "webhook", url
    with pytest.raises(InputError) as exc:
        guard.check("http://nowhere.example/", "background")
    assert exc.value.code is ErrorCode.FETCH_FAILED
    allowed = UrlGuard(("inside.example", "127.0.0.0/30", "::1"), resolver=stub(names))
    allowed.check("http://inside.example/", "webhook")
    allowed.check("http://127.0.0.2:9/", "webhook")
    allowed.check("http://v6.example/", "webhook")
    with pytest.raises(InputError):
        allowed.check("http://127.0.0.5/", "webhook")


def test_input_urls_follow_redirects_only_to_allowed_hosts(case_a_http: str) -> None:
    """A loopback file server, allow-listed at 127.0.0.1 only; a redirect to 127.0.0.2 is refused."""
    import http.server

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            target = case_a_http if self.path == "/ok" else case_a_http.replace("127.0.0.1", "127.0.0.2")
            self.send_response(302)
            self.send_header("Location", f"{target}/background.png")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        files = RemoteFiles(UrlGuard(("127.0.0.1",)), max_bytes=1 << 20, timeout_s=5)
        png_bytes = files("background", f"http://127.0.0.1:{server.server_port}/ok")
        assert png_bytes.startswith(b"\x89PNG")
        with pytest.raises(InputError) as exc:
            files("background", f"http://127.0.0.1:{server.server_port}/elsewhere")
        assert exc.value.code is ErrorCode.URL_FORBIDDEN
        with pytest.raises(InputError) as exc:
            RemoteFiles(UrlGuard(("127.0.0.1",)), max_bytes=100, timeout_s=5)("background",
                                                                             f"{case_a_http}/background.png")
        assert exc.value.code is ErrorCode.PAYLOAD_TOO_LARGE
        with pytest.raises(InputError) as exc:
            files("background", f"{case_a_http}/missing.png")
        assert exc.value.code is ErrorCode.FETCH_FAILED and "404" in exc.value.message
    finally:
        server.shutdown()
        server.server_close()


def test_data_uris_are_bounded_before_decoding() -> None:
    assert decode_data_uri("reference", data_uri(b"abc"), 10) == b"abc"
    for uri, code in ((data_uri(b"x" * 100), ErrorCode.PAYLOAD_TOO_LARGE),
                      ("data:image/png;base64,!!!!", ErrorCode.FETCH_FAILED),
                      ("data:image/png;base64", ErrorCode.FETCH_FAILED)):
        with pytest.raises(InputError) as exc:
            decode_data_uri("reference", uri, 10)
        assert exc.value.code is code


# --- webhooks ---------------------------------------------------------------------------------------------------


class Receiver:
    """A fake ``post`` for the sender: records every request; fails the first ``failures`` completed ones."""

    def __init__(self, failures: int = 0, delay_s: float = 0.0) -> None:
        self.requests: list[tuple[str, bytes, dict[str, str]]] = []
        self.failures = failures
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        time.sleep(self.delay_s)
        with self.lock:
            self.requests.append((url, body, headers))
            if b'"status":"succeeded"' in body and self.failures > 0:
                self.failures -= 1
                return 503
        return 204

    def events(self) -> list[str]:
        import json

        return [json.loads(body)["status"] + ":" + headers["webhook-id"].split(".")[1]
                for _, body, headers in self.requests]


def sender(receiver: Receiver, **kwargs: Any) -> WebhookSender:
    from service.settings import webhook_key

    outcomes: list[tuple[str, bool]] = kwargs.pop("outcomes", [])
    s = WebhookSender(UrlGuard(), key=webhook_key(SECRET), auth_token="tok", timeout_s=1, retry_s=kwargs.pop(
        "retry_s", 5), interval_s=kwargs.pop("interval_s", 0.5), post=receiver,
        on_completed=lambda pid, ok: outcomes.append((pid, ok)), **kwargs)
    s.start()
    return s


def wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_webhooks_are_signed_per_standard_webhooks() -> None:
    receiver = Receiver()
    s = sender(receiver)
    try:
        s.send("p1", "https://hooks.example/x", "completed", {"id": "p1", "status": "succeeded"})
        wait(lambda: len(receiver.requests) == 1)
    finally:
        s.stop()
    _, body, headers = receiver.requests[0]
    assert headers["Authorization"] == "Bearer tok" and headers["Content-Type"] == "application/json"
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == {"id": "p1", "status": "succeeded"}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body + b" ", headers)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    assert sign(key, "m", 1, b"{}") == standardwebhooks.Webhook(SECRET).sign("m", __import__("datetime").datetime
                                                                             .fromtimestamp(1), "{}")


def test_progress_events_are_coalesced_and_completed_is_retried() -> None:
    receiver = Receiver(failures=2)
    outcomes: list[tuple[str, bool]] = []
    s = sender(receiver, outcomes=outcomes, interval_s=0.3)
    try:
        url = "https://hooks.example/x"
        s.send("p", url, "start", {"status": "processing", "n": 0})
        for n in range(1, 50):  # a burst of log events: at most one per interval goes out
            s.send("p", url, "logs", {"status": "processing", "n": n})
        time.sleep(0.5)
        for n in range(50, 100):
            s.send("p", url, "logs", {"status": "processing", "n": n})
        s.send("p", url, "completed", {"status": "succeeded"})
        wait(lambda: outcomes == [("p", True)])
    finally:
        s.stop()
    events = receiver.events()
    assert events[0] == "processing:start" and events[-1] == "succeeded:completed"
    assert events.count("succeeded:completed") == 3  # two 503s, then delivered
    assert len(events) <= 6, events  # start, one or two coalesced logs, three tries of completed


def test_a_completed_webhook_is_given_up_after_its_retry_period() -> None:
    receiver = Receiver(failures=1000)
    outcomes: list[tuple[str, bool]] = []
    s = sender(receiver, outcomes=outcomes, retry_s=1.0)
    try:
        s.send("p", "https://hooks.example/x", "completed", {"status": "succeeded"})
        wait(lambda: outcomes == [("p", False)])
    finally:
        s.stop()
    assert 2 <= len(receiver.requests) <= 4  # 0.5 s, then 1 s of backoff


def test_a_slow_receiver_does_not_block_the_producer() -> None:
    receiver = Receiver(delay_s=2.0)
    s = sender(receiver, threads=1)
    try:
        start = time.perf_counter()
        for i in range(20):
            s.send(f"p{i}", "https://hooks.example/x", "start", {"status": "processing"})
            s.send(f"p{i}", "https://hooks.example/x", "completed", {"status": "succeeded"})
        assert time.perf_counter() - start < 1.0  # one blocked delivery alone would take 2 s
        assert s.backlog == 40
    finally:
        s.stop()


def test_the_webhook_secret_must_be_a_whsec_secret() -> None:
    for bad in ("plain", "whsec_", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(SettingsError, match="ANYDOOR_WEBHOOK_SECRET"):
            Settings(demo=True, webhook_secret=bad)
    assert Settings.from_env({"ANYDOOR_DEMO": "1", "ANYDOOR_WEBHOOK_ALLOW_HOSTS": "127.0.0.1, hooks.local,10.0.0.0/8"}
                             ).webhook_allow_hosts == ("127.0.0.1", "hooks.local", "10.0.0.0/8")


def test_a_synchronous_request_is_answered_503_when_its_prediction_cannot_run_here() -> None:
    release = threading.Event()

    def stuck_load() -> FakePipeline:
        release.wait(30)
        return FakePipeline()

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        waiting = asyncio.ensure_future(client.post("/predictions", json={"id": "w", "input": INPUT}))
        await wait_until(lambda: app.state.predictions.store is not None and app.state.predictions.store.count() == 1)
        app.state.service.begin_drain()
        answer = await waiting
        assert answer.status_code == 503 and answer.json()["error"] == "draining"
        assert (await client.get("/predictions/w")).json()["status"] == "starting"  # still queued in the store
        refused = await client.post("/predictions", json={"input": INPUT}, headers=ASYNC)
        assert refused.status_code == 503 and refused.json()["error"] == "draining"
        release.set()

    try:
        run(scenario, load=stuck_load, wait_ready=False, shutdown_grace_s=0.5)
    finally:
        release.set()


def test_progress_events_spread_out_in_time_still_go_at_most_one_per_interval() -> None:
    receiver = Receiver()
    s = sender(receiver, interval_s=0.5)
    try:
        start = time.monotonic()
        for n in range(30):  # one every 50 ms for 1.5 s: the queue drains between them
            s.send("p", "https://hooks.example/x", "logs", {"status": "processing", "n": n})
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        s.send("p", "https://hooks.example/x", "completed", {"status": "succeeded"})
        wait(lambda: receiver.events()[-1:] == ["succeeded:completed"])
        assert s._channels == {}  # forgotten once its last event went out
    finally:
        s.stop()
    logs = [e for e in receiver.events() if e.endswith(":logs")]
    assert 2 <= len(logs) <= elapsed / 0.5 + 1, logs


def test_finished_predictions_are_deleted_after_the_ttl() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        done = await client.post("/predictions", json={"id": "short-lived", "input": INPUT})
        assert done.json()["status"] == "succeeded"
        deadline = time.monotonic() + 10
        while (await client.get("/predictions/short-lived")).status_code != 404:
            assert time.monotonic() < deadline, "not expired"
            await asyncio.sleep(0.05)
        assert metric((await client.get("/metrics")).text, "anydoor_predictions", status="succeeded") == 0

    run(scenario, prediction_ttl_s=0.3)
