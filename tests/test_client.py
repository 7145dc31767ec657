"""``client.AnyDoorClient``: the request spec's codecs on the wire, typed errors, retries and balancing (against a
fake server), importable without torch or numpy, and byte for byte a direct ``POST /predict`` (a real server)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from client import AnyDoorClient, AnyDoorError, ErrorCode
from model.spec.codecs import FilePart, Wire, decode_request
from tests.support.fake import FakeServer
from tests.support.server import CASE_A, REPO, ServerProcess, free_port

REFERENCE, BACKGROUND = CASE_A / "reference.png", CASE_A / "background.png"


def test_importable_without_torch_numpy_or_the_web_stack() -> None:
    code = ("import sys\n"
            "for name in ('torch', 'numpy', 'PIL', 'fastapi', 'starlette', 'httpx', 'pydantic'):\n"
            "    sys.modules[name] = None\n"
            "from client import AnyDoorClient\n"
            "AnyDoorClient('http://127.0.0.1:1').form({'reference': b'r', 'background': b'b', 'box': ['1,2,30,40']})\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_form_is_what_the_service_decodes() -> None:
    """Images as a path, bytes and a PIL image; boxes in every spelling; the server's decoder reads it back."""
    image = Image.open(BACKGROUND)
    items = AnyDoorClient("http://127.0.0.1:1").form({
        "reference": [REFERENCE, REFERENCE.read_bytes()], "background": image,
        "box": ["40,60,120,100", [300, 200, 150, 150]], "steps": 7, "seed": 3, "shape_control": True})
    assert [name for name, _ in items] == ["reference", "reference", "background", "box", "box", "steps", "seed",
                                           "shape_control"]
    assert items[0][1] == ("reference.png", REFERENCE.read_bytes())
    wire = [(name, FilePart(v[1], v[0]) if isinstance(v, tuple) else v) for name, v in items]
    inputs, params = decode_request(wire, Wire.FORM)
    assert inputs.boxes == ((40, 60, 120, 100), (300, 200, 150, 150))
    assert (params.steps, params.seed, params.shape_control) == (7, 3, True)
    with Image.open(io.BytesIO(inputs.background)) as sent:
        assert sent.size == image.size


def test_a_bad_parameter_fails_before_anything_is_sent() -> None:
    with FakeServer({}) as fake:
        with pytest.raises(AnyDoorError) as info:
            AnyDoorClient(fake.url).predict(reference=REFERENCE, background=BACKGROUND, box="1,2,30,40", steps=0)
        assert fake.requests == []
    assert (info.value.code, info.value.field, info.value.status) == (ErrorCode.OUT_OF_RANGE, "steps", 0)
    with pytest.raises(AnyDoorError) as info:
        AnyDoorClient("http://127.0.0.1:1").predict(reference=REFERENCE / "nope.png", background=BACKGROUND,
                                                    box="1,2,30,40")
    assert info.value.code is ErrorCode.UNREADABLE_FILE


def test_retry_after_is_honoured_and_faults_are_retried() -> None:
    with FakeServer({"1": [429, 500], "2": [502], "3": [422]}) as fake:
        anydoor = AnyDoorClient(fake.url, api_key="sekrit", retries=3, backoff_base_s=0.01)
        result = anydoor.predict(reference=REFERENCE, background=BACKGROUND, box=["40,60,120,100"], seed=1)
        times = [r["time"] for r in fake.requests]
        assert result.attempts == 3 and times[1] - times[0] >= 0.95, "Retry-After: 1 was honoured"
        assert result.png.startswith(b"\x89PNG") and result.boxes == [(40, 60, 120, 100)] and result.seed == 1
        assert result.timings_ms["total"] == 5.0 and result.regions == 1 and result.server == fake.url
        assert fake.requests[0]["headers"]["Authorization"] == "Bearer sekrit"
        assert anydoor.predict(reference=REFERENCE, background=BACKGROUND, box="1,2,30,40", seed=2).attempts == 2
        with pytest.raises(AnyDoorError) as info:  # the request itself is wrong: sent once
            anydoor.predict(reference=REFERENCE, background=BACKGROUND, box="600,460,100,100", seed=3)
    assert (info.value.code, info.value.field, info.value.status, info.value.attempts) == (
        ErrorCode.BOX_OUT_OF_IMAGE, "box", 422, 1)


