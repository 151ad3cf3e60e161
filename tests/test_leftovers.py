"""What reaches the user when something unexpected ends a stage names the root cause and its file, however a
library wrapped it; and what a killed process leaves (temporary paths, MLflow runs left RUNNING, outputs DVC
deleted) is cleaned up, or said, by the next stage (docs/bad-input.md)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(script: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DVC_", "MLFLOW_", "LLMPIPE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_a_checkpoint_write_that_hits_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
    # The file-size limit stands in for a full disk: torch.distributed.checkpoint reports it as
    # `CheckpointException ranks:dict_keys([0])`; the line must name the shard and the OS error instead.
    result = python("""
        import resource, signal, torch
        from llmpipe.runner.guard import guarded
        from llmpipe.train.checkpoint import CheckpointStore
        model = torch.nn.Linear(256, 256)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 256)).sum().backward(); optimizer.step()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        with guarded("pretrain"):
            CheckpointStore(__import__("pathlib").Path("checkpoints/pretrain/key")).save(2, model, optimizer, {})
    """, tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: pretrain: checkpoints/pretrain/key/.step-0000002.tmp-"), errors[0]
    assert (".safetensors: [Errno 27] File too large (writing) (raised as CheckpointException) "
            "(traceback in logs/pretrain.log)") in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "checkpoints/pretrain/key").iterdir()) == []  # no .tmp- directory left


def test_sigusr1_prints_where_a_stage_is_and_the_stage_goes_on(tmp_path):
    # What a user (or a test whose stage seems stuck) sends to learn where every thread of a stage waits.
    result = python("""
        import os, signal
        from llmpipe.runner.guard import guarded
        def waiting_on_a_peer():
            os.kill(os.getpid(), signal.SIGUSR1)
        with guarded("pretrain"):
            waiting_on_a_peer()
            print("went on")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout == "went on\n", result.stderr[-3000:]
    assert "in waiting_on_a_peer" in result.stderr


def test_the_culprit_is_the_root_os_error_and_its_file():
    from llmpipe.runner.culprit import culprit

    def wrapped(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except OSError as exc:
                raise RuntimeError("could not save") from exc
        except RuntimeError as outer:
            return outer

    assert culprit(wrapped(PermissionError(13, "Permission denied", "models/x.bin"))) == \
        "models/x.bin: [Errno 13] Permission denied (raised as RuntimeError)"
    assert culprit(wrapped(OSError(18, "Invalid cross-device link", "a", None, "b"))) == \
        "a -> b: [Errno 18] Invalid cross-device link (raised as RuntimeError)"
    # A compiled library's I/O error, in its message only (safetensors' writer): the errno and the file it was given.
    import torch
    from safetensors.torch import save_file

    with pytest.raises(Exception) as raised:
        save_file({"a": torch.zeros(4)}, "models/no-such-directory/model.safetensors")
    assert culprit(raised.value) == ("models/no-such-directory/model.safetensors: [Errno 2] No such file or directory "
                                     "(raised as SafetensorError)")
    # No OSError: the innermost explicit cause; an error while handling another is reported itself.
    try:
        try:
            raise KeyError("n_layer")
        except KeyError as exc:
            raise ValueError("bad config") from exc
    except ValueError as error:
        assert culprit(error) == "KeyError: 'n_layer' (raised as ValueError)"
    try:
        try:
            raise KeyError("n_layer")
        except KeyError:
            raise ValueError("bad config")
    except ValueError as error:
        assert culprit(error) == "ValueError: bad config"
    # Exception groups are walked too.
    group = ExceptionGroup("two", [ValueError("x"), OSError(28, "No space left on device", "data/a")])
    assert culprit(group) == "data/a: [Errno 28] No space left on device (raised as ExceptionGroup)"


def test_temporaries_of_dead_processes_are_removed_and_those_of_live_ones_kept(tmp_path):
    from llmpipe.atomic import remove_orphaned_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "models").mkdir()
    orphan_file = tmp_path / f"models/.model-Q4_K.gguf.tmp-{dead.pid}"
    orphan_file.write_bytes(b"half")
    orphan_dir = tmp_path / f"models/ckpt/.step-0000002.tmp-{dead.pid}"
    (orphan_dir / "sharded").mkdir(parents=True)
    old_dir = tmp_path / f"models/.finetuned.old-{dead.pid}"
    old_dir.mkdir()
    live = tmp_path / f"models/.pretrained.tmp-{os.getpid()}"
    live.write_bytes(b"being written")
    other = tmp_path / "models/.notes.tmp-backup"  # not ours: no PID
    other.write_bytes(b"")
    removed = remove_orphaned_temporaries([tmp_path / "models"])
    assert sorted(removed) == sorted([orphan_file, orphan_dir, old_dir])
    assert not orphan_file.exists() and not orphan_dir.exists() and not old_dir.exists()
    assert live.exists() and other.exists()


