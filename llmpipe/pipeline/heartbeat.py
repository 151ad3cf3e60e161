"""A progress line at least every 30 s through any long loop (QA answers, perplexity windows, tensors to
quantize), so a stage working on a large model never falls silent:

    with Heartbeat("evaluate: Q4_K: perplexity:", total=len(windows), unit="windows") as beat:
        for ...: ...; beat.tick(done)

prints `evaluate: Q4_K: perplexity: 12/40 windows, 0:31 elapsed, eta 1:12` every 30 s from a background thread
(so also while one long step, a forward pass of a large model, is running); a loop that finishes sooner prints
nothing (small models stay quiet).
"""

from __future__ import annotations

import sys
import threading
import time

INTERVAL_SECONDS = 30.0


def duration(seconds: float) -> str:
    """m:ss"""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class Heartbeat:
    def __init__(self, label: str, total: int, unit: str, interval_seconds: float = INTERVAL_SECONDS, stream=None):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval_seconds
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def tick(self, done: int) -> None:
        """`done` of `total` are finished."""
        self.done = done

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        done = self.done
        eta = f", eta {duration(elapsed * (self.total - done) / done)}" if 0 < done < self.total else ""
        return f"{self.label} {done}/{self.total} {self.unit}, {duration(elapsed)} elapsed{eta}"

    def beat(self) -> None:
        while not self.stopped.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)
