"""`GenerationService`: one loaded pipeline behind a lock, with per-job progress and result files.

The web app (`tta.serve.app`) calls `GenerationService.generate` from its worker threads; the
lock lets one generation run at a time (the others wait, reported as ``queued``). Every argument
goes to `Pipeline.generate` as given, so the pipeline's own checks refuse bad values (empty
prompt, duration over ``max_duration``, NaN guidance, steps < 1, an unreadable reference file);
the service only adds what a public server needs: a ``max_steps`` bound and refusing reference
clips for a pipeline that takes none.

Progress: a forward hook on the pipeline's denoiser (``generator.model.unet``, which every
registered pipeline has) counts network evaluations while a job runs; a sampler evaluates it once
per step (Heun twice), so ``step / total`` is exact for every sampler tta has. A pipeline without
that module reports ``total: null`` (the page then shows an indeterminate bar and the elapsed time).

Results: ``<job>.wav`` and ``<job>.png`` (the pipeline's own `Pipeline.save`) in ``out``, and one
row per clip appended to ``out/generations.jsonl`` (the format of ``tta generate``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tta.pipelines.base import Pipeline
from tta.utils.errors import UsageError

__all__ = ["EVALS_PER_STEP", "GenerationRequest", "GenerationService", "Progress", "check_job_id"]

log = logging.getLogger(__name__)

#: denoiser evaluations per sampling step where it is not one
EVALS_PER_STEP = {"heun": 2}
#: the default clip length of the page (seconds; capped by the pipeline's max_duration)
DEFAULT_DURATION = 10.24
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RESULT = re.compile(r"(?P<job>[A-Za-z0-9_-]{1,64})\.(?P<ext>wav|png)")


def check_job_id(job: str) -> str:
    """``job`` if it is 1-64 letters, digits, ``-`` or ``_`` (it names result files), else `UsageError`."""
    if not isinstance(job, str) or not _JOB_ID.fullmatch(job):
        raise UsageError(f"job must be 1-64 letters, digits, '-' or '_', got {job!r:.80}")
    return job


@dataclass
class GenerationRequest:
    """What the page sends: the pipeline's `generate` arguments (None: the pipeline's default) and
    the reference clips (saved upload path, caption) of a DreamAudio pipeline."""

    prompt: str
    duration: float = DEFAULT_DURATION
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    references: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Progress:
    """A job's state (``queued``, ``running``, ``done``, ``failed``: its request answers the
    reason), denoiser evaluations done and expected (None: not counted), and when it was submitted."""

    state: str = "queued"
    step: int = 0
    total: int | None = None
    submitted: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "step": self.step, "total": self.total,
                "elapsed": round(time.monotonic() - self.submitted, 2)}


class GenerationService:
    """Serialized generations of one pipeline (see the module docstring).

    Args:
        pipeline: the loaded pipeline (loaded once, at startup).
        out: where the WAVs, PNGs and ``generations.jsonl`` go.
        source: the pipeline folder or checkpoint (recorded in the manifest rows).
        max_steps: the most sampling steps one request may ask for.
        keep_jobs: progress entries kept (the oldest finished ones are forgotten first).
    """

    def __init__(self, pipeline: Pipeline, out: Path, source: str = "", max_steps: int = 1000,
                 keep_jobs: int = 1024) -> None:
        self.pipeline = pipeline
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.max_steps = int(max_steps)
        self.keep_jobs = int(keep_jobs)
        self._generate_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._jobs: OrderedDict[str, Progress] = OrderedDict()
        self._results: set[str] = set()
        self._current: Progress | None = None
        self.denoiser = denoiser_of(pipeline)
        if self.denoiser is not None:
            self.denoiser.register_forward_hook(self._count_evaluation)

    # ---------------------------------------------------------------- page info
    @property
    def takes_references(self) -> bool:
        """Whether the pipeline takes reference clips (DreamAudio)."""
        from tta.pipelines.dreamaudio import DreamAudioPipeline

        return isinstance(self.pipeline, DreamAudioPipeline)

    def info(self) -> dict[str, Any]:
        """What the page needs: the pipeline kind, whether it takes references (and how many,
        how long), its sampling defaults and bounds."""
        pipe = self.pipeline
        gen = pipe.generator
        refs = self.takes_references
        return {
            "kind": pipe.module_kind, "pipeline": type(pipe).__name__, "sample_rate": pipe.sample_rate,
            "references": refs,
            "num_references": gen.num_references if refs else 0,
            "reference_seconds": gen.reference_seconds if refs else None,
            "defaults": {"steps": pipe.defaults["steps"], "guidance": pipe.defaults["guidance"],
                         "sampler": pipe.defaults["sampler"], "seed": 0,
                         "duration": min(DEFAULT_DURATION, pipe.max_duration)},
            "max_duration": pipe.max_duration, "max_steps": self.max_steps,
            "counts_steps": self.denoiser is not None,
        }

    # ----------------------------------------------------------------- progress
    def new_job(self) -> str:
        """A fresh job id."""
        return uuid.uuid4().hex

    def progress(self, job: str) -> dict[str, Any] | None:
        """The job's `Progress` as a dict; None for a job this server does not know."""
        with self._jobs_lock:
            prog = self._jobs.get(job)
            return None if prog is None else prog.as_dict()

    def _register(self, job: str) -> Progress:
        with self._jobs_lock:
            if job in self._jobs or job in self._results:
                raise UsageError(f"job {job!r} was already submitted: give each request a new job id")
            prog = self._jobs[job] = Progress()
            finished = [k for k, p in self._jobs.items() if p.state in ("done", "failed")]
            for k in finished[: max(0, len(self._jobs) - self.keep_jobs)]:
                del self._jobs[k]
            return prog

    def _count_evaluation(self, module: nn.Module, args: Any, output: Any) -> None:
        prog = self._current
        if prog is not None:
            prog.step += 1

    def expected_evaluations(self, steps: int | None) -> int | None:
        """Denoiser evaluations of a job with ``steps`` (None: the pipeline's default); None when
        they are not counted or ``steps`` is not a valid count (the pipeline refuses it)."""
        steps = self.pipeline.defaults["steps"] if steps is None else steps
        if self.denoiser is None or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            return None
        return steps * EVALS_PER_STEP.get(self.pipeline.defaults["sampler"], 1)

    # --------------------------------------------------------------- generation
    def generate(self, request: GenerationRequest, job: str | None = None) -> dict[str, Any]:
        """Generate one clip (waiting for the lock), write ``<job>.wav`` / ``<job>.png`` and the
        manifest row; its id, file names, sample rate, duration, settings and seconds taken.
        A refused argument raises the pipeline's error (its message names the field)."""
        job = self.new_job() if job is None else check_job_id(job)
        prog = self._register(job)
        try:
            inputs = self._inputs(request)
            with self._generate_lock:
                prog.state, prog.total = "running", self.expected_evaluations(request.steps)
                start = time.monotonic()
                self._current = prog
                try:
                    gen = self.pipeline.generate(request.prompt, duration=request.duration, steps=request.steps,
                                                 guidance=request.guidance, seed=request.seed, **inputs)
                finally:
                    self._current = None
                record = {"pipeline": self.source, "seed": request.seed}
                row = self.pipeline.save(gen, self.out, [job], record)[0]
                seconds = time.monotonic() - start
        except Exception:
            prog.state = "failed"
            raise
        with self._jobs_lock:
            self._results.add(job)
            with (self.out / "generations.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        prog.state = "done"
        log.info("job %s: %r, %.2f s of audio in %.2f s", job, request.prompt, row["duration"], seconds)
        return {"id": job, "audio": f"{job}.wav", "spectrogram": f"{job}.png", "sample_rate": gen.sample_rate,
                "duration": row["duration"], "settings": row["generation"], "seconds": round(seconds, 3),
                "flags": gen.flags}

    def _inputs(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline's further arguments: ``references`` (DreamAudio); the server's own bound on steps."""
        steps = request.steps
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > self.max_steps:
            raise UsageError(f"steps must be <= {self.max_steps} (the server's --max-steps), got {steps}")
        if not request.references:
            return {}
        if not self.takes_references:
            raise UsageError(f"references given but the pipeline ({type(self.pipeline).__name__}) takes no "
                             "reference clips (a DreamAudio pipeline does)")
        return {"references": [(str(path), caption) for path, caption in request.references]}

    def result_path(self, name: str) -> Path | None:
        """The file ``<job>.wav`` / ``<job>.png`` of a finished job of this server; None otherwise."""
        match = _RESULT.fullmatch(name)
        if match is None or match["job"] not in self._results:
            return None
        return self.out / name


def denoiser_of(pipeline: Pipeline) -> nn.Module | None:
    """The network the sampler evaluates once per step (``generator.model.unet``), if the pipeline has one."""
    model = getattr(pipeline.generator, "model", None)
    unet = getattr(model, "unet", None)
    return unet if isinstance(unet, nn.Module) else None
