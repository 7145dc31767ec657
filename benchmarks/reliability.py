"""The reliability suite: the service tried as an attacker would, in one run, with one line of figures.

    python benchmarks/reliability.py [--hostile 400] [--mixed 1000] [--slow-clients 300] [--json OUT]

It starts ``python -m service`` on the tiny reference weights (API key set, a path prefix) and measures:

* hostile inputs: requests built to break every field (mutated images of every accepted and several refused
  formats, bombs, absurd numbers, unknown and duplicated fields, broken multipart, huge box lists); goal: no 5xx;
* memory: the server's peak RSS growth during the largest request the limits admit against a normal one;
* slow clients: ``benchmarks/slow_clients.py``'s measurement, ``/health/live`` latency while hundreds of slow
  connections are held (goal: under 1 s);
* auth probes: path spellings under the prefix that a raw-path gate would let through (goal: 0 bypasses);
* RSS before and after ``--mixed`` requests of every kind (goal: within 10 %).

Exit status 1 when a goal is missed. Not part of the test suite (minutes of work); results go to
``benchmarks/results/`` with the machine they came from.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tests.support.server import CASE_A, ServerProcess, case_a_files, tiny_model_env  # noqa: E402

KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PREFIX = "/api"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --- hostile requests ------------------------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        pos = rng.randrange(len(buf)) if buf else 0
        if kind < 0.4 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.6:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind < 0.8 and buf:
            del buf[pos:pos + rng.randint(1, 64)]
        elif buf:
            buf[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
    return bytes(buf)


def image_corpus(rng: random.Random) -> list[bytes]:
    """Valid small images in many formats, then mutations of them, plus headers of formats the service refuses."""
    base = np.asarray(Image.open(CASE_A / "reference.png").convert("RGBA").resize((48, 40)))
    seeds = []
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGBA"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("ICO", "RGBA"), ("TGA", "RGB"), ("PPM", "RGB")):
        buf = io.BytesIO()
        image = Image.fromarray(base).convert(mode)
        try:
            image.save(buf, format=fmt)
        except (OSError, KeyError, ValueError):
            continue
        seeds.append(buf.getvalue())
    refused = [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
               b"%PDF-1.4\n", b"\x00\x00\x00\x1cftypavif" + bytes(64), b"DDS " + bytes(124), b"BLP1" + bytes(64),
               b"icns" + bytes(16), b"8BPS" + bytes(40), b"\x00" * 64, b"GIF89a\xff\xff\xff\xff" + bytes(16)]
    return seeds + [_mutate(rng.choice(seeds), rng) for _ in range(60)] + refused


def hostile_requests(count: int, rng: random.Random) -> list[dict[str, Any]]:
    good = case_a_files(mask=False)
    images = image_corpus(rng)
    bomb = png(np.zeros((4200, 4200), np.uint8))  # 17.6 MP: over the default pixel limit, tiny on the wire
    fields = ["reference", "background", "reference_mask", "background_mask"]
    values = ["", " ", "0", "-1", "1e309", "nan", "inf", "-0", "1_0", "0x10", "９", "\u202e5", "9" * 5000, "true",
              "null", "[]", "{}", "1,2,3", "1;2", "\x00", "' OR 1=1 --", "%s%s%s", "../../etc/passwd"]
    params = ["steps", "guidance_scale", "control_strength", "shape_control", "seed", "sampler",
              "reference_expand_ratio", "target_box_expand_ratio", "crop_expand_ratio", "box"]
    out: list[dict[str, Any]] = []
    while len(out) < count:
        kind = rng.random()
        files: dict[str, Any] = dict(good)
        data: dict[str, Any] = {"steps": "1", "guidance_scale": "1", "box": "10,10,64,64"}
        if kind < 0.45:
            files[rng.choice(fields)] = ("x.bin", rng.choice(images), rng.choice(["image/png", "text/plain"]))
        elif kind < 0.75:
            data[rng.choice(params)] = rng.choice(values)
        elif kind < 0.82:
            data["box"] = ";".join(f"{rng.randint(-5, 700)},{rng.randint(-5, 500)},{rng.randint(-5, 300)},"
                                   f"{rng.randint(-5, 300)}" for _ in range(rng.randint(1, 40)))
        elif kind < 0.86:
            files[rng.choice(fields)] = ("bomb.png", bomb, "image/png")
        elif kind < 0.90:
            data[rng.choice(["num_steps", "mask", "Steps", "reference", "x" * 300])] = "1"
        elif kind < 0.94:
            files = {}
            data = {"reference": "not a file", "background": "neither"}
        else:
            out.append({"raw": _raw_hostile(rng)})
            continue
        out.append({"files": files, "data": data})
    return out


def _raw_hostile(rng: random.Random) -> bytes:
    """Broken framing: truncated bodies, bad boundaries, lying lengths, odd content types."""
    body = b"--b\r\nContent-Disposition: form-data; name=\"steps\"\r\n\r\n1\r\n--b--\r\n"
    choices = [
        (b"multipart/form-data; boundary=b", body[: rng.randrange(len(body))]),
        (b"multipart/form-data", body),
        (b"multipart/form-data; boundary=" + b"x" * 5000, body),
        (b"application/x-www-form-urlencoded", b"steps=1&" * 50),
        (b"text/plain", b"hello"),
        (b"multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\n\r\n--b--\r\n"),
        (b"multipart/form-data; boundary=b", b"--b\r\n" + b"X-Header: " + b"a" * 20000 + b"\r\n\r\n1\r\n--b--\r\n"),
    ]
    content_type, payload = rng.choice(choices)
    return (b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Type: "
            + content_type + b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n"
            + payload)


def send_raw(server: ServerProcess, request: bytes) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            data += chunk
    return int(data.split(b" ", 2)[1])


def run_hostile(server: ServerProcess, client: httpx.Client, count: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    five_xx: list[str] = []
    for i, request in enumerate(hostile_requests(count, rng)):
        if "raw" in request:
            status = send_raw(server, request["raw"])
        else:
            status = client.post("/predict", files=request["files"], data=request["data"], headers=AUTH).status_code
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500 or status == 0:
            five_xx.append(f"#{i}: {status}")
    return {"tried": count, "statuses": dict(sorted(statuses.items())), "5xx": len(five_xx), "examples": five_xx[:10]}


# --- memory ------------------------------------------------------------------------------------------------------


def peak_rss_during(server: ServerProcess, send: Any) -> int:
    """The server's largest RSS (KiB) sampled every 10 ms while ``send()`` runs."""
    assert server.process is not None
    pid = server.process.pid
    peak = rss_kib(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.01)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        send()
    finally:
        done.set()
        thread.join()
    return peak


