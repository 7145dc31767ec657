"""``anydoor batch``: a manifest in, a labelled dataset out (images, results.jsonl, COCO, YOLO), resumable, locally
and fanned out over servers (real ones, and a fake one that answers 429 / 500 / 422)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anydoor_batch import manifest as batch
from anydoor_batch import remote
from model.errors import CLIENT_SIDE, ErrorCode
from model.pipeline.params import GenerationInputs
from model.spec.files import LocalFiles
from service.cli import main
from tests.support.fake import FakeServer
from tests.support.server import CASE_A, REPO, ServerProcess, free_port, metric, wait_for

needs_regions = pytest.mark.skipif("placement" not in GenerationInputs.__dataclass_fields__,
                                   reason="per-region references and placement are not in the pipeline yet")
SERVER_ENV = {"ANYDOOR_DEMO": "1", "ANYDOOR_DEVICE": "cpu", "ANYDOOR_WARMUP_STEPS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
FAST = {"steps": 2, "guidance_scale": 1.0}  # 2 steps, one guidance branch: the demo model's cheapest generation


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """The case_a images, a second reference under another name (another category) and a road-like area mask."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("reference", "background", "background_mask"):
        shutil.copy(CASE_A / f"{name}.png", folder / f"{name}.png")
    shutil.copy(CASE_A / "reference.png", folder / "bottle.png")
    area = np.zeros((480, 640), dtype=np.uint8)
    area[280:, 40:600] = 255
    Image.fromarray(area).save(folder / "area.png")
    return folder


