"""The local engine: the pipeline in this process; lines prepared one by one, those with one denoising schedule
(:attr:`Job.batch_key`) run together, ``batch`` jobs per :meth:`AnyDoorPipeline.run`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anydoor_batch.dataset import Finished
from anydoor_batch.manifest import Line, local_inputs
from anydoor_batch.report import Report
from model.errors import ErrorCode, InputError
from model.spec.limits import Limits


def run_local(pipe: Any, lines: Sequence[Line], report: Report, *, batch: int, limits: Limits | None = None
              ) -> None:
    """Prepare each line, and run lines with one denoising schedule together, ``batch`` jobs per pipe.run."""
    pending: dict[Any, list[tuple[Line, Any]]] = {}

    def flush(key: Any) -> None:
        group = pending.pop(key)
        try:
            results = pipe.run([job for _, job in group])
        except Exception as exc:  # one bad job must not take its batch mates down: run them one at a time
            if len(group) > 1:
                for item in group:
                    pending[key] = [item]
                    flush(key)
                return
            line, job = group[0]
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", job.seed)
            return
        for (line, _), result in zip(group, results, strict=True):
            extra: dict[str, Any] = {}
            if result.scores is not None:
                extra["scores"] = result.scores.to_dict()
            report.generated(line, Finished(result.to_png(), result.image.width, result.image.height, result.seed,
                                            [tuple(b) for b in result.boxes], dict(result.timings), extra))

    for line in lines:
        try:
            job = pipe.prepare(local_inputs(line), line.params, limits=limits)
        except InputError as exc:
            report.input_error(line, exc, line.params.seed)
            continue
        except Exception as exc:  # a bug or an unreadable file must cost one line, not the run
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", line.params.seed)
            continue
        group = pending.setdefault(job.batch_key, [])
        group.append((line, job))
        if len(group) >= batch:
            flush(job.batch_key)
        elif sum(len(g) for g in pending.values()) >= 4 * batch:  # bound the prepared jobs held in memory
            flush(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        flush(key)
