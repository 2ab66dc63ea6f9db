"""The worker thread: requests for different adapters collected for a few ms and served in one forward.

    submit(job) -> Future            from any thread (the HTTP handlers)
    worker:  take the first waiting job, then keep collecting until max_batch jobs or batch_wait_ms have
             passed; control jobs (load an adapter) run first; the rest is cut into forwards of at most
             max_batch rows and at most max_loaded distinct adapters, each adapter made resident (LRU,
             registry.py), served (generate.py), and its futures resolved

Only this thread touches the model, so loading / evicting / unloading never races with a forward.  A job
whose forward fails gets the exception; the others in its batch are retried one by one, so one bad request
never fails its neighbours.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .generate import Sampling, classify_rows, generate_rows
from .registry import AdapterRegistry

__all__ = ["Job", "Engine", "Metrics"]


@dataclass
class Job:
    """One request: kind "complete" / "classify" / "load"; adapter name (None: the base) and its directory."""
    kind: str
    adapter: str | None
    path: Path | None
    tokens: list = field(default_factory=list)
    sampling: Sampling | None = None
    future: Future = field(default_factory=Future)
    start: float = field(default_factory=time.perf_counter)


class Metrics:
    """Counters and recent latencies (the last 10,000 requests) for /metrics."""

    def __init__(self, window: int = 10_000):
        self.lock = threading.Lock()
        self.requests = collections.Counter()        # (endpoint, status) -> count
        self.latencies = collections.deque(maxlen=window)
        self.batch_sizes = collections.Counter()     # rows per forward -> count
        self.adapters_per_batch = collections.Counter()
        self.tokens_generated = 0

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latencies.append(seconds)

    def batch(self, rows: int, adapters: int, tokens: int = 0) -> None:
        with self.lock:
            self.batch_sizes[rows] += 1
            self.adapters_per_batch[adapters] += 1
            self.tokens_generated += tokens

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.latencies)
            batches = sum(self.batch_sizes.values())
            return {"requests": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
                    "requests_total": sum(self.requests.values()),
                    "latency_seconds": {q: _quantile(lat, float(q[1:]) / 100) for q in ("p50", "p90", "p99")},
                    "batches": batches,
                    "batch_size_mean": sum(k * v for k, v in self.batch_sizes.items()) / batches if batches else 0,
                    "batch_sizes": dict(sorted(self.batch_sizes.items())),
                    "adapters_per_batch": dict(sorted(self.adapters_per_batch.items())),
                    "tokens_generated": self.tokens_generated}


def _quantile(values: list, q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


class Engine:
    """The batching worker over one model and its adapter registry."""

    def __init__(self, model: nn.Module, registry: AdapterRegistry, *, max_batch: int = 32,
                 batch_wait_ms: float = 5.0, pad_id: int = 0, eos_id=None, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: at least 1")
        self.model, self.registry = model, registry
        self.max_batch, self.wait = max_batch, batch_wait_ms / 1000
        self.pad_id, self.eos_id = pad_id, eos_id
        self.metrics = metrics or Metrics()
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="loralab-serve-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.queue.put(None)
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> Future:
        if self.stopping.is_set():
            raise RuntimeError("the server is shutting down")
        self.registry.begin(job.adapter)
        job.future.add_done_callback(lambda _: self.registry.end(job.adapter))
        self.queue.put(job)
        return job.future

    # ---- the worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping.is_set():
            first = self.queue.get()
            if first is None:
                break
            jobs, deadline = [first], time.perf_counter() + self.wait
            while len(jobs) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.stopping.set()
                    break
                jobs.append(job)
            self._serve(jobs)
            self.registry.collect()
        for job in _drain(self.queue):
            job.future.set_exception(RuntimeError("the server shut down before this request ran"))

    def _serve(self, jobs: list[Job]) -> None:
        for job in [j for j in jobs if j.kind == "load"]:
            self._resolve([job], lambda js: self.registry.ensure({js[0].adapter: js[0].path}) or [True])
        for kind, run in (("complete", self._complete), ("classify", self._classify)):
            for chunk in self._chunks([j for j in jobs if j.kind == kind]):
                self._resolve(chunk, run)

    def _chunks(self, jobs: list[Job]):
        """Consecutive groups of jobs with at most max_batch rows and max_loaded distinct adapters."""
        limit = self.registry.max_loaded
        chunk, names = [], set()
        for job in jobs:
            grown = names | ({job.adapter} if job.adapter else set())
            if chunk and (len(chunk) >= self.max_batch or (limit is not None and len(grown) > limit)):
                yield chunk
                chunk, grown = [], {job.adapter} if job.adapter else set()
            chunk.append(job)
            names = grown
        if chunk:
            yield chunk

    def _resolve(self, jobs: list[Job], run) -> None:
        try:
            results = run(jobs)
        except Exception as e:  # noqa: BLE001 - handed to the request(s), never kills the worker
            if len(jobs) > 1:
                for job in jobs:  # find the culprit: the others still get their answers
                    self._resolve([job], run)
                return
            jobs[0].future.set_exception(e)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _make_resident(self, jobs: list[Job]) -> None:
        self.registry.ensure({j.adapter: j.path for j in jobs if j.adapter is not None})

    def _complete(self, jobs: list[Job]) -> list:
        self._make_resident(jobs)
        results = generate_rows(self.model, [j.tokens for j in jobs], [j.adapter for j in jobs],
                                [j.sampling for j in jobs], pad_id=self.pad_id, eos_id=self.eos_id)
        self.metrics.batch(len(jobs), len({j.adapter for j in jobs}), sum(len(t) for t, _ in results))
        return results

    def _classify(self, jobs: list[Job]) -> list:
        self._make_resident(jobs)
        results = classify_rows(self.model, [j.tokens for j in jobs], [j.adapter for j in jobs])
        self.metrics.batch(len(jobs), len({j.adapter for j in jobs}))
        return results


def _drain(q: queue.Queue):
    while True:
        try:
            job = q.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            yield job