def write_manifest(folder: Path, lines: list[dict[str, Any] | str]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def results(out: Path) -> list[dict[str, Any]]:
    """The records of results.jsonl, in order (a last line cut short by a kill is not one: the tool drops it)."""
    text = (out / "results.jsonl").read_text()
    return [json.loads(row) for row in text[:text.rfind("\n") + 1].splitlines()]


def latest(out: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in results(out)}


def line(**fields: Any) -> dict[str, Any]:
    return {"reference": "reference.png", "background": "background.png", **FAST, **fields}


# --- the dataset's shape ------------------------------------------------------------------------------------------


def check_coco(out: Path) -> dict[str, Any]:
    """COCO's detection schema, checked key by key, and every id consistent with the others and the files."""
    coco = json.loads((out / "annotations.json").read_text())
    for key in ("images", "annotations", "categories"):
        assert isinstance(coco[key], list), key
    images = {}
    for image in coco["images"]:
        assert set(image) >= {"id", "file_name", "width", "height"}
        assert isinstance(image["id"], int) and image["id"] not in images
        assert isinstance(image["file_name"], str) and (out / "images" / image["file_name"]).is_file()
        assert isinstance(image["width"], int) and isinstance(image["height"], int)
        with Image.open(out / "images" / image["file_name"]) as png:
            assert png.size == (image["width"], image["height"])
        images[image["id"]] = image
    categories = {}
    for category in coco["categories"]:
        assert isinstance(category["id"], int) and isinstance(category["name"], str)
        assert category["id"] not in categories
        categories[category["id"]] = category
    seen = set()
    for item in coco["annotations"]:
        assert set(item) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        assert isinstance(item["id"], int) and item["id"] not in seen
        seen.add(item["id"])
        assert item["image_id"] in images and item["category_id"] in categories and item["iscrowd"] == 0
        x, y, w, h = item["bbox"]
        image = images[item["image_id"]]
        assert all(isinstance(v, int | float) for v in (x, y, w, h)) and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"], "bbox inside the image"
        assert isinstance(item["area"], int | float) and 0 < item["area"] <= w * h
        if "segmentation" in item:
            seg = item["segmentation"]
            assert seg["size"] == [image["height"], image["width"]]
            assert sum(seg["counts"]) == image["height"] * image["width"]
            mask = np.repeat(np.arange(len(seg["counts"])) % 2 == 1, seg["counts"]).reshape(seg["size"][::-1]).T
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == [x, y, w, h]
            assert item["area"] == mask.sum()
    return coco


def check_labels(out: Path, coco: dict[str, Any]) -> None:
    """The YOLO labels say what the COCO boxes say, with classes.txt naming the classes in category order."""
    classes = (out / "labels" / "classes.txt").read_text().splitlines()
    assert classes == [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    for image in coco["images"]:
        stem = Path(image["file_name"]).stem
        rows = [row.split() for row in (out / "labels" / f"{stem}.txt").read_text().splitlines()]
        boxes = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(rows) == len(boxes)
        width, height = image["width"], image["height"]
        for row, item in zip(rows, boxes, strict=True):
            cls, cx, cy, w, h = int(row[0]), *map(float, row[1:])
            assert cls == item["category_id"] - 1 and 0 <= cx <= 1 and 0 <= cy <= 1
            x, y, bw, bh = item["bbox"]
            assert np.allclose([cx * width, cy * height, w * width, h * height],
                               [x + bw / 2, y + bh / 2, bw, bh], atol=1e-3 * max(width, height))


def check_matches_results(out: Path, coco: dict[str, Any]) -> None:
    """COCO's boxes are the boxes the generations returned (results.jsonl), image by image, in order."""
    ok = {r["id"]: r for r in latest(out).values() if r["status"] == "ok"}
    assert sorted(Path(i["file_name"]).stem for i in coco["images"]) == sorted(ok)
    for image in coco["images"]:
        record = ok[Path(image["file_name"]).stem]
        assert image["id"] == record["line"]
        assert [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]] == record["boxes"]


# --- local mode ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_batch_writes_a_labelled_dataset_and_resumes(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(data, [
        line(id="two-boxes", box=[[40, 60, 120, 100], [300, 200, 150, 150]], seed=1),
        line(background_mask="background_mask.png", shape_control=True),
        line(id="missing", reference="nope.png", box=[10, 10, 50, 50]),
        "{not json",
        line(id="typo", box=[10, 10, 50, 50], stepz=2),
        line(id="zero-steps", box=[10, 10, 50, 50], steps=0),
        line(id="placed", reference="bottle.png",
             placement={"count": 1, "min_size": 64, "max_size": 120, "area": "area.png"}, seed=5),
    ])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 1
    assert "3 ok, 4 failed, 0 skipped" in capsys.readouterr().out

    records = latest(out)
    assert {i: r["status"] for i, r in records.items()} == {
        "two-boxes": "ok", "2": "ok", "missing": "failed", "4": "failed", "typo": "failed", "zero-steps": "failed",
        "placed": "ok"}
    errors = {i: (r["line"], r["error"]["code"], r["error"]["field"]) for i, r in records.items() if "error" in r}
    assert errors == {"missing": (3, "unreadable_file", "reference"), "4": (4, "invalid_json", None),
                      "typo": (5, "unknown_field", "stepz"), "zero-steps": (6, "out_of_range", "steps")}
    assert records["two-boxes"]["boxes"] == [[40, 60, 120, 100], [300, 200, 150, 150]]
    assert records["two-boxes"]["seed"] == 1 and set(records["two-boxes"]["timings"]) >= {"sample", "total"}
    (x, y, w, h), = records["placed"]["boxes"]
    assert y >= 280 and 40 <= x and x + w <= 600 and 64 <= max(w, h) <= 120, "placed inside the allowed area"
    for name in ("two-boxes", "2", "placed"):
        with Image.open(out / "images" / f"{name}.png") as png:
            assert png.size == (640, 480)

    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)
    assert [c["name"] for c in coco["categories"]] == ["reference", "bottle"]
    (seg,) = [a for a in coco["annotations"] if "segmentation" in a]  # shape control + a mask: the region's shape
    assert seg["image_id"] == 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    # Again: the finished lines are skipped (not generated again), the failed ones retried (and fail again).
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 1
    assert "0 ok, 4 failed, 3 skipped" in capsys.readouterr().out
    assert [r["id"] for r in results(out) if r["status"] == "ok"] == ["two-boxes", "2", "placed"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert check_coco(out) == coco | {"info": check_coco(out)["info"]}


def test_manifest_lines_are_validated_with_the_field_named(data: Path) -> None:
    lines, bad, total = batch.read_manifest(write_manifest(data, [
        line(box=[[1, 2, 30, 40]], background_mask="background_mask.png"),
        line(),
        line(id="../up", box=[[1, 2, 30, 40]]),
        line(id="a", box=[[1, 2, 30, 40]]),
        line(id="A", box=[[1, 2, 30, 40]]),
        line(box=[[1, 2, 30]]),
        line(reference=["reference.png", "bottle.png"], box=[[1, 2, 30, 40]]),
        line(placement={"count": 1, "min_size": 8, "max_size": 9}),
        line(placement={"count": 1, "min_size": 8, "max_size": 9, "area": "area.png", "tilt": 1}),
        line(box=[[1, 2, 30, 40]], guidance_scale="high"),
        "[1, 2]",
        "",
        line(id=70, reference=["reference.png", "bottle.png"], box=[[1, 2, 30, 40], [50, 60, 30, 40]]),
    ]))
    assert total == 12 and [(x.number, x.id) for x in lines] == [(4, "a"), (13, "70")]
    assert lines[1].classes(2) == ["reference", "bottle"] and lines[0].classes(2) == ["reference", "reference"]
    got = {b.number: (b.error.code.value, b.error.field) for b in bad}
    assert got == {
        1: ("conflicting_target", "background_mask"), 2: ("missing_target", "background_mask"),
        3: ("invalid_parameter", "id"),
        5: ("invalid_parameter", "id"), 6: ("invalid_box", "box"), 7: ("reference_count_mismatch", "reference"),
        8: ("missing_field", "placement_area"), 9: ("invalid_parameter", "placement"),
        10: ("invalid_parameter", "guidance_scale"), 11: ("invalid_json", None)}
    assert "also the id of line 4" in next(b for b in bad if b.number == 5).error.message


def test_usage_errors_exit_2(data: Path, tmp_path: Path) -> None:
    manifest = write_manifest(data, [line(box=[[1, 2, 30, 40]])])
    assert main(["batch", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o"), "--demo"]) == 2
    assert main(["batch", str(manifest), "-o", str(tmp_path / "o"), "--url", "ftp://example"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["batch", str(manifest), "-o", str(tmp_path / "o"), "--demo", "--batch", "0"])
    assert info.value.code == 2


@pytest.mark.slow
def test_killed_mid_run_resumes_without_redoing_finished_lines(data: Path) -> None:
    manifest = write_manifest(data, [line(id=f"img{i}", box=[[40 + 60 * i, 60, 120, 100]], seed=i)
                                     for i in range(4)])
    out = data.parent / "out"
    cmd = [sys.executable, "-m", "service.cli", "batch", str(manifest), "-o", str(out), "--demo", "--batch", "1",
           "--quiet"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Killed as soon as the first image is written and recorded, while the next one is being generated.
        wait_for(lambda: (out / "results.jsonl").exists() and '"ok"' in (out / "results.jsonl").read_text(), 300)
    finally:
        proc.kill()
        proc.wait()
    before = results(out)
    finished = {r["id"] for r in before if r["status"] == "ok"}
    assert finished and len(finished) < 4, "killed mid-run"
    mtimes = {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in finished}

    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    after = results(out)[len(before):]
    assert not {r["id"] for r in after} & finished, "finished lines are not generated again"
    assert sorted(r["id"] for r in before + after if r["status"] == "ok") == [f"img{i}" for i in range(4)]
    assert {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in finished} == mtimes
    assert not list(out.rglob(".*.tmp")), "no temporary file is left behind"
    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)
    assert len(coco["images"]) == 4


@needs_regions
@pytest.mark.slow
def test_local_per_region_references_and_placement(data: Path) -> None:
    manifest = write_manifest(data, [
        line(id="two", reference=["reference.png", "bottle.png"], box=[[40, 60, 120, 100], [300, 200, 150, 150]]),
        line(id="placed", reference=["bottle.png", "reference.png"],
             placement={"count": 2, "min_size": 64, "max_size": 100, "min_gap": 8, "area": "area.png"}, seed=3),
    ])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    records = latest(out)
    assert records["two"]["classes"] == ["reference", "bottle"]
    assert records["placed"]["classes"] == ["bottle", "reference"] and len(records["placed"]["boxes"]) == 2
    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)


# --- remote mode ---------------------------------------------------------------------------------------------------


def test_remote_retries_429_and_5xx_and_sends_the_form(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYDOOR_API_KEY", "sekrit")
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.05)
    manifest = write_manifest(data, [
        line(id="busy", box=[[40, 60, 120, 100], [300, 200, 150, 150]], seed=1, shape_control=True),
        line(id="refused", box=[[600, 460, 100, 100]], seed=2),
        line(id="flaky", background_mask="background_mask.png", reference_mask="background_mask.png", seed=3),
        line(id="placed", reference=["reference.png", "bottle.png"], seed=4,
             placement={"count": 2, "min_size": 30, "max_size": 30, "area": "area.png"}),
    ])
    out = data.parent / "out"
    with FakeServer({"1": [429], "2": [422], "3": [500]}) as fake:
        code = main(["batch", str(manifest), "-o", str(out), "--url", fake.url + "/", "--concurrency", "2",
                     "--retries", "3", "--quiet"])
    assert code == 1
    by_seed: dict[str, list[dict[str, Any]]] = {}
    for request in fake.requests:
        by_seed.setdefault(request["texts"]["seed"], []).append(request)
        assert request["path"] == "/predict"
        assert request["headers"]["Authorization"] == "Bearer sekrit"
        assert request["headers"]["Accept"] == "application/json"
    assert {seed: len(reqs) for seed, reqs in by_seed.items()} == {"1": 2, "2": 1, "3": 2, "4": 1}
    assert by_seed["1"][1]["time"] - by_seed["1"][0]["time"] >= 0.95, "Retry-After: 1 was honoured"

    records = latest(out)
    assert records["busy"]["status"] == "ok" and records["busy"]["attempts"] == 2
    assert records["refused"]["error"] == {"code": "box_out_of_image", "field": "box",
                                           "message": "box_out_of_image (fake)"}
    assert records["placed"]["boxes"] == [[10, 300, 30, 30], [50, 300, 30, 30]]
    assert records["placed"]["classes"] == ["reference", "bottle"]

    # The fields, exactly as the /predict form has them (files, repeated boxes, parameters as text).
    def fields(seed: str) -> list[tuple[str, str | None]]:
        return [(name, filename) for name, filename, _ in by_seed[seed][0]["parts"]]

    assert fields("1") == [("reference", "reference.png"), ("background", "background.png"), ("box", None),
                           ("box", None), ("steps", None), ("guidance_scale", None), ("shape_control", None),
                           ("seed", None)]
    assert by_seed["1"][0]["texts"] | {"box": None} == {"steps": "2", "guidance_scale": "1.0", "box": None,
                                                        "shape_control": "true", "seed": "1"}
    assert [v for n, _, v in by_seed["1"][0]["parts"] if n == "box"] == [b"40,60,120,100", b"300,200,150,150"]
    assert fields("3")[:4] == [("reference", "reference.png"), ("reference_mask", "background_mask.png"),
                               ("background", "background.png"), ("background_mask", "background_mask.png")]
    assert fields("4")[:5] == [("reference", "reference.png"), ("reference", "bottle.png"),
                               ("background", "background.png"), ("placement", None),
                               ("placement_area", "area.png")]
    assert json.loads(by_seed["4"][0]["texts"]["placement"]) == {"count": 2, "min_size": 30, "max_size": 30,
                                                                  "perspective": False, "aspect": 1.0, "min_gap": 0}
    uploaded = next(v for n, _, v in by_seed["1"][0]["parts"] if n == "reference")
    assert uploaded == (data / "reference.png").read_bytes()
    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)


def test_remote_gives_up_on_a_dead_server(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)
    manifest = write_manifest(data, [line(box=[[1, 2, 30, 40]])])
    out = data.parent / "out"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["batch", str(manifest), "-o", str(out), "--url", url, "--retries", "2", "--quiet"]) == 1
    error = latest(out)["1"]["error"]
    assert error["code"] == ErrorCode.UNREACHABLE.value and "after 3 attempts" in error["message"]
    assert ErrorCode(error["code"]) in CLIENT_SIDE  # a member of the closed vocabulary, documented in the README


def test_a_dead_fleet_fails_the_rest_of_the_manifest_without_sending_it(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)
    manifest = write_manifest(data, [line(box=[[1, 2, 30, 40]], seed=seed) for seed in range(1, 6)])
    out = data.parent / "out"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["batch", str(manifest), "-o", str(out), "--url", url, "--retries", "2", "--concurrency", "1",
                 "--quiet"]) == 1
    records = latest(out)
    assert [records[str(n)]["error"]["code"] for n in range(1, 6)] == [ErrorCode.UNREACHABLE.value] * 5
    assert "after 3 attempts" in records["1"]["error"]["message"]
    assert all(records[str(n)]["error"]["message"] == remote.NOT_SENT for n in range(2, 6))
    err = capsys.readouterr().err
    assert err.count("no server answers") == 1 and "the 4 lines not yet sent" in err and "line 2 " not in err


