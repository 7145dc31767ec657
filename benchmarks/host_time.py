"""Host (CPU) time of one request outside the networks, per output format, at 512x512 and 3840x2160.

    python benchmarks/host_time.py [--repeats 5] [--json benchmarks/results/cpu-host_time.json]

The stages a GPU server still runs on its CPU for every request: decoding the uploaded background (a JPEG, as
clients send photos) and reference, preprocessing one region (crops, the collage hint), pasting the generated
crop back, and encoding the answer. Each encoder variant is timed on the same image in one run, interleaved, so
the ratios hold on a shared machine; it also measures PNG zlib levels and WebP methods, the measurement behind
``PNG_COMPRESS_LEVEL`` and ``WEBP_METHOD`` in ``model/pipeline/result.py``. The goal: host time under 10 % of
the GPU target, 50 ms at 512x512 and 150 ms at 3840x2160 with JPEG.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import cpu_name, format_table, write_json  # noqa: E402
from model.imaging.decode import load_image, load_reference  # noqa: E402
from model.imaging.postprocess import paste_back  # noqa: E402
from model.imaging.preprocess import prepare_inputs  # noqa: E402
from model.imaging.regions import box_mask  # noqa: E402
from model.pipeline.result import PNG_COMPRESS_LEVEL, WEBP_METHOD, GenerationResult  # noqa: E402

CASE_A = REPO / "tests" / "fixtures" / "reference" / "case_a"
SIZES = {"512x512": (512, 512), "3840x2160": (3840, 2160)}
GOAL_MS = {"512x512": 50.0, "3840x2160": 150.0}


def scene(width: int, height: int) -> Image.Image:
    """A photo-like background: the reference case's scene scaled up (smooth areas, edges) plus sensor noise."""
    base = Image.open(CASE_A / "background.png").convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 3, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def encoders() -> dict[str, Callable[[Image.Image], bytes]]:
    def png(level: int) -> Callable[[Image.Image], bytes]:
        def run(image: Image.Image) -> bytes:
            buf = io.BytesIO()
            info = PngImagePlugin.PngInfo()
            info.add_text("anydoor:seed", "1")
            image.save(buf, format="PNG", pnginfo=info, compress_level=level)
            return buf.getvalue()
        return run

    def webp(method: int) -> Callable[[Image.Image], bytes]:
        def run(image: Image.Image) -> bytes:
            buf = io.BytesIO()
            image.save(buf, format="WEBP", quality=90, method=method)
            return buf.getvalue()
        return run

    def shipped(fmt: str) -> Callable[[Image.Image], bytes]:
        return lambda image: GenerationResult(image, 1, {}, 1).encode(fmt, 90)

    return {**{f"png level {n}": png(n) for n in (1, 3, 6, 9)},
            **{f"webp method {n}": webp(n) for n in (0, 2, 4)},
            f"png (shipped, level {PNG_COMPRESS_LEVEL})": shipped("png"), "jpeg q90 (shipped)": shipped("jpeg"),
            f"webp q90 (shipped, method {WEBP_METHOD})": shipped("webp")}


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (and the last value)."""
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def measure(label: str, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    width, height = size
    image = scene(width, height)
    upload = io.BytesIO()
    image.save(upload, format="JPEG", quality=90)
    upload_bytes = upload.getvalue()
    reference_bytes = (CASE_A / "reference.png").read_bytes()
    box = (width // 4, height // 4, width // 3, height // 3)

    decode_s, background = best(lambda: load_image(upload_bytes, field="background", max_pixels=4096 * 4096),
                                repeats)
    ref_s, (ref_rgb, ref_mask) = best(lambda: load_reference(reference_bytes, None, max_pixels=4096 * 4096), repeats)
    target = box_mask(box, (height, width))
    pre_s, prepared = best(lambda: prepare_inputs(ref_rgb, ref_mask, background, target), repeats)
    crop = np.asarray(Image.fromarray(prepared.jpg_u8)).astype(np.float32) / 127.5 - 1  # a "generated" crop
    post_s, pasted = best(lambda: paste_back(crop, background, prepared), repeats)
    result_image = Image.fromarray(pasted)

    fixed_ms = (decode_s + ref_s + pre_s + post_s) * 1000
    rows, encode = [], {}
    funcs = encoders()
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    sizes: dict[str, int] = {}
    for _ in range(repeats):  # interleaved
        for name, fn in funcs.items():
            t0 = time.perf_counter()
            sizes[name] = len(fn(result_image))
            samples[name].append(time.perf_counter() - t0)
    for name in funcs:
        ms = statistics.median(samples[name]) * 1000
        encode[name] = {"encode_ms": round(ms, 2), "bytes": sizes[name], "host_ms": round(fixed_ms + ms, 2)}
        rows.append([label, name, round(ms, 1), round(sizes[name] / 1024), round(fixed_ms + ms, 1),
                     f"{(fixed_ms + ms) / (GOAL_MS[label] * 10) * 100:.1f} %"])
    return {"size": label, "decode_background_ms": round(decode_s * 1000, 2),
            "decode_reference_ms": round(ref_s * 1000, 2), "preprocess_ms": round(pre_s * 1000, 2),
            "postprocess_ms": round(post_s * 1000, 2), "encoders": encode, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import os

    results = [measure(label, size, args.repeats) for label, size in SIZES.items()]
    print(f"cpu: {cpu_name()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.2f}")
    for r in results:
        print(f"{r['size']}: decode background {r['decode_background_ms']} ms, reference "
              f"{r['decode_reference_ms']} ms, preprocess {r['preprocess_ms']} ms, postprocess "
              f"{r['postprocess_ms']} ms")
    print(format_table(["size", "encoder", "encode ms", "KiB", "host ms", "of GPU target"],
                       [row for r in results for row in r["rows"]]))
    write_json(args.json, {"cpu": cpu_name(), "loadavg_1m": round(os.getloadavg()[0], 2), "repeats": args.repeats,
                           "goal_ms": GOAL_MS, "results": [{k: v for k, v in r.items() if k != "rows"}
                                                           for r in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
