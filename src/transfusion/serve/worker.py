"""One inference thread behind a bounded queue: what the web server runs model calls on.

The model is not re-entrant and a CPU has no spare cores to run two samplers side by side, so every request
becomes a `Job` executed one at a time on a single thread, in arrival order. The queue is bounded: a request
that finds `max_queue` jobs waiting or running is refused at once (`Busy`, HTTP 429) instead of piling up
latency. Each job has a deadline; a job still queued at its deadline is dropped, and a running one is stopped at
its next progress report (`JobCancelled`): sampling calls the job's progress hook after every denoising step.

    worker = Worker(max_queue=8, timeout_s=120)
    job = worker.submit(lambda progress: draw(prompt, progress=progress), on_progress=print)
    result = job.future.result()      # or `await asyncio.wrap_future(job.future)` in an async handler
    worker.close()
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

Progress = Callable[[int, int], None]  # (steps done, steps total)


class Busy(RuntimeError):
    """The queue is full: refuse now (HTTP 429) rather than wait."""


class JobCancelled(RuntimeError):
    """The job passed its deadline or its client went away; raised inside the model call to stop it."""


@dataclass
class Job:
    run: Callable[[Progress], Any]  # the model call; it reports progress through its argument
    deadline: float  # time.monotonic() after which the job is dropped or stopped
    on_progress: Progress | None = None
    future: cf.Future = field(default_factory=cf.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop the job: dropped if still queued, stopped at its next progress report if running."""
        self.cancelled.set()

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled("the request was cancelled")
        if time.monotonic() > self.deadline:
            raise JobCancelled("the request ran past the server's time limit")

    def _progress(self, done: int, total: int) -> None:
        self._check()
        if self.on_progress is not None:
            self.on_progress(done, total)


class Worker:
    def __init__(self, max_queue: int = 8, timeout_s: float = 120.0):
        if max_queue < 1 or timeout_s <= 0:
            raise ValueError("max_queue must be >= 1 and timeout_s > 0")
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._open = 0  # jobs queued or running
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "refused": 0}
        self._thread = threading.Thread(target=self._loop, name="transfusion-inference", daemon=True)
        self._thread.start()

    @property
    def open_jobs(self) -> int:
        with self._lock:
            return self._open

    def submit(self, run: Callable[[Progress], Any], on_progress: Progress | None = None) -> Job:
        """Queue `run(progress)`; Busy when `max_queue` jobs are already queued or running."""
        with self._lock:
            if self._open >= self.max_queue:
                self.counts["refused"] += 1
                raise Busy(f"the server is busy ({self._open} requests queued or running); try again shortly")
            self._open += 1
        job = Job(run, time.monotonic() + self.timeout_s, on_progress)
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            # A future cancelled while queued (its handler timed out or went away: asyncio cancels the future it
            # wrapped) is skipped; once RUNNING it can no longer be cancelled, so set_result below is safe.
            if not job.future.set_running_or_notify_cancel():
                self._finish("cancelled")
                continue
            try:
                job._check()  # dropped while it waited
                result = job.run(job._progress)
            except JobCancelled as e:
                self._finish("cancelled")
                job.future.set_exception(e)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to its request, the thread lives on
                self._finish("failed")
                job.future.set_exception(e)
            else:
                self._finish("done")
                job.future.set_result(result)

    def _finish(self, outcome: str) -> None:
        with self._lock:
            self._open -= 1
            self.counts[outcome] += 1

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
