"""The web demo end to end: `transfusion serve` in a subprocess, a bounded load test over real HTTP, and the page
driven in headless Chromium (skipped, saying what is missing, where Chromium or selenium is not installed;
`make test` installs them on Debian)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web demo needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the load test needs httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import browser_available, drive_page, load_test, running_server  # noqa: E402

from transfusion.cli import main  # noqa: E402

from train_helpers import write_micro_config  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve_e2e")
    cfg = write_micro_config(tmp / "c.toml", steps=2, ckpt_every=2)
    assert main(["train", str(cfg), "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run"


def test_load_every_request_answered_or_refused(run_dir: Path) -> None:
    with running_server(run_dir, ["--max-queue", "1"]) as url:
        res = load_test(url, clients=4, seconds=4.0, steps=2)
    assert res["sent"] > 0 and res["lost"] == 0 and res["errors"] == 0 and res["other_status"] == 0, res
    assert res["ok"] >= 1 and res["refused_429"] >= 1, res  # a queue of 1 under 4 clients must refuse some
    assert res["p50_s"] is not None and res["p95_s"] >= res["p50_s"]
    assert res["server"]["refused"] == res["refused_429"] and res["server"]["done"] == res["ok"]


def test_page_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    missing = browser_available()
    if missing:
        pytest.skip(f"no browser test: {missing}")
    from PIL import Image

    upload = tmp_path / "in.png"
    Image.new("RGB", (28, 28), (30, 30, 200)).save(upload)
    with running_server(run_dir) as url:
        res = drive_page(url, upload, screenshot=tmp_path / "page.png", wait_s=120, generate_prompt="a red bag <boi>")
    assert res["draw_status"] == "done" and res["image_src_prefix"] == "data:image/png;base64,"
    assert res["progress_max"] == 4  # the micro config's diffusion.sample_steps, streamed step by step
    assert res["caption_status"] == "done", res
    assert res["generated"].startswith("a red bag") and res["generated_images"] == 1  # "<boi>" forces an image
    assert (tmp_path / "page.png").stat().st_size > 10_000
