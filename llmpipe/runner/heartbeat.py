"""A progress line at least every 30 s through any long piece of work (QA answers, perplexity windows,
tensors to quantize, a whole variant's evaluation), so a stage working on a large model never falls silent:

    with Heartbeat("evaluate: Q4_K: perplexity:", total=len(windows), unit="windows") as beat:
        for ...: ...; beat.tick(done)

prints `evaluate: Q4_K: perplexity: 12/40 windows, 0:31 elapsed, eta 1:12` from a background thread when 30 s
pass without a progress line (so also while one long step, a forward pass of a large model, runs). Heartbeats
nest: only the innermost one prints, and the 30 s count from the last line any of them (or a training stage's
`printed()` line) printed, or from the process's start, so a stage that goes from one loop to the next, or
spends its first seconds importing and checking inputs, stays within 30 s too. Work that
finishes sooner prints nothing (small models stay quiet). `total=None`: a line with the elapsed time only.
"""

from __future__ import annotations

import sys
import threading
import time

import psutil

NOT_A_STAGE_DEPENDENCY = "progress lines of long loops"  # see llmpipe.generate.code_deps

INTERVAL_SECONDS = 30.0


def process_start() -> float:
    """When this process started, on the perf_counter clock (a stage's silence counts from its start: imports and
    input checks included)."""
    try:
        return time.perf_counter() - max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # noqa: BLE001 (no access to the process table: from now)
        return time.perf_counter()


_active: list[Heartbeat] = []  # the heartbeats running now, innermost last
_last_line = [process_start()]  # when the last progress line was printed (or the process started)


def duration(seconds: float) -> str:
    """m:ss"""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def printed() -> None:
    """A progress line was just printed by someone else (the training loop's): count the silence from now."""
    _last_line[0] = time.perf_counter()


class Heartbeat:
    def __init__(self, label: str, total: int | None, unit: str = "", interval_seconds: float = INTERVAL_SECONDS,
                 stream=None, enabled: bool = True):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval_seconds
        self.enabled = enabled  # false: silent (processes other than the main one)
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.started = time.perf_counter()
        if not self.enabled:
            return self
        _active.append(self)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.stopped.set()
        self.thread.join()
        _active.remove(self)

    def tick(self, done: int) -> None:
        """`done` of `total` are finished."""
        self.done = done

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.total is None:
            return f"{self.label} {duration(elapsed)} elapsed"
        done = self.done
        eta = f", eta {duration(elapsed * (self.total - done) / done)}" if 0 < done < self.total else ""
        return f"{self.label} {done}/{self.total} {self.unit}, {duration(elapsed)} elapsed{eta}"

    def beat(self) -> None:
        while not self.stopped.wait(max(_last_line[0] + self.interval - time.perf_counter(), 0.1)):
            if _active and _active[-1] is self and time.perf_counter() >= _last_line[0] + self.interval:
                print(self.line(), file=self.stream, flush=True)
                printed()