def test_one_line_that_gets_no_answer_does_not_stop_the_others(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_BASE_S", 0.01)
    manifest = write_manifest(data, [line(box=[[1, 2, 30, 40]], seed=seed) for seed in (1, 2, 3)])
    out = data.parent / "out"
    with FakeServer({"1": [0, 0, 0]}) as fake:  # line 1's connection closes unanswered, every time
        assert main(["batch", str(manifest), "-o", str(out), "--url", fake.url, "--retries", "2",
                     "--concurrency", "1", "--quiet"]) == 1
    records = latest(out)
    assert records["1"]["error"]["code"] == ErrorCode.UNREACHABLE.value
    assert "after 3 attempts" in records["1"]["error"]["message"]
    assert records["2"]["status"] == records["3"]["status"] == "ok"  # the server still answers: the rest is sent


@pytest.fixture(scope="module")
def servers() -> Iterator[list[ServerProcess]]:
    procs = [ServerProcess(SERVER_ENV), ServerProcess(SERVER_ENV)]
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: start-up is most of this test's time
            list(pool.map(lambda p: p.start(timeout=300), procs))
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def inferences(server: ServerProcess) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        return metric(response.read().decode(), "anydoor_inference_duration_seconds_count")


@pytest.mark.slow
def test_remote_lines_are_spread_over_both_servers(data: Path, servers: list[ServerProcess]) -> None:
    manifest = write_manifest(data, [line(id=f"r{i}", box=[[40 + 60 * i, 60, 120, 100]], seed=i) for i in range(4)])
    out = data.parent / "out"
    before = [inferences(s) for s in servers]
    assert main(["batch", str(manifest), "-o", str(out), "--url", servers[0].url, "--url", servers[1].url,
                 "--concurrency", "2", "--quiet"]) == 0
    counts = [inferences(s) - b for s, b in zip(servers, before, strict=True)]
    assert sum(counts) == 4 and min(counts) >= 1, counts
    assert {r["server"] for r in latest(out).values()} == {s.url for s in servers}
    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)


