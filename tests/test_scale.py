"""Scaling out ``anydoor batch``: shards of one manifest (``--shard i/N``) merged by ``anydoor merge`` into the
dataset an unsharded run writes, and the Ray engine writing the same bytes as the local one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anydoor_batch.manifest import Shard, shard_of
from service.cli import build_parser, main
from tests.support.server import CASE_A

FAST = {"steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def pipe() -> Any:
    """The demo pipeline, loaded once for every run of this module (each run is the real command)."""
    from model.pipeline.loader import load_pipeline, load_spec_of

    args = build_parser().parse_args(["batch", "m.jsonl", "-o", "o", "--demo", "--device", "cpu"])
    return load_pipeline(load_spec_of(args))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name in ("reference", "background", "background_mask"):
        shutil.copy(CASE_A / f"{name}.png", folder / f"{name}.png")
    shutil.copy(CASE_A / "reference.png", folder / "bottle.png")
    return folder


def seven_lines(folder: Path) -> Path:
    """Seven lines: boxes, two objects of two classes, a mask with shape control (a COCO segmentation), no id."""
    base = {"reference": "reference.png", "background": "background.png", **FAST}
    lines = [
        {**base, "id": "a", "box": [[40, 60, 120, 100]], "seed": 1},
        {**base, "id": "b", "reference": ["reference.png", "bottle.png"],
         "box": [[40, 60, 120, 100], [300, 200, 150, 150]], "seed": 2},
        {**base, "id": "c", "background_mask": "background_mask.png", "shape_control": True, "seed": 3},
        {**base, "id": "d", "reference": "bottle.png", "box": "200,100,160,160", "seed": 4},
        {**base, "box": [[10, 10, 100, 100]], "seed": 5},
        {**base, "id": "f", "box": [[400, 300, 120, 120]], "seed": 6},
        {**base, "id": "g", "box": [[100, 250, 200, 150]], "seed": 7},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def batch(pipe: Any, manifest: Path, out: Path, *extra: str) -> int:
    from anydoor_batch.cli import run

    # --batch 1: one job per forward. Batching jobs together changes float rounding (within a level, not bytes),
    # and a shard's batches hold other jobs than the unsharded run's.
    args = build_parser().parse_args(["batch", str(manifest), "-o", str(out), "--demo", "--quiet", "--batch", "1",
                                      *extra])
    return run(args, pipeline=pipe)


def ids(out: Path) -> set[str]:
    return {json.loads(row)["id"] for row in (out / "results.jsonl").read_text().splitlines()}


def dataset(out: Path) -> dict[str, Any]:
    """Everything a dataset consumer reads, without the run's own timings and dates."""
    coco = json.loads((out / "annotations.json").read_text())
    coco.pop("info")
    return {"images": {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())},
            "labels": {p.name: p.read_text() for p in sorted((out / "labels").iterdir())},
            "coco": coco}


