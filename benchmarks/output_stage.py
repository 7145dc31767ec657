"""The served answer's image encoding (the ``output`` stage of ``Server-Timing``) per ``output_format``.

    python benchmarks/output_stage.py                  # starts a server with the tiny test weights (CPU)
    python benchmarks/output_stage.py --url http://127.0.0.1:8000 --size 3840x2160 --repeats 5

Sends the same ``/predict`` request (the photo-like background of ``host_time.py`` as a JPEG upload, one box,
1 step, seed 1) once per format in turn, ``--repeats`` rounds, to one server, so that the formats are compared in
the same run on the same load; reads each answer's ``output`` stage (encoding the answer's image, as the server
measured it) and its size, and prints the medians and the PNG/JPEG ratio. Exit status 1 unless the JPEG
answer's ``output`` stage is at least 10 times shorter than the PNG one's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host_time import CASE_A, scene  # noqa: E402
from tests.support.server import ServerProcess, server_timing, tiny_model_env  # noqa: E402

FORMATS = ("png", "jpeg", "webp")


def measure(url: str, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    width, height = size
    upload = io.BytesIO()
    scene(width, height).save(upload, format="JPEG", quality=90)
    files = {"reference": ("reference.png", (CASE_A / "reference.png").read_bytes(), "image/png"),
             "background": ("background.jpg", upload.getvalue(), "image/jpeg")}
    box = f"{width // 4},{height // 4},{width // 3},{height // 3}"
    samples: dict[str, list[dict[str, float]]] = {fmt: [] for fmt in FORMATS}
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(repeats):
            for fmt in FORMATS:
                answer = client.post("/predict", files=files, data={"box": box, "steps": "1", "seed": "1",
                                                                    "output_format": fmt})
                answer.raise_for_status()
                assert answer.headers["content-type"] == f"image/{fmt}", answer.headers["content-type"]
                samples[fmt].append(server_timing(answer.headers["server-timing"]))
                sizes[fmt] = len(answer.content)
    report: dict[str, Any] = {"size": f"{width}x{height}", "repeats": repeats, "formats": {}}
    for fmt in FORMATS:
        report["formats"][fmt] = {
            "output_ms": round(statistics.median(s["output"] for s in samples[fmt]), 1),
            "postprocess_ms": round(statistics.median(s["postprocess"] for s in samples[fmt]), 1),
            "total_ms": round(statistics.median(s["total"] for s in samples[fmt]), 1),
            "bytes": sizes[fmt], "output_ms_all": [s["output"] for s in samples[fmt]]}
    formats = report["formats"]
    report["png_over_jpeg"] = round(formats["png"]["output_ms"] / max(formats["jpeg"]["output_ms"], 1e-3), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one with the tiny test weights)")
    parser.add_argument("--size", default="3840x2160", help="the background's WIDTHxHEIGHT (default 3840x2160)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of one request per format (default 3)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    width, _, height = args.size.partition("x")
    size = (int(width), int(height))
    if args.url:
        report = measure(args.url, size, args.repeats)
    else:
        with ServerProcess({**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1"}) as server:
            server.start()
            report = measure(server.url, size, args.repeats)
    print(f"{report['size']}, {report['repeats']} rounds, load {os.getloadavg()[0]:.2f}: median ms per answer")
    for fmt, row in report["formats"].items():
        print(f"  {fmt:5} output {row['output_ms']:8.1f}  postprocess {row['postprocess_ms']:6.1f}  "
              f"total {row['total_ms']:8.1f}  {row['bytes'] / 1024:8.0f} KiB")
    print(f"  png output / jpeg output: x{report['png_over_jpeg']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["png_over_jpeg"] >= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