@pytest.mark.slow
@needs_regions
def test_remote_per_region_references_and_placement(data: Path, servers: list[ServerProcess]) -> None:
    manifest = write_manifest(data, [
        line(id="two", reference=["reference.png", "bottle.png"], box=[[40, 60, 120, 100], [300, 200, 150, 150]]),
        line(id="placed", placement={"count": 2, "min_size": 64, "max_size": 100, "area": "area.png"}, seed=3),
    ])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--url", servers[0].url, "--quiet"]) == 0
    records = latest(out)
    assert records["two"]["classes"] == ["reference", "bottle"] and len(records["placed"]["boxes"]) == 2
    for x, y, w, h in records["placed"]["boxes"]:
        assert y >= 280 and x >= 40 and x + w <= 600 and 64 <= max(w, h) <= 100
    coco = check_coco(out)
    check_labels(out, coco)
    check_matches_results(out, coco)


# --- lines keyed like /predict, and manifests that try to do harm -------------------------------------------------


@pytest.mark.slow  # four lines generated
def test_a_line_keyed_like_a_predict_form_is_accepted(data: Path) -> None:
    manifest = write_manifest(data, [
        line(id="form-box", box="40,50,160,120", seed=1),
        line(id="form-boxes", box=["40,50,160,120", "300,200,150,150"], seed=2),
        line(id="flat-placement", placement={"count": 1, "min_size": 64, "max_size": 120},
             placement_area="area.png", seed=3),
        line(id="placement-text", placement='{"count": 1, "min_size": 64, "max_size": 120}',
             placement_area="area.png", seed=3),
    ])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    records = latest(out)
    assert records["form-box"]["boxes"] == [[40, 50, 160, 120]]
    assert records["form-boxes"]["boxes"] == [[40, 50, 160, 120], [300, 200, 150, 150]]
    assert records["flat-placement"]["boxes"] == records["placement-text"]["boxes"]
    for line_id in records:
        assert (out / "images" / f"{line_id}.png").read_bytes().startswith(b"\x89PNG")
    # the old nested form ({"area": ...} inside the placement) is the same request
    lines, bad, _ = batch.read_manifest(write_manifest(data, [
        line(placement={"count": 1, "min_size": 64, "max_size": 120, "area": "area.png"})]))
    assert not bad and lines[0].placement_area == (data / "area.png")