def test_shards_are_stable_and_disjoint() -> None:
    names = [f"line-{i}" for i in range(200)]
    shards = [[n for n in names if Shard(i, 3).holds(n)] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(names) and all(len(s) > 40 for s in shards)
    assert shard_of("line-7", 3) == shard_of("line-7", 3) == [i for i, s in enumerate(shards) if "line-7" in s][0]
    assert Shard.parse("2/3") == Shard(2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


@pytest.mark.slow
def test_three_shards_merge_into_the_unsharded_dataset(pipe: Any, data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    manifest = seven_lines(data)
    assert batch(pipe, manifest, tmp_path / "all") == 0
    shards = [tmp_path / f"out_{i}" for i in range(3)]
    for i, out in enumerate(shards):
        assert batch(pipe, manifest, out, "--shard", f"{i}/3") == 0
    found = [ids(out) for out in shards]
    assert sum(len(f) for f in found) == 7 and set().union(*found) == ids(tmp_path / "all") == set("abcd5fg")
    assert all(found), "each of the three shards got lines"

    merged = tmp_path / "merged"
    assert main(["merge", *map(str, shards), "-o", str(merged)]) == 0
    assert dataset(merged) == dataset(tmp_path / "all")
    coco = dataset(merged)["coco"]
    assert len({i["id"] for i in coco["images"]}) == 7 and len({a["id"] for a in coco["annotations"]}) == 8
    assert any("segmentation" in a for a in coco["annotations"])

    # Idempotent: merging again (in another order) adds nothing and changes nothing.
    results = (merged / "results.jsonl").read_bytes()
    assert main(["merge", *map(str, shards[::-1]), "-o", str(merged)]) == 0
    assert (merged / "results.jsonl").read_bytes() == results and dataset(merged) == dataset(tmp_path / "all")

    # Two shards with one id and different bytes: refused with its code, nothing written.
    other = tmp_path / "other"
    shutil.copytree(shards[0], other)
    victim = next((other / "images").iterdir())
    victim.write_bytes(victim.read_bytes() + b"x")
    capsys.readouterr()
    assert main(["merge", str(shards[0]), str(other), "-o", str(tmp_path / "bad")]) == 3
    err = capsys.readouterr().err
    assert "[conflicting_shards]" in err and repr(victim.stem) in err
    assert not list((tmp_path / "bad" / "images").iterdir())
    assert main(["merge", str(other), "-o", str(merged)]) == 3, "also against what is already merged"
    assert dataset(merged) == dataset(tmp_path / "all")


@pytest.mark.slow
def test_adding_lines_does_not_move_finished_ones(pipe: Any, data: Path, tmp_path: Path) -> None:
    manifest = seven_lines(data)
    before = {i: ids(tmp_path / f"s{i}") for i in range(3) if batch(pipe, manifest, tmp_path / f"s{i}",
                                                                     "--shard", f"{i}/3") == 0}
    with manifest.open("a") as f:
        for k in range(3):
            f.write(json.dumps({"id": f"new{k}", "reference": "reference.png", "background": "background.png",
                                "box": [[40, 60, 120, 100]], "seed": 10 + k, **FAST}) + "\n")
    for i in range(3):
        mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / f"s{i}" / "images").iterdir()}
        assert batch(pipe, manifest, tmp_path / f"s{i}", "--shard", f"{i}/3") == 0
        after = ids(tmp_path / f"s{i}")
        assert before[i] <= after and after - before[i] <= {"new0", "new1", "new2"}
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / f"s{i}" / "images").iterdir()
                if p.name in mtimes} == mtimes, "finished lines are not generated again"


def fake_output(root: Path, classes: list[str], records: list[tuple[str, int, list[str], bytes]]) -> Path:
    """An output directory written by the dataset writer itself, without generating: (id, line, classes, png)."""
    from anydoor_batch.dataset import Outputs

    outputs = Outputs(root, annotations_every=100)
    try:
        outputs.add_classes(classes)
        for line_id, number, names, png in records:
            boxes = [[10 * k, 10, 20, 30] for k in range(len(names))]
            outputs.add({"id": line_id, "line": number, "status": "ok", "seed": number, "boxes": boxes,
                         "classes": names, "file": f"images/{line_id}.png", "width": 64, "height": 48}, png)
        outputs.add_failed({"id": "broken", "line": 99, "status": "failed", "seed": None,
                            "error": {"code": "unreadable_file", "field": "reference", "message": "gone"}})
        outputs.manifest_lines = {r[0]: r[1] for r in records}
        outputs.write_annotations()
    finally:
        outputs.close()
    return root


