"""The web demo's HTTP layer (FastAPI): one static page and a small JSON/PNG API over a ModelService.

    GET  /                    the page (served from serve/static; no CDN, nothing fetched from elsewhere)
    GET  /health              {"status": "ok", "model": {...}, "queue": {...}, "counts": {...}}
    POST /api/image           JSON {"prompt", "steps"?, "cfg"?, "seed"?} -> image/png
                              with "Accept: text/event-stream": server-sent events instead (live progress):
                                event: progress  data: {"step": i, "total": n}      after every denoising step
                                event: image     data: {"png": "<base64>"}          last event on success
                                event: error     data: {"status": 504, "detail": "..."}
    POST /api/caption         multipart field `image` -> {"caption"}
    POST /api/edit            multipart `image` + `instruction` -> image/png   (needs an edit-trained model)
    POST /api/generate        JSON {"prompt", "max_new_tokens"?, "seed"?} -> {"pieces": [{"type": "text",
                              "text"} | {"type": "image", "png": "<base64>"}, ...]}

Errors are JSON {"detail": reason}: 400 bad input (empty or too long for the context, out-of-range steps),
413 upload or image too large, 415 not an accepted image, 422 malformed JSON/fields, 429 queue full,
504 past the per-request time limit, 500 a model failure. Progress is streamed over SSE on the POST itself
(read with fetch + a stream reader) so that a refusal keeps its HTTP status, which EventSource would hide.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from transfusion.serve.service import DrawRequest, InvalidRequest, ModelService
from transfusion.serve.worker import Busy, Job, JobCancelled, Worker

STATIC = Path(__file__).parent / "static"


class ImageBody(BaseModel):
    prompt: str = Field(max_length=4000)
    steps: int | None = None
    cfg: float | None = None
    seed: int = 0


class GenerateBody(BaseModel):
    prompt: str = Field(max_length=4000)
    max_new_tokens: int | None = None
    seed: int = 0


def create_app(service: ModelService, worker: Worker | None = None) -> FastAPI:
    limits = service.limits
    worker = worker or Worker(limits.max_queue, limits.timeout_s)
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="transfusion", docs_url="/api/docs", redoc_url=None, lifespan=lifespan)
    app.state.service, app.state.worker = service, worker
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, e: InvalidRequest) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(Busy)
    async def _busy(_: Request, e: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "5"})

    async def run(fn: Callable[[Any], Any], on_progress=None) -> Any:
        """Queue `fn(progress)` and wait for it; 504 past the time limit (the job is stopped too)."""
        job = worker.submit(fn, on_progress)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), limits.timeout_s + 1.0)
        except (asyncio.TimeoutError, JobCancelled) as e:
            job.cancel()
            raise HTTPException(504, f"the request did not finish within {limits.timeout_s:g} s") from e
        except asyncio.CancelledError:
            job.cancel()  # the client went away
            raise

    async def read_upload(upload: UploadFile) -> bytes:
        data = await upload.read(limits.max_upload_bytes + 1)  # never more than the limit + 1 byte in memory
        return data

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.info(),
                "queue": {"open": worker.open_jobs, "max": limits.max_queue, "timeout_s": limits.timeout_s},
                "counts": dict(worker.counts), "limits": {"max_upload_bytes": limits.max_upload_bytes,
                                                          "max_pixels": limits.max_pixels}}

    @app.post("/api/image", response_model=None)
    async def image(body: ImageBody, request: Request) -> Response:
        req = DrawRequest(body.prompt, body.steps, body.cfg, body.seed)
        sampling = service.check_draw(req)
        if "text/event-stream" in request.headers.get("accept", ""):
            return _stream_image(worker, service, req, sampling, limits.timeout_s)
        png = await run(lambda progress: service.run_draw(req, sampling, progress))
        return Response(png, media_type="image/png")

    @app.post("/api/caption")
    async def caption(image: UploadFile = File(...)) -> dict[str, str]:
        pixels = service.decode_upload(await read_upload(image))
        return {"caption": await run(lambda progress: service.run_caption(pixels))}

    @app.post("/api/edit", response_model=None)
    async def edit(image: UploadFile = File(...), instruction: str = Form(..., max_length=4000)) -> Response:
        pixels = service.decode_upload(await read_upload(image))
        sampling = service.check_edit(instruction)
        png = await run(lambda progress: service.run_edit(pixels, instruction, sampling, progress))
        return Response(png, media_type="image/png")

    @app.post("/api/generate")
    async def generate(body: GenerateBody) -> dict[str, Any]:
        n = service.check_generate(body.prompt, body.max_new_tokens)
        pieces = await run(lambda progress: service.run_generate(body.prompt, n, body.seed, progress))
        return {"pieces": pieces}

    return app


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _stream_image(worker: Worker, service: ModelService, req: DrawRequest, sampling: dict[str, Any],
                  timeout_s: float) -> StreamingResponse:
    """Queue the drawing now (so a full queue is still a 429) and stream its progress as server-sent events."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def on_progress(done: int, total: int) -> None:  # on the inference thread
        loop.call_soon_threadsafe(events.put_nowait, (done, total))

    job: Job = worker.submit(lambda progress: service.run_draw(req, sampling, progress), on_progress)
    result = asyncio.wrap_future(job.future)

    async def body() -> AsyncIterator[bytes]:
        try:
            while not result.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, result}, timeout=timeout_s + 1.0, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield _sse("progress", {"step": done, "total": total})
                else:
                    getter.cancel()
                    if not result.done():  # nothing for the whole time limit
                        job.cancel()
                        yield _sse("error", {"status": 504, "detail": f"no progress within {timeout_s:g} s"})
                        return
            while not events.empty():
                done, total = events.get_nowait()
                yield _sse("progress", {"step": done, "total": total})
            try:
                png = result.result()
            except JobCancelled as e:
                yield _sse("error", {"status": 504, "detail": str(e)})
            except Exception as e:  # noqa: BLE001 - reported in-band: the 200 header is already sent
                yield _sse("error", {"status": 500, "detail": f"{type(e).__name__}: {e}"})
            else:
                yield _sse("image", {"png": base64.b64encode(png).decode()})
        finally:
            job.cancel()  # a client that disconnects mid-stream stops its job (no-op once finished)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
