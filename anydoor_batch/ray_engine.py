"""The Ray Data engine (``--engine ray``, the optional ``.[ray]`` extra): the lines to do as a Ray Dataset, each
prepared (validated, images decoded, regions cropped, initial noise drawn) in a CPU task, generated in a pool of
actors that each load the pipeline once (:class:`ray.data.ActorPoolStrategy`; ``num_gpus`` per actor, 1 on GPUs),
and written here, by the one dataset writer, as results stream back.

Resume works as for the other engines: this process reads the output directory first and hands Ray only the lines
without an ``ok`` record. ``--ray-address`` joins a running cluster (its workers need this package installed, as
in the Docker image); without it a local Ray starts with ``--ray-cpus`` CPUs, usage statistics off and no
dashboard.

Every job is the one the local engine builds (:meth:`AnyDoorPipeline.preparer` gives the same crops and noise),
so with the same ``--batch`` grouping the image bytes are the local engine's; a test checks it at ``--batch 1``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from anydoor_batch.dataset import Finished, best_of
from anydoor_batch.local import prepare_line
from anydoor_batch.manifest import Line
from anydoor_batch.report import Report
from model.errors import ErrorCode, InputError
from model.pipeline.loader import LoadSpec
from model.spec.limits import Limits
from model.spec.params import OUTPUT_FORMATS

PREPARE_MEMORY = 512 * 2**20  # a preparing worker: torch and the imaging code (~250 MiB measured), one decoded line
INSTALL_HINT = "the Ray engine needs Ray: pip install 'anydoor-serve[ray]' (or pip install 'ray[data]')"


class RaySetupError(ValueError):
    """A Ray configuration that cannot run (a usage error of the command)."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001", host:port); None: start one here
    actors: int = 1  # generation actors, each with its own pipeline
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs (and --device is not cpu), else 0
    cpus: int | None = None  # CPUs of a locally started Ray (default: all)
    batch: int = 4  # jobs per pipe.run, as --batch
    cpus_per_actor: int = 1  # also torch's intra-op threads in the actor


def config_of(spec: LoadSpec) -> Any:
    """The model config the actors' pipeline will have, for the CPU tasks' preparer (no weights are read)."""
    from model.config import load_config, released_config, tiny_config

    if spec.demo:
        return tiny_config()
    return load_config(spec.config) if spec.config else released_config()


_PREPARERS: dict[str, Any] = {}


def _failure(code: str, field: str | None, message: str, seed: int | None) -> bytes:
    return json.dumps({"code": code, "field": field, "message": message, "seed": seed}).encode()


def prepare_row(row: dict[str, Any], *, config: Any, limits: Limits) -> dict[str, Any]:
    """CPU task: one line to its pickled jobs (one, or its ``num_outputs`` candidates; or its failure). Lines that
    refine the reference mask are left to the actors, which hold the refiner."""
    from model.pipeline.run import AnyDoorPipeline

    line: Line = pickle.loads(row["line"])
    out = {"number": row["number"], "job": b"", "error": b"", "line": b""}
    if line.params.refine_reference_mask:
        out["line"] = row["line"]  # prepared by the actor
        return out
    key = repr(config)
    preparer = _PREPARERS.get(key)
    if preparer is None:
        preparer = _PREPARERS[key] = AnyDoorPipeline.preparer(config)
    try:
        out["job"] = pickle.dumps(prepare_line(preparer, line, limits))
    except InputError as exc:
        out["error"] = _failure(exc.code.value, exc.field, exc.message, line.params.seed)
    except Exception as exc:  # a bug or an unreadable file must cost one line, not the run
        out["error"] = _failure(ErrorCode.INTERNAL_ERROR.value, None, f"{type(exc).__name__}: {exc}",
                                line.params.seed)
    return out