def test_runs_left_running_by_a_killed_stage_are_closed_by_the_next_stage(tmp_path, monkeypatch):
    import mlflow

    from llmpipe.tracking.stage_run import StageRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = python(f"""
        import os, signal
        os.environ.update(MLFLOW_TRACKING_URI="{uri}", LLMPIPE_PIPELINE_ID="killed-pipeline",
                          MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
        from llmpipe.tracking.stage_run import StageRun
        with StageRun("pretrain", {{}}, {{}}):
            os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    assert killed.returncode == -9, killed.stderr
    client = mlflow.tracking.MlflowClient(uri)
    [killed_stage] = client.search_runs(["1"], filter_string="attributes.run_name = 'pretrain'")
    killed_pipeline = client.get_run(killed_stage.data.tags["mlflow.parentRunId"])
    assert killed_stage.info.status == killed_pipeline.info.status == "RUNNING"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    monkeypatch.setenv("LLMPIPE_PIPELINE_ID", "killed-pipeline")  # the same execution key again: a new pipeline run
    with StageRun("pretrain", {}, {}) as rerun:
        pass
    for run_id in (killed_stage.info.run_id, killed_pipeline.info.run_id):
        closed = client.get_run(run_id)
        assert closed.info.status == "FAILED", closed.info.run_name
        assert closed.data.tags["llmpipe.end_reason"].startswith("its process (PID "), closed.data.tags
    assert rerun.parent_id != killed_pipeline.info.run_id
    assert client.get_run(rerun.run_id).info.status == client.get_run(rerun.parent_id).info.status == "FINISHED"


@pytest.mark.slow  # runs `dvc init` and `dvc commit`
def test_a_restore_that_cannot_put_an_output_back_says_which(tmp_path, monkeypatch, capsys):
    import yaml

    from llmpipe.runner.restore import restore_outputs

    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    cache = tmp_path / ".dvc/cache/files/md5"
    kept = b"kept\n"
    import hashlib
    kept_md5 = hashlib.md5(kept).hexdigest()
    (cache / kept_md5[:2]).mkdir(parents=True)
    (cache / kept_md5[:2] / kept_md5[2:]).write_bytes(kept)
    lock = {"schema": "2.0", "stages": {"quantize": {"cmd": "x", "outs": [
        {"path": "reports/sizes.json", "md5": kept_md5, "size": 5},
        {"path": "models/gguf", "md5": "0123456789abcdef0123456789abcdef.dir", "size": 1, "nfiles": 1}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "quantize")
    assert restore_outputs("quantize") == ["reports/sizes.json"]
    assert (tmp_path / "reports/sizes.json").read_bytes() == kept
    message = capsys.readouterr().err
    assert message.startswith("quantize: could not put back models/gguf: DVC's cache lacks 1 of its objects "
                              "(.dvc/cache/files/md5/01/23456789abcdef0123456789abcdef.dir; `dvc pull quantize`"), message


def test_a_model_no_better_than_chance_is_recorded_not_refused(capsys):
    import math

    from llmpipe.report.markdown import chance_level_lines, finetune_samples
    from llmpipe.report.publish import flag_chance_level
    from llmpipe.report.tables import FINETUNE_METRICS, dvc_metrics
    from llmpipe.tracking.stage_run import StageRun
    from llmpipe.train.loop import chance_level_warning

    uniform = math.log(300)
    assert chance_level_warning("finetune", "val_answer_loss", {"val_answer_loss": uniform - 1}, 300) is None
    warning = chance_level_warning("finetune", "val_answer_loss", {"val_answer_loss": uniform}, 300)
    assert warning.startswith("finetune: the trained model predicts no better than chance: val_answer_loss 5.7038 ")

    tags = {}
    run = StageRun("finetune", {}, {}, enabled=False)
    run.set_tags = tags.update
    metrics = {"qa_accuracy_heldout_people": 0.0, "qa_accuracy_finetuned_people": 0.0,
               **flag_chance_level(run, warning)}
    assert capsys.readouterr().err.startswith(f"warning: {warning}; recorded (no_better_than_chance = 1")
    assert tags == {"llmpipe.no_better_than_chance": warning}
    assert dvc_metrics(metrics, FINETUNE_METRICS) == {"heldout_acc": 0.0, "tuned_acc": 0.0, "no_better_than_chance": 1}
    assert flag_chance_level(run, None) == {}  # a model that learned: no flag, metrics.json as before
    assert f"**Warning:** {warning}." in finetune_samples({}, {}, 2, warning)
    assert chance_level_lines({"Pretraining": {"val_bpb": 1.0}, "Fine-tuning": metrics}) == [
        "**Warning:** Fine-tuning: the trained model predicts no better than chance (its validation loss is not below "
        "the uniform distribution's; `no_better_than_chance` in its metrics).", ""]


@pytest.mark.slow
def test_after_a_kill_9_the_next_stage_closes_its_runs_and_removes_what_it_left(copy_built):
    import signal
    import time

    import mlflow
    from harness import dvc, environment, pipeline_status

    repo = copy_built()
    # kill -9 of a stage inside a pipeline execution: its run and the pipeline's stay RUNNING.
    stage = subprocess.Popen([sys.executable, "stages/pretrain.py"], cwd=repo,
                             env=environment(LLMPIPE_PIPELINE_ID="killed-pipeline"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((repo / "checkpoints/pretrain").glob("*/step-*")) and time.time() < deadline:
        time.sleep(0.01)
    stage.send_signal(signal.SIGKILL)
    assert stage.wait() == -signal.SIGKILL
    client = mlflow.tracking.MlflowClient(f"sqlite:///{repo / '.mlflow/mlflow.db'}")
    running = client.search_runs([client.get_experiment_by_name("llmpipe").experiment_id],
                                 filter_string="attributes.status = 'RUNNING'")
    assert sorted(run.info.run_name.split(" ")[0] for run in running) == ["pipeline", "pretrain"]
    # What a killed write leaves (the PID in the name is its owner's, gone).
    gguf_leftover = repo / f"models/.model-Q4_K.gguf.tmp-{stage.pid}"
    gguf_leftover.write_bytes(b"half a file")
    checkpoint_leftover = next((repo / "checkpoints/pretrain").iterdir()) / f".step-0000004.tmp-{stage.pid}"
    (checkpoint_leftover / "sharded").mkdir(parents=True)

    result = dvc(repo, "repro", "-f", "-s", "prepare")  # any stage
    assert "MLflow: 2 run(s) left RUNNING by a process that is gone now marked FAILED" in result.stderr, result.stderr
    for run in running:
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "FAILED" and "llmpipe.end_reason" in closed.data.tags
    assert not gguf_leftover.exists() and not checkpoint_leftover.exists()
    assert "removed what 2 write(s) of processes that are gone left" in result.stderr
    assert pipeline_status(repo) == ""


def workspace(repo: Path) -> dict[str, str]:
    """md5 of params.yaml, dvc.lock and every file of the outputs' directories."""
    import hashlib

    files = [repo / "params.yaml", repo / "dvc.lock"]
    files += sorted(path for top in ("data", "models", "reports") for path in (repo / top).rglob("*") if path.is_file())
    return {str(path.relative_to(repo)): hashlib.md5(path.read_bytes()).hexdigest() for path in files}


@pytest.mark.slow
def test_a_failed_experiment_leaves_the_workspace_as_it_found_it(copy_built):
    from harness import dvc, pipeline_status, run

    repo = copy_built()
    run(["git", "add", "dvc.lock"], repo)  # as a team keeps it: the experiment's starting commit then holds it
    run(["git", "commit", "-qm", "dvc.lock"], repo)
    before = workspace(repo)
    # A later stage refuses after the earlier ones ran with the experiment's seed: their new outputs and dvc.lock
    # entries go too, not only the -S values.
    result = dvc(repo, "exp", "run", "-S", "pretrain.max_steps=5", "-S", "finetune.lora.rank=100000", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "finetune: put back dvc.lock and what the experiment's earlier stages wrote" in output, output[-3000:]
    assert workspace(repo) == before
    assert pipeline_status(repo) == ""

    # A refused experiment right after an applied one: params.yaml keeps the applied experiment's values.
    dvc(repo, "exp", "run", "-S", "tokenize.batch_size=7")  # tokenize alone reruns (the same token files)
    applied = workspace(repo)
    result = dvc(repo, "exp", "run", "-S", "finetune.lora.rank=100000", check=False)
    assert result.returncode != 0
    assert workspace(repo) == applied
    assert pipeline_status(repo) == ""