def run_memory(server: ServerProcess, client: httpx.Client, max_pixels: int, max_regions: int) -> dict[str, Any]:
    assert server.process is not None
    side = int(max_pixels**0.5)
    # The most pixels the limit admits, in a PNG that stays under the upload limit (smooth, so it compresses).
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    big = png(np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side))],
                       axis=-1).astype(np.uint8))
    boxes = ";".join(f"{40 + 70 * i},40,64,64" for i in range(max_regions))
    normal = {"files": case_a_files(mask=False), "data": {"steps": "1", "guidance_scale": "1", "box": "10,10,64,64"}}
    largest = {"files": {**case_a_files(mask=False), "background": ("big.png", big, "image/png")},
               "data": {"steps": "1", "guidance_scale": "1", "box": boxes}}
    results = {}
    for name, request in (("normal", normal), ("largest", largest)):
        base = rss_kib(server.process.pid)
        codes: list[int] = []

        def send(r: dict[str, Any] = request, out: list[int] = codes) -> None:
            out.append(client.post("/predict", headers=AUTH, **r).status_code)

        peak = peak_rss_during(server, send)
        results[name] = {"status": codes[0], "peak_growth_mib": round((peak - base) / 1024, 1)}
    results["upload_mib"] = round(len(big) / 2**20, 1)
    return results


# --- auth probes -------------------------------------------------------------------------------------------------


def run_auth_probes(client: httpx.Client) -> dict[str, Any]:
    paths = ["/predict", "/predict/", "//predict", f"{PREFIX}/predict", f"{PREFIX}//predict", "/./predict",
             "/%70redict", "/PREDICT", "/predict?x=1", f"{PREFIX}{PREFIX}/predict", "/predict;x", "/predict%2f",
             "/openapi.json", "/docs", "/nope", f"{PREFIX}/openapi.json"]
    methods = ["POST", "GET", "PUT", "OPTIONS", "HEAD"]
    headers = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
               {"Authorization": f"bearer  {KEY[:-1]}"}, {"X-API-Key": KEY}]
    bypasses: list[str] = []
    tried = 0
    # A bypass is a protected answer without the key: an image, the OpenAPI schema, a generation's JSON. (Some
    # spellings, e.g. "//predict", are parsed by the HTTP server as the public studio page at "/": not a bypass.)
    for path in paths:
        for method in methods:
            for header in headers:
                tried += 1
                kwargs: dict[str, Any] = {"headers": header}
                if method == "POST":
                    kwargs.update(files=case_a_files(mask=False), data={"steps": "1", "box": "10,10,64,64"})
                response = client.request(method, path, **kwargs)
                status, kind = response.status_code, response.headers.get("content-type", "")
                protected = kind.startswith("image/") or (kind.startswith("application/json") and (
                    '"openapi"' in response.text or '"image"' in response.text))
                if status >= 500 or (status < 300 and protected):
                    bypasses.append(f"{method} {path} {header}: {status} {kind}")
    return {"tried": tried, "bypasses": len(bypasses), "examples": bypasses[:10]}