def test_limits_are_the_services(data: Path) -> None:
    manifest = write_manifest(data, [line(id="nine", box=";".join(["10,10,40,40"] * 9))])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 1
    assert latest(out)["nine"]["error"]["code"] == "too_many_regions"


@pytest.mark.slow  # nine regions generated
def test_the_services_limit_flags_raise_the_batch_limits(data: Path) -> None:
    manifest = write_manifest(data, [line(id="nine", box=";".join(["10,10,40,40"] * 9))])
    out = data.parent / "out-nine"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet", "--max-regions", "9"]) == 0
    assert len(latest(out)["nine"]["boxes"]) == 9


def test_manifest_files_stay_in_the_manifest_directory(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    shutil.copy(data / "reference.png", outside)
    (data / "link.png").symlink_to(outside)
    (data / "folder.png").mkdir()
    cases = {"passwd": "/etc/passwd", "up": "../secret.png", "link": "link.png", "dir": "folder.png",
             "newline": "bad\nname.png", "zero": "/dev/zero"}
    manifest = write_manifest(data, [line(id=i, reference=ref, box="1,2,30,40") for i, ref in cases.items()])
    lines, bad, total = batch.read_manifest(manifest)
    assert total == 6 and not lines
    got = {b.id: (b.error.code.value, b.error.field) for b in bad}
    assert got == {"passwd": ("path_outside_base", "reference"), "up": ("path_outside_base", "reference"),
                   "link": ("path_outside_base", "reference"), "dir": ("not_a_file", "reference"),
                   "newline": ("invalid_file_name", "reference"), "zero": ("path_outside_base", "reference")}
    assert "--allow-paths-outside" in next(b for b in bad if b.id == "up").error.message
    # allowed outside: a regular file outside is fine, a device still is not
    files = LocalFiles(data, confine=False)
    lines, bad, _ = batch.read_manifest(manifest, files=files)
    assert {x.id for x in lines} == {"passwd", "up", "link"}
    assert {b.id: b.error.code.value for b in bad} == {"dir": "not_a_file", "newline": "invalid_file_name",
                                                        "zero": "not_a_file"}


def test_remote_sends_nothing_for_a_path_outside(data: Path) -> None:
    received: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = write_manifest(data, [line(id="passwd", reference="/etc/passwd", box="1,2,30,40"),
                                         line(id="up", background="../x.png", box="1,2,30,40")])
        out = data.parent / "out"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["batch", str(manifest), "-o", str(out), "--url", url, "--retries", "0", "--quiet"]) == 1
    finally:
        server.shutdown()
    assert received == []
    assert {i: r["error"]["code"] for i, r in latest(out).items()} == {"passwd": "path_outside_base",
                                                                       "up": "path_outside_base"}


