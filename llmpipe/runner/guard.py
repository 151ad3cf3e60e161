"""Whatever ends a stage, the previous outputs are there afterwards and the user reads one line.

    with guarded("quantize"):
        ...  # load params, open the MLflow run, do the work

Every way a stage can end other than success goes through `guarded`: a refusal (`PipelineError`), any other
exception (a locked MLflow store, a full disk, a bug), SIGTERM or SIGHUP (a timeout, a scheduler, a closed
terminal: turned into `Stopped`, so the stage unwinds like an exception) and Ctrl-C (KeyboardInterrupt).
Each one:
- puts back the outputs DVC deleted before running the stage, as dvc.lock records them
  (llmpipe.runner.restore), and under `dvc exp run` the whole workspace as the experiment found it: dvc.lock
  and the outputs its earlier stages rewrote, and params.yaml as conf/ composes it with dvc.lock's values;
- lets the MLflow run of the stage end as FAILED or KILLED, its pipeline run too (llmpipe.tracking.stage_run
  sees the exception as it unwinds);
- prints ONE line, `error: <message>` for a refusal, `error: <stage>: <cause>` otherwise (the root cause, with
  the file it concerns, however the libraries on the way wrapped it: llmpipe.runner.culprit), with the traceback
  in logs/<stage>.log rather than on the screen;
- exits non-zero: 1, or 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).

A stage that seems stuck (a collective waiting on a peer, a lock) says where: `kill -USR1 <pid>` prints every
thread's stack to its stderr (Python's faulthandler) and the stage goes on.

The stage entry point (llmpipe.runner.stage) and the process launcher (llmpipe.runner.launch, whose own
argument checks come before any stage code) both run under it. Under the launcher, each of several processes
writes its line into the directory ERRORS_DIR names instead of printing it, and the launcher prints the one
that names the cause (a refusal or a crash before a process stopped because another one failed).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from llmpipe.config.layout import repository_root
from llmpipe.config.params import PARAMS_FILE
from llmpipe.errors import PipelineError, Stopped
from llmpipe.runner.culprit import culprit
from llmpipe.runner.restore import (
    restore_experiment_start,
    restore_outputs,
    restore_params_file,
)

NOT_A_STAGE_DEPENDENCY = "whatever ends a stage: outputs put back, one line, exit status"  # see llmpipe.generate.code_deps

ERRORS_DIR = "LLMPIPE_ERRORS_DIR"  # set by the launcher: where each of its processes leaves its error line
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
DUMP_STACKS_SIGNAL = signal.SIGUSR1  # every thread's stack to stderr, and go on
_restored: set[str] = set()  # stages whose outputs this process already put back


def _stop(signal_number, frame) -> None:
    raise Stopped(signal_number)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise `Stopped`, SIGINT KeyboardInterrupt; a signal the parent made this process ignore
    (`nohup`, a background job) stays ignored. SIGUSR1 prints every thread's stack and the stage goes on."""
    for number in (*STOP_SIGNALS, signal.SIGINT):
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, signal.default_int_handler if number == signal.SIGINT else _stop)
    faulthandler.register(DUMP_STACKS_SIGNAL, all_threads=True)


def _ignore_signals() -> None:
    """While putting outputs back: a second Ctrl-C or SIGTERM must not leave them half restored."""
    for number in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)


def exit_status(exc: BaseException) -> int:
    if isinstance(exc, Stopped):
        return 128 + exc.signal_number
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 1


def describe(stage: str, exc: BaseException) -> str:
    """The one line (without `error: `) for what ended the stage."""
    if isinstance(exc, PipelineError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return f"{stage}: interrupted (Ctrl-C)"
    if isinstance(exc, Stopped):
        return f"{stage}: stopped by {exc}"
    return f"{stage}: {culprit(exc)}"


def log_path(stage: str, rank: int = 0) -> Path:
    return repository_root() / "logs" / (f"{stage}.log" if rank == 0 else f"{stage}-rank{rank}.log")


def write_log(stage: str, exc: BaseException, rank: int) -> Path | None:
    """The traceback of an unexpected exception, in logs/<stage>.log (the latest failure); None if unwritable."""
    path = log_path(stage, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n"
                        + "".join(traceback.format_exception(exc)), encoding="utf-8")
    except OSError:
        return None
    return path


KINDS = ("refused", "failed", "stopped")  # how a process ended, the most telling first


def kind_of(exc: BaseException) -> str:
    return "refused" if isinstance(exc, PipelineError) else "stopped" if isinstance(exc, (KeyboardInterrupt, Stopped)) \
        else "failed"


def report(message: str, rank: int, kind: str) -> None:
    """Print `error: <message>`, or under the launcher with several processes, leave it for the launcher."""
    errors_dir = os.environ.get(ERRORS_DIR)
    if errors_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with contextlib.suppress(OSError):
            Path(errors_dir, f"rank-{rank:05d}").write_text(f"{kind}\n{message}", encoding="utf-8")
            return
    print(f"error: {message}", file=sys.stderr, flush=True)


def collected_error(errors_dir: str | Path) -> tuple[str, str] | None:
    """(kind, line) of a launch whose processes left their lines in `errors_dir`: a refusal before a crash before a
    process stopped because another one failed; the lowest rank's among equals."""
    lines = []
    for path in sorted(Path(errors_dir).glob("rank-*")):
        kind, _, message = path.read_text("utf-8").partition("\n")
        lines.append((KINDS.index(kind) if kind in KINDS else len(KINDS), kind, message))
    return min(lines)[1:] if lines else None


def put_back(stage: str, is_main: bool) -> None:
    """The previous outputs, as dvc.lock records them, and under `dvc exp run` params.yaml as conf/ composes it."""
    if not is_main or stage in _restored:
        return
    _restored.add(stage)
    try:
        restored = restore_outputs(stage)
        if restored:
            print(f"{stage}: kept the previous outputs ({', '.join(restored)})", file=sys.stderr, flush=True)
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            earlier = restore_experiment_start(stage)
            if earlier:
                print(f"{stage}: put back dvc.lock and what the experiment's earlier stages wrote, as the experiment "
                      f"found them ({', '.join(earlier)})", file=sys.stderr, flush=True)
            if restore_params_file():
                print(f"{stage}: put back {PARAMS_FILE} as conf/ composes it, with the values dvc.lock records (the "
                      "refused experiment's values are not kept)", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 (the stage's own error is the one to report)
        print(f"{stage}: could not put back the previous outputs ({type(exc).__name__}: {exc})".splitlines()[0],
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def guarded(stage: str, rank: int = 0) -> Iterator[None]:
    """Run the block as stage `stage` (process `rank`; rank 0 owns the outputs): see the module docstring."""
    install_signal_handlers()
    try:
        yield
    except SystemExit as exc:  # an exit already explained (a usage error, the launcher's own report)
        if exc.code not in (0, None):
            _ignore_signals()
            put_back(stage, rank == 0)
        raise
    except BaseException as exc:  # noqa: BLE001 (whatever ended the stage, it ends here, in one line)
        _ignore_signals()
        put_back(stage, rank == 0)
        message = describe(stage, exc)
        if not isinstance(exc, (PipelineError, KeyboardInterrupt, Stopped)):
            log = write_log(stage, exc, rank)
            message += f" (traceback in {os.path.relpath(log)})" if log else ""
        report(message, rank, kind_of(exc))
        sys.exit(exit_status(exc))