def test_giving_up_says_why() -> None:
    with FakeServer({"1": [502, 502]}) as fake:
        with pytest.raises(AnyDoorError) as info:
            AnyDoorClient(fake.url, retries=1, backoff_base_s=0.01).predict(
                reference=REFERENCE, background=BACKGROUND, box="1,2,30,40", seed=1)
    assert info.value.code is ErrorCode.HTTP_ERROR and "HTTP 502" in str(info.value)
    assert "gave up after 2 attempts" in str(info.value)
    with pytest.raises(AnyDoorError) as info:
        AnyDoorClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_base_s=0.01).predict(
            reference=REFERENCE, background=BACKGROUND, box="1,2,30,40")
    assert info.value.code is ErrorCode.UNREACHABLE and info.value.attempts == 3


def test_alive_is_false_only_when_no_server_answers() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert not AnyDoorClient(dead).alive()
    with FakeServer({}) as fake:  # it answers GET /health/live with 501: an answer all the same
        assert AnyDoorClient([dead, fake.url]).alive()


def test_several_servers_share_the_load() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with FakeServer({}) as one, FakeServer({}) as two:
        anydoor = AnyDoorClient([one.url, two.url + "/"])
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda seed: anydoor.predict(reference=REFERENCE, background=BACKGROUND,
                                                                 box="1,2,30,40", seed=seed), range(8)))
    assert len(one.requests) >= 2 and len(two.requests) >= 2 and len(one.requests) + len(two.requests) == 8
    assert {r.server for r in results} == {one.url, two.url}


def test_a_dead_server_is_retried_elsewhere() -> None:
    with FakeServer({}) as fake:
        anydoor = AnyDoorClient([f"http://127.0.0.1:{free_port()}", fake.url], retries=2, backoff_base_s=0.01)
        results = [anydoor.predict(reference=REFERENCE, background=BACKGROUND, box="1,2,30,40", seed=s)
                   for s in range(2)]
    assert all(r.server == fake.url for r in results)


# --- against the real service -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"ANYDOOR_DEMO": "1", "ANYDOOR_DEVICE": "cpu", "ANYDOOR_WARMUP_STEPS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with ServerProcess(env) as proc:
        proc.start(timeout=300)
        yield proc


@pytest.mark.slow
def test_the_client_is_a_direct_post(server: ServerProcess) -> None:
    result = AnyDoorClient(server.url).predict(reference=REFERENCE, background=BACKGROUND,
                                               box=["40,60,200,180"], steps=2, seed=1)
    files = {"reference": ("reference.png", REFERENCE.read_bytes(), "image/png"),
             "background": ("background.png", BACKGROUND.read_bytes(), "image/png")}
    direct = httpx.post(f"{server.url}/predict", files=files, data={"box": "40,60,200,180", "steps": "2", "seed": "1"},
                        timeout=300)
    assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
    assert result.png == direct.content
    assert result.seed == 1 and result.regions == 1 and result.boxes == [(40, 60, 200, 180)] and result.demo
    assert set(result.timings_ms) >= {"queue", "sample", "total"} and result.attempts == 1
    with pytest.raises(AnyDoorError) as info:
        AnyDoorClient(server.url).predict(reference=REFERENCE, background=BACKGROUND, box="600,460,100,100", steps=1)
    assert (info.value.code, info.value.status, info.value.field) == (ErrorCode.BOX_OUT_OF_IMAGE, 422, "box")
