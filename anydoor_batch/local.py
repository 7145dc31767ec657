"""The local engine: the pipeline in this process; lines prepared one by one, those with one denoising schedule
(:attr:`Job.batch_key`) run together, about ``batch`` jobs per :meth:`AnyDoorPipeline.run`. A line with
``num_outputs`` N is N jobs (its candidates) that always run together; the best is the line's image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anydoor_batch.dataset import Finished, best_of
from anydoor_batch.manifest import Line, local_inputs
from anydoor_batch.report import Report
from model.errors import ErrorCode, InputError
from model.spec.limits import Limits
from model.spec.params import OUTPUT_FORMATS


def prepare_line(pipe: Any, line: Line, limits: Limits | None) -> list[Any]:
    """The jobs of one line: one, or its ``num_outputs`` candidates (seed, seed + 1, ...)."""
    if line.params.num_outputs > 1:
        return list(pipe.prepare_candidates(local_inputs(line), line.params, limits=limits))
    return [pipe.prepare(local_inputs(line), line.params, limits=limits)]


def run_local(pipe: Any, lines: Sequence[Line], report: Report, *, batch: int, limits: Limits | None = None
              ) -> None:
    """Prepare each line, and run lines with one denoising schedule together, ``batch`` jobs per pipe.run."""
    pending: dict[Any, list[tuple[Line, list[Any]]]] = {}

    def flush(key: Any) -> None:
        group = pending.pop(key)
        try:
            results = pipe.run([job for _, jobs in group for job in jobs])
        except Exception as exc:  # one bad job must not take its batch mates down: run them one at a time
            if len(group) > 1:
                for item in group:
                    pending[key] = [item]
                    flush(key)
                return
            line, jobs = group[0]
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", jobs[0].seed)
            return
        at = 0
        for line, jobs in group:
            best, extra = best_of(results[at:at + len(jobs)])
            at += len(jobs)
            params = line.params
            report.generated(line, Finished(best.encode(params.output_format, params.output_quality),
                                            best.image.width, best.image.height, best.seed,
                                            [tuple(b) for b in best.boxes], dict(best.timings), extra,
                                            OUTPUT_FORMATS[params.output_format][1]))

    for line in lines:
        try:
            jobs = prepare_line(pipe, line, limits)
        except InputError as exc:
            report.input_error(line, exc, line.params.seed)
            continue
        except Exception as exc:  # a bug or an unreadable file must cost one line, not the run
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", line.params.seed)
            continue
        key = jobs[0].batch_key
        group = pending.setdefault(key, [])
        group.append((line, jobs))
        if sum(len(j) for _, j in group) >= batch:
            flush(key)
        elif sum(len(j) for g in pending.values() for _, j in g) >= 4 * batch:  # bound the jobs held in memory
            flush(max(pending, key=lambda k: sum(len(j) for _, j in pending[k])))
    for key in list(pending):
        flush(key)
