"""The one exception type a user should ever see from a stage: a one-line message, no traceback.

A stage raises `PipelineError` for anything the user can fix (bad data, bad params, a missing
upstream output). The stage runner prints `error: <message>` and exits with status 1.
"""

import signal

NOT_A_STAGE_DEPENDENCY = "exception types"  # see llmpipe.generate.code_deps


class PipelineError(Exception):
    """A problem with the user's input, named precisely enough to fix it (file, line or key)."""


class ParamError(PipelineError):
    """A value in params.yaml that is missing, of the wrong type or out of range."""


class UndeclaredParamError(PipelineError):
    """A stage read a params.yaml key that its dvc.yaml entry does not declare."""


class InputDataError(PipelineError):
    """A data file that is missing, empty, not valid UTF-8, or not in the expected format."""


class SettingError(ValueError):
    """A settings dataclass refusing a combination of values in its `__post_init__`; `field` names the key
    (relative to the section) so the message can name it in params.yaml."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Stopped(BaseException):
    """The process received SIGTERM or SIGHUP. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