def test_merge_of_two_manifests_renumbers_images_and_remaps_classes(tmp_path: Path) -> None:
    one = fake_output(tmp_path / "one", ["cat", "dog"], [("a", 1, ["cat"], b"A"), ("b", 2, ["dog", "cat"], b"B")])
    two = fake_output(tmp_path / "two", ["dog", "car", "cat"],
                      [("c", 1, ["car"], b"C"), ("b", 5, ["dog", "cat"], b"B")])
    merged = tmp_path / "merged"
    assert main(["merge", str(one), str(two), "-o", str(merged)]) == 0
    coco = json.loads((merged / "annotations.json").read_text())
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [(1, "a.png"), (2, "c.png"), (3, "b.png")]
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "car"]
    assert (merged / "labels" / "c.txt").read_text().split()[0] == "2", "car is class 2 in the merged list"
    assert (merged / "labels" / "classes.txt").read_text() == "cat\ndog\ncar\n"
    assert {p.name: p.read_bytes() for p in (merged / "images").iterdir()} == {"a.png": b"A", "b.png": b"B",
                                                                            "c.png": b"C"}
    records = [json.loads(r) for r in (merged / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["a", "b", "broken", "c"]
    assert main(["merge", str(two), str(one), "-o", str(merged)]) == 0
    assert len((merged / "results.jsonl").read_text().splitlines()) == 4, "idempotent"
    assert main(["merge", str(tmp_path / "none"), "-o", str(tmp_path / "x")]) == 2
    assert main(["merge", str(one), "-o", str(one)]) == 2


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_bytes(pipe: Any, data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A local Ray (2 CPUs, no dashboard, no usage stats) with one actor of one CPU; the local engine with one torch
    thread too: on a CPU the bytes depend on the thread count."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed (CI installs it)")
    import torch

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    manifest = seven_lines(data)
    lines = manifest.read_text().splitlines()
    best_of_2 = {"id": "best", "reference": "reference.png", "background": "background.png",
                 "box": [[40, 60, 120, 100]], "seed": 8, "num_outputs": 2, "output_format": "webp",
                 **FAST}  # two candidates, the best kept, as WebP
    manifest.write_text("\n".join([*lines[1:4], json.dumps(best_of_2),
                                   json.dumps({"id": "bad", "reference": "reference.png",
                                               "background": "background.png",
                                               "box": [[600, 460, 100, 100]], **FAST})]) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert batch(pipe, manifest, tmp_path / "local") == 1
    finally:
        torch.set_num_threads(threads)
    ray_args = ["--engine", "ray", "--ray-cpus", "2", "--ray-actors", "1", "--ray-cpus-per-actor", "1"]
    assert main(["batch", str(manifest), "-o", str(tmp_path / "ray"), "--demo", "--device", "cpu", "--quiet",
                 "--batch", "1", *ray_args]) == 1
    assert dataset(tmp_path / "ray") == dataset(tmp_path / "local")
    rows = (tmp_path / "ray" / "results.jsonl").read_text().splitlines()
    records = {json.loads(r)["id"]: json.loads(r) for r in rows}
    assert records["bad"]["error"]["code"] == "box_out_of_image" and records["b"]["classes"] == ["reference", "bottle"]
    local_rows = (tmp_path / "local" / "results.jsonl").read_text().splitlines()
    local = {json.loads(r)["id"]: json.loads(r) for r in local_rows}
    assert [c["seed"] for c in records["best"]["candidates"]] == [c["seed"] for c in local["best"]["candidates"]]
    assert sorted(c["seed"] for c in records["best"]["candidates"]) == [8, 9]
    # Resumable the same way: finished lines are skipped (not handed to Ray), the failed one is retried.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "images").iterdir()}
    assert main(["batch", str(manifest), "-o", str(tmp_path / "ray"), "--demo", "--device", "cpu", "--quiet",
                 *ray_args]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "images").iterdir()} == mtimes
    # Actors that would hold every CPU leave none for the preparation tasks: refused, not a hang.
    assert main(["batch", str(manifest), "-o", str(tmp_path / "ray2"), "--demo", "--device", "cpu", "--quiet",
                 "--engine", "ray", "--ray-cpus", "2", "--ray-actors", "2"]) == 2


@pytest.fixture(scope="module")
def server() -> Any:
    from tests.support.server import ServerProcess

    env = {"ANYDOOR_DEMO": "1", "ANYDOOR_DEVICE": "cpu", "ANYDOOR_WARMUP_STEPS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "ANYDOOR_MAX_BATCH": "1"}
    with ServerProcess(env) as proc:
        proc.start(timeout=300)
        yield proc


@pytest.mark.slow
def test_the_remote_engine_writes_the_local_engines_bytes(pipe: Any, data: Path, tmp_path: Path,
                                                         server: Any) -> None:
    """The same lines through a real server (batching off, torch's default threads as here) and in this process."""
    manifest = seven_lines(data)
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:3]) + "\n")
    assert batch(pipe, manifest, tmp_path / "local") == 0
    assert main(["batch", str(manifest), "-o", str(tmp_path / "remote"), "--url", server.url, "--concurrency", "1",
                 "--quiet"]) == 0
    assert dataset(tmp_path / "remote") == dataset(tmp_path / "local")
    # num_outputs 2 through the server: the best of two, with both seeds and scores recorded, as locally.
    manifest.write_text(json.dumps({"id": "best", "reference": "reference.png", "background": "background.png",
                                    "box": [[40, 60, 120, 100]], "seed": 8, "num_outputs": 2,
                                    "output_format": "jpeg", "output_quality": 95, **FAST}) + "\n")
    assert batch(pipe, manifest, tmp_path / "local2") == 0
    assert main(["batch", str(manifest), "-o", str(tmp_path / "remote2"), "--url", server.url, "--quiet"]) == 0
    here, there = (json.loads((tmp_path / d / "results.jsonl").read_text()) for d in ("local2", "remote2"))
    assert [c["seed"] for c in there["candidates"]] == [c["seed"] for c in here["candidates"]] and \
        sorted(c["seed"] for c in there["candidates"]) == [8, 9] and there["seed"] == here["seed"]
    assert there["file"] == here["file"] == "images/best.jpg"
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "best.jpg"), dtype=np.int16)
            for d in ("local2", "remote2"))
    assert np.abs(a - b).mean() < 0.5  # the server batches the candidates its own way (within a level) and JPEG
