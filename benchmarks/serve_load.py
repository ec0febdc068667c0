"""The web demo under load, and in a real browser.

    python benchmarks/serve_load.py --ckpt runs/demo --clients 8 --seconds 60 --out benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --ckpt runs/demo --browser --screenshot docs/assets/serve_page.png

Load: starts `transfusion serve` on a free loopback port, then N client threads post `/api/image` requests
back to back for a fixed time. Every request must come back answered (200 with a PNG) or refused (429: the queue
is full); anything else — another status, a broken connection, a request that never returns — is counted as
lost. The JSON has the counts, p50/p95 latency of the answered requests and the server's own /health counts.

Browser: drives the page in headless Chromium (Debian `chromium` + `chromium-driver`, PyPI `selenium`): types
a prompt, waits for the streamed image, uploads an image and reads the caption; optionally saves a screenshot.
tests/test_serve_browser.py runs both on a micro model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(ckpt: str | Path, extra: list[str] = (), threads: int = 1, ready_s: float = 120.0
                   ) -> Iterator[str]:
    """`transfusion serve --ckpt CKPT` on a free loopback port; yields its base URL, stops it on exit."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "transfusion.cli", "serve", "--ckpt", str(ckpt), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {ready_s:g} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def load_test(url: str, clients: int, seconds: float, steps: int, timeout_s: float = 300.0) -> dict[str, Any]:
    """`clients` threads post /api/image back to back for `seconds`; every request answered, refused or lost."""
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"sent": 0, "ok": 0, "refused_429": 0, "other_status": 0, "errors": 0}
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=timeout_s) as http:
            i = 0
            while time.monotonic() < stop:
                body = {"prompt": "a red sneaker", "steps": steps, "seed": k * 100_000 + i}
                i += 1
                with lock:
                    counts["sent"] += 1
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/api/image", json=body)
                except httpx.HTTPError:
                    with lock:
                        counts["errors"] += 1
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n":
                        counts["ok"] += 1
                        latencies.append(dt)
                    elif r.status_code == 429:
                        counts["refused_429"] += 1
                    else:
                        counts["other_status"] += 1
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")) / 10)  # back off a little, then retry

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    answered = counts["ok"] + counts["refused_429"]
    lat = sorted(latencies)
    return {
        "clients": clients, "seconds": seconds, "steps": steps, "wall_s": round(wall, 2), **counts,
        "lost": counts["sent"] - answered,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "images_per_s": round(counts["ok"] / wall, 3),
        "server": httpx.get(url + "/health", timeout=10).json()["counts"],
    }


def browser_available() -> str | None:
    """None when headless Chromium can be driven here, else what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "PyPI selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Debian chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


def drive_page(url: str, upload: Path, prompt: str = "a red sneaker", screenshot: Path | None = None,
               wait_s: float = 300.0, generate_prompt: str | None = None) -> dict[str, Any]:
    """Type a prompt and wait for the streamed image, upload an image and read its caption (and, with
    `generate_prompt`, run a free generation), in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1250"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, wait_s)
        wait.until(lambda d: "Model:" in d.find_element(By.ID, "model-info").text)
        box = driver.find_element(By.ID, "draw-prompt")
        box.clear()
        box.send_keys(prompt)
        driver.find_element(By.ID, "draw-go").click()
        wait.until(ec.visibility_of_element_located((By.ID, "draw-image")))
        wait.until(lambda d: d.find_element(By.ID, "draw-status").text == "done")
        src = driver.find_element(By.ID, "draw-image").get_attribute("src")
        progress_max = driver.find_element(By.ID, "draw-progress").get_attribute("max")
        driver.find_element(By.ID, "caption-file").send_keys(str(Path(upload).resolve()))
        driver.find_element(By.ID, "caption-go").click()
        wait.until(lambda d: d.find_element(By.ID, "caption-status").text in ("done",)
                   or "error" in d.find_element(By.ID, "caption-status").get_attribute("class"))
        result = {"image_src_prefix": src[:22], "progress_max": int(progress_max),
                  "caption_status": driver.find_element(By.ID, "caption-status").text,
                  "caption": driver.find_element(By.ID, "caption-text").text,
                  "draw_status": driver.find_element(By.ID, "draw-status").text}
        if generate_prompt is not None:
            box = driver.find_element(By.ID, "generate-prompt")
            box.clear()
            box.send_keys(generate_prompt)
            driver.find_element(By.ID, "generate-go").click()
            wait.until(lambda d: d.find_element(By.ID, "generate-status").text == "done"
                       or "error" in d.find_element(By.ID, "generate-status").get_attribute("class"))
            result["generated"] = driver.find_element(By.ID, "generate-output").text
            result["generated_images"] = len(driver.find_elements(By.CSS_SELECTOR, "#generate-output img"))
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return result
    finally:
        driver.quit()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--out", default=None, help="JSON of the load test")
    p.add_argument("--browser", action="store_true", help="drive the page in headless Chromium instead")
    p.add_argument("--screenshot", default=None)
    p.add_argument("--upload", default=None, help="image to caption in the browser (default: a drawn one)")
    p.add_argument("--generate", default=None, help="also run a free generation of this prompt in the browser")
    a = p.parse_args()
    extra = ["--max-queue", str(a.max_queue), "--timeout", "600"]
    with running_server(a.ckpt, extra, threads=a.threads) as url:
        if a.browser:
            missing = browser_available()
            if missing:
                print(f"error: {missing}", file=sys.stderr)
                return 2
            upload = Path(a.upload) if a.upload else Path("/tmp/serve_upload.png")
            if not a.upload:
                upload.write_bytes(httpx.post(url + "/api/image", json={"prompt": "a blue bag", "seed": 1},
                                              timeout=600).content)
            res = drive_page(url, upload, screenshot=Path(a.screenshot) if a.screenshot else None,
                             generate_prompt=a.generate)
        else:
            res = {"ckpt": str(a.ckpt), "max_queue": a.max_queue, "server_threads": a.threads,
                   **load_test(url, a.clients, a.seconds, a.steps)}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