class Generator:
    """An actor of the pool: loads the pipeline once, then runs the prepared jobs of each batch it is given."""

    def __init__(self, spec: LoadSpec, limits: Limits, threads: int) -> None:
        import torch

        from model.pipeline.loader import load_pipeline

        torch.set_num_threads(threads)  # the actor's CPUs (Ray sets OMP_NUM_THREADS alike); CPU bytes depend on it
        self.pipe = load_pipeline(spec)
        self.limits = limits

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        numbers = [int(n) for n in batch["number"]]
        results: dict[int, dict[str, Any]] = {}
        groups: dict[Any, list[tuple[int, Any]]] = {}
        for number, job_data, error, line_data in zip(numbers, batch["job"], batch["error"], batch["line"],
                                                      strict=True):
            if error:
                results[number] = {"error": bytes(error)}
                continue
            if job_data:
                jobs = pickle.loads(job_data)
            else:
                line: Line = pickle.loads(line_data)
                try:
                    jobs = prepare_line(self.pipe, line, self.limits)
                except InputError as exc:
                    results[number] = {"error": _failure(exc.code.value, exc.field, exc.message, line.params.seed)}
                    continue
            groups.setdefault(jobs[0].batch_key, []).append((number, jobs))
        for group in groups.values():
            self._run(group, results)
        out: dict[str, list[Any]] = {"number": [], "image": [], "meta": [], "error": []}
        for number in numbers:
            result = results[number]
            out["number"].append(number)
            out["image"].append(result.get("image", b""))
            out["meta"].append(result.get("meta", b""))
            out["error"].append(result.get("error", b""))
        return out

    def _run(self, group: list[tuple[int, list[Any]]], results: dict[int, dict[str, Any]]) -> None:
        try:
            generated = self.pipe.run([job for _, jobs in group for job in jobs])
        except Exception as exc:  # one bad job must not take its batch mates down: run them one at a time
            if len(group) > 1:
                for item in group:
                    self._run([item], results)
                return
            number, jobs = group[0]
            results[number] = {"error": _failure(ErrorCode.INTERNAL_ERROR.value, None, f"{type(exc).__name__}: {exc}",
                                                 jobs[0].seed)}
            return
        at = 0
        for number, jobs in group:
            best, extra = best_of(generated[at:at + len(jobs)])
            at += len(jobs)
            meta = {"width": best.image.width, "height": best.image.height, "seed": best.seed,
                    "boxes": [list(b) for b in best.boxes], "timings": dict(best.timings), "extra": extra}
            params = jobs[0].params
            results[number] = {"image": best.encode(params.output_format, params.output_quality),
                               "meta": json.dumps(meta).encode()}


def _start(ray: Any, options: RayOptions) -> bool:
    """Connect to the cluster, or start a local Ray; whether this process started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        ray.init(num_cpus=options.cpus, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    return True


def run_ray(lines: Sequence[Line], report: Report, spec: LoadSpec, options: RayOptions,
            limits: Limits | None = None) -> None:
    import ray
    import ray.data

    limits = limits or Limits()
    started = _start(ray, options)
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the command reports progress itself
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the command has its own
        context.print_on_execution_start = False
        cpus = ray.cluster_resources().get("CPU", 0)
        if options.actors * options.cpus_per_actor + 1 > cpus:  # the actors would hold every CPU: nothing prepares
            raise RaySetupError(f"{options.actors} actor(s) x {options.cpus_per_actor} CPU leave no CPU of the "
                                f"cluster's {cpus:g} for the preparation tasks; use fewer --ray-actors or "
                                "--ray-cpus-per-actor, or more --ray-cpus")
        gpus = options.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if spec.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        by_number = {line.number: line for line in lines}
        dataset = ray.data.from_items([{"number": line.number, "line": pickle.dumps(line)} for line in lines])
        # A preparation reserves what it may hold (PREPARE_MEMORY); that its resources differ from the actors' also
        # keeps Ray from fusing it into them (on a CPU-only run both ask for one CPU and would become one operator).
        prepared = dataset.map(functools.partial(prepare_row, config=config_of(spec), limits=limits), num_cpus=1,
                               memory=PREPARE_MEMORY)
        generated = prepared.map_batches(
            Generator, fn_constructor_kwargs={"spec": spec, "limits": limits, "threads": options.cpus_per_actor},
            batch_size=options.batch, compute=ray.data.ActorPoolStrategy(size=options.actors), num_gpus=gpus,
            num_cpus=options.cpus_per_actor, batch_format="numpy", zero_copy_batch=False)
        for row in generated.iter_rows():
            line = by_number[int(row["number"])]
            if row["error"]:
                failure = json.loads(bytes(row["error"]))
                report.line_failed(line.number, line.id, failure["code"], failure["field"], failure["message"],
                                   failure["seed"])
                continue
            meta = json.loads(bytes(row["meta"]))
            boxes = [(int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in meta["boxes"]]
            report.generated(line, Finished(bytes(row["image"]), meta["width"], meta["height"], meta["seed"], boxes,
                                            meta["timings"], meta["extra"],
                                            OUTPUT_FORMATS[line.params.output_format][1]))
    finally:
        if started:
            ray.shutdown()