# --- a long mixed run --------------------------------------------------------------------------------------------


def run_mixed(server: ServerProcess, client: httpx.Client, count: int, seed: int) -> dict[str, Any]:
    assert server.process is not None
    rng = random.Random(seed)
    hostile = hostile_requests(count, rng)
    valid = {"files": case_a_files(mask=False), "data": {"steps": "1", "guidance_scale": "1", "box": "10,10,64,64"}}
    statuses: dict[int, int] = {}

    def one(i: int) -> int:
        request = valid if i % 10 == 0 else hostile[i]
        with httpx.Client(base_url=server.url, timeout=300) as c:
            if "raw" in request:
                return send_raw(server, request["raw"])
            return c.post("/predict", headers=AUTH, **request).status_code

    # A first pass over the same mix warms what legitimately stays (allocator pools, oneDNN kernels for each
    # batch shape); the baseline is taken after it, so growth over the measured pass would be a leak.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(min(count, 200))))
    time.sleep(1.0)
    before = rss_kib(server.process.pid)
    with ThreadPoolExecutor(4) as pool:
        for status in pool.map(one, range(count)):
            statuses[status] = statuses.get(status, 0) + 1
    time.sleep(1.0)
    after = rss_kib(server.process.pid)
    return {"requests": count, "statuses": dict(sorted(statuses.items())), "rss_before_mib": round(before / 1024, 1),
            "rss_after_mib": round(after / 1024, 1), "growth_pct": round(100 * (after - before) / before, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostile", type=int, default=400, help="hostile requests to send (default 400)")
    parser.add_argument("--mixed", type=int, default=1000, help="requests of the long mixed run (default 1000)")
    parser.add_argument("--slow-clients", type=int, default=300, help="slow connections to hold (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    max_pixels, max_regions = 16_777_216, 8
    env = {**tiny_model_env(), "ANYDOOR_API_KEY": KEY, "ANYDOOR_ROOT_PATH": PREFIX, "ANYDOOR_WARMUP_STEPS": "1",
           "ANYDOOR_MAX_QUEUE": "64", "ANYDOOR_QUEUE_TIMEOUT_S": "600", "ANYDOOR_MAX_PIXELS": str(max_pixels),
           "ANYDOOR_MAX_REGIONS": str(max_regions), "ANYDOOR_LOG_LEVEL": "warning"}
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                          "cpus": os.cpu_count()}}
    with ServerProcess(env) as server:
        server.start()
        with httpx.Client(base_url=server.url, timeout=300) as client:
            t0 = time.monotonic()
            report["hostile"] = run_hostile(server, client, args.hostile, args.seed)
            report["memory"] = run_memory(server, client, max_pixels, max_regions)
            report["auth"] = run_auth_probes(client)
            try:
                from slow_clients import measure
            except ImportError:
                report["slow_clients"] = None
            else:
                report["slow_clients"] = measure(server.url, args.slow_clients, 10.0)
            report["mixed"] = run_mixed(server, client, args.mixed, args.seed + 1)
            report["wall_s"] = round(time.monotonic() - t0, 1)
        report["server_log_tracebacks"] = server.log().count("Traceback")

    h, m, a, mx, sc = (report[k] for k in ("hostile", "memory", "auth", "mixed", "slow_clients"))
    health = (f"/health/live max {sc['health_ms']['max']:.0f} ms with {sc['held']} slow clients held" if sc
              else "slow clients: n/a")
    print(f"reliability: hostile {h['tried']} -> {h['5xx']} 5xx; peak RSS growth largest "
          f"{m['largest']['peak_growth_mib']} MiB vs normal {m['normal']['peak_growth_mib']} MiB; {health}; "
          f"auth probes {a['tried']} -> {a['bypasses']} bypasses; RSS {mx['rss_before_mib']} -> "
          f"{mx['rss_after_mib']} MiB after {mx['requests']} mixed ({mx['growth_pct']:+.1f} %); {report['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    ok = (h["5xx"] == 0 and a["bypasses"] == 0 and abs(mx["growth_pct"]) <= 10
          and (not sc or sc["health_ms"]["max"] < 1000))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
