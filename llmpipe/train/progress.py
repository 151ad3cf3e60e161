"""What a training stage shows while it runs: a tqdm bar (step, loss, tokens/s, elapsed, ETA) on a
terminal; plain lines at least every `interval_seconds` (as long as one step is shorter) when the output is
not a terminal (CI, `dvc queue logs`, a log file), so a log never fills with carriage returns. Evaluation results get their own line, with
the headline metrics only (per-attribute breakdowns go to MLflow and the curve files).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from llmpipe.runner.heartbeat import duration, printed

NOT_A_STAGE_DEPENDENCY = "progress lines"  # see llmpipe.generate.code_deps


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Leave out breakdowns: a key that extends another key (`qa_accuracy_x_people_major` of `qa_accuracy_x_people`)."""
    return {k: v for k, v in metrics.items() if not any(k != other and k.startswith(other + "_") for other in metrics)}


class Progress:
    """Shown by the main process only; a no-op elsewhere."""

    def __init__(self, stage: str, total_steps: int, start_step: int, enabled: bool, interval_seconds: float = 30.0,
                 stream=None):
        self.stage, self.total, self.start_step = stage, total_steps, start_step
        self.enabled, self.interval = enabled, interval_seconds
        self.stream = stream or sys.stdout
        self.started = self.last_line = self.previous_step = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", file=self.stream,
                            dynamic_ncols=True)

    def step(self, done: int, train_loss: float, tokens_per_second: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(f"loss {train_loss:.4f}" + (f", {tokens_per_second:,.0f} tok/s"
                                                                  if tokens_per_second else ""), refresh=False)
            return
        now = time.perf_counter()
        step_seconds, self.previous_step = now - self.previous_step, now
        # Print now when waiting for one more step would leave `interval_seconds` without a line.
        if now - self.last_line + step_seconds >= self.interval or done == self.total:
            elapsed = now - self.started
            rate = (done - self.start_step) / max(elapsed, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            print(f"{self.stage}: step {done}/{self.total} loss {train_loss:.4f}"
                  + (f" {tokens_per_second:,.0f} tok/s" if tokens_per_second else "")
                  + f" elapsed {duration(elapsed)} eta {duration(eta)}", file=self.stream, flush=True)
            self.last_line = now
            printed()

    def evaluation(self, done: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = f"{self.stage}: step {done}/{self.total} " + " ".join(f"{k} {v:.4f}" for k, v in headline(metrics).items())
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
            printed()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
