"""`diffquant serve ENGINE_FOLDER`: the engine folder's pipeline behind HTTP, torch-free.

``POST /generate`` takes JSON (prompt, negative_prompt, seed, steps, guidance, height, width)
and answers one PNG (the settings in its text chunks); ``GET /health`` says the server is up
and how full its queue is. One worker thread owns the engines: requests wait in a bounded queue
(503 with a JSON error when it is full), and the worker batches queued requests that share their
sampler settings into one engine run, up to ``max_batch`` images (each image keeps its own seed,
so a batched image is the image it would be alone). Bad input is a 4xx with ``{"error": ...}``.
Needs the ``[serve]`` extra (FastAPI + uvicorn).
"""

# no `from __future__ import annotations` here: FastAPI reads the request model of the endpoint
# from its annotation at run time, and the model is a local class
import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from diffquant.engines.deployed import DeployedPipeline, PipelineFromFolder, PipelineRequest
from diffquant.engines.runtime import GenerateConfig
from diffquant.engines.text import MAX_PROMPT_CHARS
from diffquant.errors import DiffquantError

__all__ = ["ServeConfig", "create_app", "serve"]


@dataclass
class ServeConfig:
    """Queue length (requests waiting beyond it get 503), images per engine run, the step range
    a request may ask for, the defaults of a request, and CPU threads of the runtime."""

    queue: int = 16
    max_batch: int = 4
    max_steps: int = 100
    default_steps: int = 20
    threads: int = 0


@dataclass
class _Job:
    prompt: str
    negative: str | None
    seed: int
    settings: GenerateConfig
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        s = self.settings
        return (s.steps, s.guidance, s.scheduler, self.negative is None)


class _Worker(threading.Thread):
    """Owns the pipeline; takes a job, adds queued jobs with the same settings, runs them as one batch."""

    def __init__(self, pipe: DeployedPipeline, jobs: queue.Queue, cfg: ServeConfig) -> None:
        super().__init__(daemon=True, name="diffquant-serve")
        self.pipe, self.jobs, self.cfg = pipe, jobs, cfg
        self.held: list[_Job] = []
        self.images, self.batches = 0, 0

    def _next_batch(self) -> list[_Job] | None:
        first = self.held.pop(0) if self.held else self.jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.cfg.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.held.append(job)
                break
            (batch if job.key() == first.key() else self.held).append(job)
        return batch

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                req = PipelineRequest(
                    [j.prompt for j in batch],
                    len(batch),
                    [j.negative for j in batch] if batch[0].negative is not None else None,
                    batch[0].settings,
                    seeds=[j.seed for j in batch],
                )
                images = self.pipe(req)
                self.images, self.batches = self.images + len(batch), self.batches + 1
                for j, img in zip(batch, images):
                    j.future.set_result(img)
            except Exception as e:  # the request fails, the server stays up
                for j in batch:
                    j.future.set_exception(e)


def _png(image, job: _Job, digest: str) -> bytes:
    from diffquant._png import png_bytes

    s = job.settings
    return png_bytes(
        image,
        {
            "prompt": job.prompt,
            "negative_prompt": job.negative or "",
            "seed": job.seed,
            "steps": s.steps,
            "guidance": s.guidance,
            "plan_model_digest": digest,
            "software": "diffquant serve",
        },
    )


def create_app(folder: str | Path, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``folder`` (engines load now; the worker starts with the app)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from pydantic import BaseModel, Field
    except ImportError:
        raise DiffquantError("serve needs FastAPI and uvicorn: pip install 'diffquant[serve]'") from None
    cfg = cfg or ServeConfig()
    pipe = PipelineFromFolder(folder, threads=cfg.threads)
    jobs: queue.Queue = queue.Queue(maxsize=cfg.queue)
    worker = _Worker(pipe, jobs, cfg)
    digest = pipe.meta.plan_model_digest
    text_model = pipe.text is not None

    class GenerateBody(BaseModel):
        prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
        negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
        seed: int = Field(0, ge=0, le=2**63 - 1)
        steps: int = Field(cfg.default_steps, ge=1, le=cfg.max_steps)
        guidance: float | None = Field(None, ge=0.0, le=50.0)
        height: int | None = Field(None, ge=1)
        width: int | None = Field(None, ge=1)

    @asynccontextmanager
    async def lifespan(_app):
        worker.start()
        try:
            yield
        finally:
            jobs.put(None)
            worker.join(timeout=60)
            pipe.close()

    app = FastAPI(title="diffquant serve", description=f"the pipeline of {folder}", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return JSONResponse({"error": f"{where + ': ' if where else ''}{first.get('msg')}"}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok" if worker.is_alive() else "down",
            "engine": str(folder),
            "queued": jobs.qsize(),
            "queue": cfg.queue,
            "images": worker.images,
            "batches": worker.batches,
            "resolution": list(pipe.resolution),
        }

    @app.post("/generate")
    async def generate(body: GenerateBody):
        if text_model and not body.prompt.strip():
            return JSONResponse({"error": "prompt: empty; describe the image"}, status_code=422)
        try:
            pipe.check_size(body.height, body.width)
            if not text_model and pipe.table.null_id > 1:
                pipe.table.prompt_id(body.prompt)  # a prompt this folder has conditioning for
        except DiffquantError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        job = _Job(
            body.prompt,
            body.negative_prompt,
            body.seed,
            GenerateConfig(steps=body.steps, guidance=body.guidance, seed=body.seed, batch=cfg.max_batch),
        )
        try:
            jobs.put_nowait(job)
        except queue.Full:
            return JSONResponse(
                {"error": f"busy: {cfg.queue} requests are queued; retry later"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        t0 = time.time()
        try:
            image = await asyncio.wrap_future(job.future)
        except DiffquantError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except Exception as e:  # the worker caught it for this batch; the client gets it as JSON, the server stays up
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        return Response(
            _png(image, job, digest), media_type="image/png", headers={"X-Latency-S": f"{time.time() - t0:.3f}"}
        )

    return app


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process: the engines are loaded once).
    The engines load and the port is bound and listening before the line ``listening on URL``
    goes to stderr, so a client (or a test) that waits for that line needs no polling."""
    import socket
    import sys

    try:
        import uvicorn
    except ImportError:
        raise DiffquantError("serve needs FastAPI and uvicorn: pip install 'diffquant[serve]'") from None
    app = create_app(folder, cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise DiffquantError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    sock.listen(128)
    port = sock.getsockname()[1]  # the one the OS picked for --port 0
    print(
        f"diffquant serve: listening on http://{host}:{port} (POST /generate, GET /health); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
