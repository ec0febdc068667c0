"""The web demo's API (FastAPI's test client) on a micro model: every endpoint, every limit, the worker queue.
The browser and load tests are in test_serve_browser.py."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web demo needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a worker thread must never die

from transfusion.cli import main  # noqa: E402
from transfusion.serve.app import create_app  # noqa: E402
from transfusion.serve.service import ModelService, ServeLimits  # noqa: E402
from transfusion.serve.worker import Busy, JobCancelled, Worker  # noqa: E402

from train_helpers import write_micro_config  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    cfg = write_micro_config(tmp / "c.toml", steps=4, ckpt_every=4)
    assert main(["train", str(cfg), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def service(run_dir: Path) -> ModelService:
    return ModelService.load(run_dir, ServeLimits(max_upload_bytes=200_000, max_pixels=512 * 512, timeout_s=60))


@pytest.fixture()
def client(service: ModelService):
    with TestClient(create_app(service)) as c:
        yield c


def png_upload(size: tuple[int, int] = (28, 28), colour=(200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def test_health_and_page(client: TestClient, service: ModelService) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"]["image_size"] == service.m.config.model.image_size
    assert h["queue"]["max"] == service.limits.max_queue
    page = client.get("/")
    assert page.status_code == 200 and "draw-form" in page.text
    for asset in ("/", "/static/app.js", "/static/style.css"):  # everything local: no CDN, no remote font
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset


def test_image_is_a_png_and_seeded(client: TestClient, service: ModelService) -> None:
    body = {"prompt": "a red sneaker", "steps": 3, "seed": 1}
    a = client.post("/api/image", json=body)
    assert a.status_code == 200 and a.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(a.content))
    assert im.size == (service.m.config.model.image_size * service.scale,) * 2
    assert client.post("/api/image", json=body).content == a.content  # same seed, same image
    assert client.post("/api/image", json={**body, "seed": 2}).content != a.content


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_streamed_progress_then_the_same_image(client: TestClient) -> None:
    body = {"prompt": "a blue bag", "steps": 5, "seed": 3}
    r = client.post("/api/image", json=body, headers={"Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert [e for e, _ in events] == ["progress"] * 5 + ["image"]
    assert [d["step"] for _, d in events[:-1]] == [1, 2, 3, 4, 5] and events[0][1]["total"] == 5
    import base64

    plain = client.post("/api/image", json=body).content
    assert base64.b64decode(events[-1][1]["png"]) == plain  # streaming does not change the image


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "a red sneaker " * 200}, 400, "room for"),
    ({"prompt": "a red bag", "steps": 0}, 400, "steps"),
    ({"prompt": "a red bag", "steps": 5000}, 400, "steps"),
    ({"prompt": "a red bag", "cfg": -1}, 400, "cfg"),
    ({"steps": 3}, 422, ""),
])
def test_bad_image_requests(client: TestClient, body: dict, status: int, words: str) -> None:
    r = client.post("/api/image", json=body)
    assert r.status_code == status and words in json.dumps(r.json()["detail"])
    # streamed requests are refused the same way, before any event
    assert client.post("/api/image", json=body, headers={"Accept": "text/event-stream"}).status_code == status


def test_caption(client: TestClient) -> None:
    r = client.post("/api/caption", files={"image": ("x.png", png_upload(), "image/png")})
    assert r.status_code == 200 and isinstance(r.json()["caption"], str)
    jpg = client.post("/api/caption", files={"image": ("x.jpg", png_upload((60, 40), fmt="JPEG"), "image/jpeg")})
    assert jpg.status_code == 200  # any size: centre-cropped and resized like training images


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"not an image at all", 415, "not an image"),
    (png_upload()[:60], 415, "cannot be decoded"),  # a truncated PNG: the header parses, the pixels do not
    (png_upload((600, 600)), 413, "pixels"),  # over the test's 512 x 512 limit, though only a few kB
    (b"\x89PNG" + bytes(300_000), 413, "bytes"),  # over the test's 200 kB upload limit
])
def test_bad_uploads(client: TestClient, data: bytes, status: int, words: str) -> None:
    r = client.post("/api/caption", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_image_type_is_checked_by_decoding(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, format="TIFF")  # a real image of a type the server does not take
    r = client.post("/api/caption", files={"image": ("x.png", buf.getvalue(), "image/png")})  # lying name/type
    assert r.status_code == 415 and "TIFF" in r.json()["detail"]


def test_generate(client: TestClient) -> None:
    r = client.post("/api/generate", json={"prompt": "ROMEO:", "max_new_tokens": 8})
    assert r.status_code == 200
    pieces = r.json()["pieces"]
    assert all(p["type"] in ("text", "image") for p in pieces)
    assert client.post("/api/generate", json={"prompt": "x", "max_new_tokens": 10_000}).status_code == 400


def _block(worker: Worker, seconds: float) -> threading.Event:
    started = threading.Event()
    worker.submit(lambda progress: (started.set(), time.sleep(seconds)))
    started.wait(5)
    return started


def test_full_queue_is_429_and_late_request_504(service: ModelService) -> None:
    worker = Worker(max_queue=1, timeout_s=60)
    with TestClient(create_app(service, worker)) as c:
        _block(worker, 1.0)
        r = c.post("/api/image", json={"prompt": "a red bag", "steps": 2})
        assert r.status_code == 429 and r.headers["retry-after"] and "busy" in r.json()["detail"]
        time.sleep(1.2)
        assert c.post("/api/image", json={"prompt": "a red bag", "steps": 2}).status_code == 200  # room again
    limits = ServeLimits(timeout_s=0.3)
    quick = ModelService(service.m, limits)
    worker = Worker(max_queue=4, timeout_s=0.3)
    with TestClient(create_app(quick, worker)) as c:
        _block(worker, 2.0)  # the request waits behind this past its time limit
        r = c.post("/api/image", json={"prompt": "a red bag", "steps": 2})
        assert r.status_code == 504 and "0.3 s" in r.json()["detail"]
        assert c.get("/health").status_code == 200  # the server stays up


def test_worker_cancels_at_the_next_progress_report() -> None:
    w = Worker(max_queue=2, timeout_s=30)
    seen: list[int] = []

    def long_job(progress):
        for i in range(100):
            time.sleep(0.01)
            progress(i + 1, 100)
            seen.append(i)
        return "finished"

    job = w.submit(long_job)
    while len(seen) < 3:
        time.sleep(0.005)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.future.result(5)
    assert len(seen) < 100
    assert w.submit(lambda progress: 7).future.result(5) == 7  # the thread lives on
    assert w.counts["cancelled"] == 1 and w.open_jobs == 0
    failing = w.submit(lambda progress: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.future.result(5)
    w.close()


def test_worker_refuses_beyond_its_queue() -> None:
    w = Worker(max_queue=2, timeout_s=30)
    gate = threading.Event()
    jobs = [w.submit(lambda progress: gate.wait(5)) for _ in range(2)]
    with pytest.raises(Busy):
        w.submit(lambda progress: None)
    gate.set()
    assert [j.future.result(5) for j in jobs] == [True, True]
    assert w.counts["refused"] == 1
    w.close()


def test_cli_errors(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        assert main(["serve", "--ckpt", str(run_dir), "--port", str(port)]) == 2
        assert "pick another --port" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(run_dir), "--max-queue", "0"]) == 2


def test_sampler_progress_callback_matches_silent_run(service: ModelService) -> None:
    """The progress hook is an observer: the same seed gives the same image with and without it."""
    from transfusion.serve.service import DrawRequest

    req = DrawRequest("a green coat", steps=4, seed=5)
    sampling = service.check_draw(req)
    calls: list[tuple[int, int]] = []
    a = service.run_draw(req, sampling, lambda d, t: calls.append((d, t)))
    b = service.run_draw(req, sampling, False)
    assert a == b and calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_worker_survives_a_future_cancelled_while_queued() -> None:
    """asyncio cancels the future it wrapped when a handler times out: the worker must skip it and live on."""
    w = Worker(max_queue=3, timeout_s=30)
    gate = threading.Event()
    first = w.submit(lambda progress: gate.wait(5))
    queued = w.submit(lambda progress: "never")
    assert queued.future.cancel()
    gate.set()
    assert first.future.result(5) is True
    assert w.submit(lambda progress: "alive").future.result(5) == "alive"
    assert w.counts["cancelled"] == 1 and w.open_jobs == 0
    w.close()


def test_edit(client: TestClient, service: ModelService) -> None:
    img = png_upload()
    r = client.post("/api/edit", files={"image": ("x.png", img, "image/png")}, data={"instruction": "make it blue"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (service.m.config.model.image_size * service.scale,) * 2
    assert client.get("/health").json()["model"]["trained_for_editing"] is False  # a text->image micro model
    for instruction, words in [("  ", "empty"), ("make it blue " * 100, "room for")]:
        bad = client.post("/api/edit", files={"image": ("x.png", img, "image/png")}, data={"instruction": instruction})
        assert bad.status_code == 400 and words in bad.json()["detail"]
    wrong = client.post("/api/edit", files={"image": ("x.png", b"GIF89a-nope", "image/gif")},
                        data={"instruction": "make it red"})
    assert wrong.status_code == 415
    assert client.post("/api/edit", data={"instruction": "make it red"}).status_code == 422  # no image field