def test_each_bad_line_is_its_own_error(data: Path) -> None:
    path = data / "manifest.jsonl"
    good = json.dumps(line(id="good", box="1,2,30,40")).encode()
    path.write_bytes(b"\n".join([
        good,
        b'{"id": "bad-utf8", "reference": "ref\xff.png", "background": "background.png", "box": "1,2,30,40"}',
        b'{"id": "dup", "reference": "reference.png", "reference": "bottle.png", "background": "background.png", '
        b'"box": "1,2,30,40"}',
        b'{"id": "dup-placement", "reference": "reference.png", "background": "background.png", '
        b'"placement": {"count": 1, "count": 2, "min_size": 8, "max_size": 9}, "placement_area": "area.png"}',
    ]) + b"\n")
    lines, bad, total = batch.read_manifest(path)
    assert total == 4 and [x.id for x in lines] == ["good"]
    assert {b.number: (b.error.code.value, b.error.field) for b in bad} == {
        2: ("invalid_json", None), 3: ("duplicate_key", "reference"), 4: ("duplicate_key", "count")}


def test_clean_up_touches_only_our_own_temporary_files(data: Path) -> None:
    out = data.parent / "out"
    (out / "images").mkdir(parents=True)
    ours = out / "images" / ".x.png.0123abcd.anydoor-tmp"
    theirs = [out / ".notes.tmp", out / "images" / ".draft.tmp", out / ".y.png.0123abcd.tmp"]
    for path in [ours, *theirs]:
        path.write_bytes(b"keep")
    manifest = write_manifest(data, [line(box="1,2,30,40")])
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    assert not ours.exists() and all(p.read_bytes() == b"keep" for p in theirs)


