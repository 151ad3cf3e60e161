"""The paths a user supplies (user_data, base_model.path) are checked by the check_inputs stage before DVC hashes or
deletes anything: a FIFO, a missing checkpoint, an unreadable file and a stage's missing code each end in one line naming the path, a
non-zero exit and the workspace (every output, params.yaml, dvc.lock) byte-identical, under `dvc exp run` and
`dvc repro`; nothing blocks, `dvc status` included (docs/bad-input.md)."""

import ctypes
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from harness import BIN, edit_params, environment, md5, run
from test_failures import one_error
from test_leftovers import workspace

from llmpipe.data.inputs import fingerprint
from llmpipe.errors import PipelineError

TIMEOUT = 240  # seconds: a DVC command that blocks (hashing a FIFO) fails the test instead of hanging it


def run_cache_entries(repo: Path) -> int:
    return sum(1 for path in (repo / ".dvc/cache/runs").rglob("*") if path.is_file())


def without_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding set
    (prctl PR_CAPBSET_DROP), so that even root is refused a file its mode bits do not let it read."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def dvc(repo: Path, *args: str, honour_permissions: bool = False) -> subprocess.CompletedProcess:
    """A DVC command that must end within TIMEOUT; as root, `honour_permissions` makes file modes bind it too."""
    preexec = without_file_permission_override if honour_permissions and os.geteuid() == 0 else None
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=preexec)


def commit_lock(repo: Path) -> None:
    """dvc.lock committed, as a user's repository has it."""
    run(["git", "add", "dvc.lock"], repo)
    run(["git", "commit", "-qm", "the pipeline's results"], repo)


def refused_leaving_everything(repo: Path, command: list[str], expected: str, before: dict[str, str],
                               honour_permissions: bool = False) -> None:
    entries = run_cache_entries(repo)
    result = dvc(repo, *command, honour_permissions=honour_permissions)
    assert one_error(result) == expected, (command, result.stderr[-2000:])
    assert workspace(repo) == before, command
    assert run_cache_entries(repo) == entries


@pytest.mark.slow
def test_a_fifo_a_missing_checkpoint_or_missing_code_is_refused_before_dvc_deletes_or_blocks(copy_built):
    repo = copy_built()
    commit_lock(repo)
    before = workspace(repo)
    status = dvc(repo, "status").stdout

    # A FIFO in user_data: DVC hashed the folder by opening every file, so `dvc status` and every run blocked.
    os.mkfifo(repo / "user_data/corpus.txt")
    assert dvc(repo, "status").stdout == status  # returns: DVC never opens user_data itself
    fifo = "error: user_data/corpus.txt: a FIFO (named pipe); inputs may hold only regular files and directories"
    refused_leaving_everything(repo, ["exp", "run", "-S", "seed=7"], fifo, before)
    refused_leaving_everything(repo, ["repro"], fifo, before)
    (repo / "user_data/corpus.txt").unlink()

    # A checkpoint that does not exist: DVC deleted models/tokenizer and reports/tokenizer* before finding out.
    missing = "error: params.yaml: base_model.path: /nonexistent: does not exist"
    refused_leaving_everything(repo, ["exp", "run", "-S", "base_model=hf", "-S", "base_model.path=/nonexistent"],
                               missing, before)  # params.yaml without the -S values
    edit_params(repo, base_model__source="hf", base_model__path="/nonexistent")
    refused_leaving_everything(repo, ["repro"], missing, {**before, "params.yaml": md5(repo / "params.yaml")})
    run(["git", "checkout", "params.yaml"], repo)

    # A stage's code missing: DVC deleted quantize's outputs before it found out, hashing its dependencies.
    (repo / "stages/quantize.py").rename(repo / "quantize.py.aside")
    missing = "error: dvc.yaml: stages.quantize.deps: stages/quantize.py: does not exist"
    refused_leaving_everything(repo, ["exp", "run", "-S", "quantize.model_name=other"], missing, before)
    refused_leaving_everything(repo, ["repro"], missing, before)
    (repo / "quantize.py.aside").rename(repo / "stages/quantize.py")
    assert workspace(repo) == before and dvc(repo, "status").stdout == status


@pytest.mark.slow
def test_an_unreadable_user_file_is_refused_before_dvc_reads_it(copy_built):
    repo = copy_built()
    commit_lock(repo)
    before = workspace(repo)
    secret = repo / "user_data/notes/secret.txt"
    secret.parent.mkdir()
    secret.write_text("not yours\n")
    secret.chmod(0)
    expected = "error: user_data/notes/secret.txt: cannot be read ([Errno 13] Permission denied)"
    refused_leaving_everything(repo, ["exp", "run", "-S", "seed=7"], expected, before, honour_permissions=True)
    refused_leaving_everything(repo, ["repro"], expected, before, honour_permissions=True)


def test_a_fingerprint_lists_every_regular_file_once_and_refuses_anything_else(tmp_path):
    (tmp_path / "data/sub").mkdir(parents=True)
    (tmp_path / "data/a.txt").write_text("a\n")
    (tmp_path / "data/sub/b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "data/sub/up").symlink_to("..")  # a loop: each directory is read once
    cache = tmp_path / "hashes.json"
    first = fingerprint(tmp_path / "data", cache_path=cache)
    assert [name for name, _, _ in first["files"]] == ["a.txt", "sub/b.jsonl"]
    assert fingerprint(tmp_path / "data", cache_path=cache) == first == fingerprint(tmp_path / "data")
    (tmp_path / "data/a.txt").write_text("A\n")  # same size, new content: a new md5
    assert fingerprint(tmp_path / "data", cache_path=cache)["files"][0][2] != first["files"][0][2]

    os.mkfifo(tmp_path / "data/sub/pipe")
    (tmp_path / "data/gone").symlink_to(tmp_path / "nowhere")
    for path, expected in [(tmp_path / "data", "a symbolic link to a missing path"),
                           (tmp_path / "data/sub", "a FIFO (named pipe)"),
                           (tmp_path / "missing", "does not exist")]:
        with pytest.raises(PipelineError, match=re.escape(expected)):
            fingerprint(path, "params.yaml: base_model.path")
    assert stat.S_ISFIFO(os.stat(tmp_path / "data/sub/pipe").st_mode)  # refused without being opened
