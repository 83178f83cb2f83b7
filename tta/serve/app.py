"""``tta serve --pipeline DIR``: a FastAPI app with one static page in front of a loaded pipeline.

Routes (all JSON errors are ``{"detail": "<one line naming the field>"}``):

- ``GET /``: the page (``page.html``: prompt, reference clips for DreamAudio pipelines, duration,
  steps, guidance, seed; a progress bar while generating; an audio player and the spectrogram).
- ``GET /api/info``: the pipeline kind, whether it takes references, defaults and bounds.
- ``POST /api/generate`` (multipart form: ``prompt``, ``duration``, ``steps``, ``guidance``,
  ``seed``, ``job``, repeated ``ref_audio`` files with as many ``ref_caption`` fields): runs the
  generation (one at a time) and answers the result's file names and settings; a refused input
  answers 422 with the pipeline's message.
- ``GET /api/progress/{job}``: the state and denoiser step of a job (polled by the page).
- ``GET /api/results/{job}.wav|png``: the generated files.

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from tta.serve.service import DEFAULT_DURATION, GenerationRequest, GenerationService
from tta.utils.errors import UsageError, exit_code, one_line

__all__ = ["create_app", "main", "page_html"]

log = logging.getLogger(__name__)

#: the largest seed torch's generators take
MAX_SEED = 2**63 - 1


def page_html() -> str:
    """The page's HTML (``tta/serve/page.html``)."""
    return resources.files("tta.serve").joinpath("page.html").read_text(encoding="utf-8")


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's parsing errors as one line: ``field: reason; ...``."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(service: GenerationService) -> FastAPI:
    """The web app around ``service`` (see the module docstring)."""
    app = FastAPI(title="tta serve", docs_url=None, redoc_url=None)
    page = page_html()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/progress/{job}")
    def progress(job: str) -> dict[str, Any]:
        state = service.progress(job)
        if state is None:
            raise HTTPException(404, f"job {job!r:.80} is unknown to this server")
        return state

    @app.get("/api/results/{name}")
    def result(name: str) -> FileResponse:
        path = service.result_path(name)
        if path is None:
            raise HTTPException(404, f"no result {name!r:.80} on this server")
        return FileResponse(path, media_type="audio/wav" if name.endswith(".wav") else "image/png")

    @app.post("/api/generate")
    def generate(
        *,
        prompt: Annotated[str, Form()] = "",
        duration: Annotated[float, Form()] = DEFAULT_DURATION,
        steps: Annotated[int | None, Form()] = None,
        guidance: Annotated[float | None, Form()] = None,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
        job: Annotated[str | None, Form()] = None,
        ref_audio: Annotated[list[UploadFile], File(default_factory=list)],
        ref_caption: Annotated[list[str], Form(default_factory=list)],
    ) -> Any:
        if len(ref_audio) != len(ref_caption):
            return _refused(UsageError(f"ref_caption: {len(ref_caption)} captions given for {len(ref_audio)} "
                                       "reference files (one caption per file)"))
        with ExitStack() as stack:
            upload_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tta-serve-")))
            references = [(_save_upload(f, upload_dir, j), caption)
                          for j, (f, caption) in enumerate(zip(ref_audio, ref_caption, strict=True))]
            request = GenerationRequest(prompt=prompt, duration=duration, steps=steps, guidance=guidance, seed=seed,
                                        references=references)
            try:
                out = service.generate(request, job)
            except Exception as exc:
                if exit_code(exc) is None:
                    raise
                return _refused(exc, {str(path): path.name for path, _ in references})
        return {**out, "audio": f"api/results/{out['audio']}", "spectrogram": f"api/results/{out['spectrogram']}"}

    return app


def _save_upload(upload: UploadFile, folder: Path, j: int) -> Path:
    """The uploaded reference ``j`` written to ``folder`` under its own (sanitized) file name."""
    from tta.utils.plots import safe_name

    name = safe_name(Path(upload.filename or f"reference{j}").name) or f"reference{j}"
    path = folder / f"{j}" / name
    path.parent.mkdir()
    with path.open("wb") as f:
        shutil.copyfileobj(upload.file, f)
    return path


def _refused(exc: BaseException, uploads: dict[str, str] | None = None) -> JSONResponse:
    """422 with the error's one-line message (the saved ``uploads`` named by their file names)."""
    message = one_line(exc)
    for path, name in (uploads or {}).items():
        message = message.replace(path, name)
    log.info("refused: %s", message)
    return JSONResponse({"detail": message}, status_code=422)


# ---------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta serve", description="A web page that generates audio with one pipeline.")
    p.add_argument("--pipeline", required=True, type=Path, help="a pipeline folder or a generator checkpoint")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--vocoder", help="universal | griffinlim | a vocoder checkpoint (default: the pipeline's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path,
                   help="keep the generated WAVs, PNGs and generations.jsonl here (default: a temporary folder, "
                        "deleted when the server stops)")
    p.add_argument("--max-steps", type=int, default=1000, help="the most sampling steps a request may ask for")
    return p


def main(argv: list[str]) -> int:
    """``tta serve``: load the pipeline once, then serve the page until interrupted."""
    import uvicorn

    from tta.pipelines.base import load_pipeline
    from tta.utils.errors import check_int

    args = _parser().parse_args(argv)
    check_int("--port", args.port)
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    check_int("--max-steps", args.max_steps)
    pipe = load_pipeline(args.pipeline, vocoder=args.vocoder, device=args.device)
    with ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tta-serve-out-")))
        service = GenerationService(pipe, out, source=str(args.pipeline), max_steps=args.max_steps)
        log.info("serving the %s pipeline %s on http://%s:%d (results in %s)", pipe.module_kind, args.pipeline,
                 args.host, args.port, out)
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0