@pytest.mark.slow  # four generations
def test_a_line_with_num_outputs_keeps_the_best_of_its_candidates(data: Path) -> None:
    """num_outputs 3: the line's image and labels are the best candidate's (by identity, as /predict ranks), its
    record lists the three seeds and scores best first, and the best is that line again with its seed alone."""
    manifest = write_manifest(data, [line(id="best-of-3", box="40,50,160,120", seed=10, num_outputs=3)])
    out = data.parent / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    record = latest(out)["best-of-3"]
    candidates = record["candidates"]
    assert sorted(c["seed"] for c in candidates) == [10, 11, 12]
    identity = [c["scores"]["identity"] for c in candidates]
    assert identity == sorted(identity, reverse=True)
    assert record["seed"] == candidates[0]["seed"] and record["scores"] == candidates[0]["scores"]
    assert (out / "labels" / "best-of-3.txt").read_text().count("\n") == 1  # one object: the image's
    again = write_manifest(data, [line(id="alone", box="40,50,160,120", seed=record["seed"])])
    assert main(["batch", str(again), "-o", str(data.parent / "again"), "--demo", "--quiet"]) == 0
    a = np.asarray(Image.open(out / "images" / "best-of-3.png"), dtype=np.int16)
    b = np.asarray(Image.open(data.parent / "again" / "images" / "alone.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # a batch of three rounds differently from one job: within one level


@pytest.mark.slow  # two generations and a merge
def test_output_format_picks_the_dataset_image_files(data: Path, tmp_path: Path) -> None:
    """output_format jpeg and webp write images/<id>.jpg and .webp (the seed in their EXIF), named so in the
    record and in COCO; a rerun skips them, eval scores them and merge copies them."""
    from model.pipeline.result import read_metadata

    manifest = write_manifest(data, [line(id="j", box="40,50,160,120", seed=4, output_format="jpeg",
                                          output_quality=80),
                                     line(id="w", box="40,50,160,120", seed=5, output_format="webp")])
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0
    records = latest(out)
    for line_id, name, pil in (("j", "j.jpg", "JPEG"), ("w", "w.webp", "WEBP")):
        assert records[line_id]["file"] == f"images/{name}"
        with Image.open(out / "images" / name) as image:
            assert image.format == pil and image.size == (640, 480)
            assert read_metadata(image)["anydoor:seed"] == str(records[line_id]["seed"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["j.jpg", "w.webp"]
    coco = json.loads((out / "annotations.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == ["j.jpg", "w.webp"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert main(["batch", str(manifest), "-o", str(out), "--demo", "--quiet"]) == 0  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert main(["merge", str(out), "-o", str(tmp_path / "merged")]) == 0
    for name in ("j.jpg", "w.webp"):
        assert (tmp_path / "merged" / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    assert main(["eval", str(out), "--demo", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((out / "eval" / "eval.json").read_text())["mean"]["lines"] == 2
