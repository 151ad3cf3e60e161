"""Whatever ends a stage under DVC (a refusal before or inside the stage, any other exception, SIGTERM, a param DVC
itself rejects, several processes), the previous outputs are there afterwards byte for byte, the user reads one
line and MLflow's runs are not left RUNNING; values are checked for what they mean; nothing runs forever; a run
resumes on more processes (docs/bad-input.md). Each DVC run covers what it can: they are the cost here."""

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from harness import BIN, dvc, edit_params, environment, md5, mlflow_runs, run


def stage_outputs(repo: Path, stage: str) -> dict[str, str]:
    """md5 of every file of every output dvc.yaml declares for `stage`."""
    definition = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    paths = [next(iter(entry)) if isinstance(entry, dict) else entry
             for kind in ("outs", "metrics") for entry in definition.get(kind) or []]
    files = {}
    for path in map(repo.joinpath, paths):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            files[str(file.relative_to(repo))] = md5(file) if file.is_file() else None
    return files


def one_error(result: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one `error: ` line of ours and no traceback; that line."""
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def latest_run(repo: Path, name: str):
    """The latest MLflow run named `name`, and its pipeline (parent) run."""
    client, runs = mlflow_runs(repo)
    stage_run = max((r for r in runs if r.info.run_name == name), key=lambda r: r.info.start_time)
    return stage_run, client.get_run(stage_run.data.tags["mlflow.parentRunId"])


@pytest.mark.slow
def test_any_failure_keeps_the_outputs_under_repro_and_exp_run(copy_built):
    repo = copy_built()
    pretrain, quantize = stage_outputs(repo, "pretrain"), stage_outputs(repo, "quantize")

    # The launcher's own check, before any stage code: named as the params key, under `dvc exp run`.
    result = dvc(repo, "exp", "run", "-s", "pretrain", "-S", "pretrain.processes=0", check=False)
    assert one_error(result) == "error: params.yaml: pretrain.processes: expected an integer >= 1, got '0'"
    assert stage_outputs(repo, "pretrain") == pretrain
    assert run(["git", "status", "--porcelain", "params.yaml"], repo).stdout == ""  # the -S value taken back

    # Two processes refusing their input (a token id outside the vocabulary): the launcher restores the outputs once
    # both ended, and prints the line a process left.
    shard = np.memmap(repo / "data/tokens/train/shard-00000.bin", dtype="<u2", mode="r+")
    shard[1000] = 65535
    shard.flush()
    edit_params(repo, pretrain__processes=2)
    result = dvc(repo, "repro", "-s", "-f", "pretrain", check=False)  # (exp run would check the shard out again)
    assert one_error(result) == ("error: data/tokens/train/shard-00000.bin: token 1000 is id 65535, outside the "
                                 "300-token vocabulary (meta.json); rerun the tokenize stage (dvc repro tokenize "
                                 "--force)")
    assert stage_outputs(repo, "pretrain") == pretrain
    run(["git", "checkout", "params.yaml"], repo)

    # Any other exception (here: a file-size limit, as a full disk): one line naming the stage and the cause, the
    # traceback in logs/; the outputs copied back (or hard-linked, where the limit forbids a copy); MLflow FAILED.
    finetune = stage_outputs(repo, "finetune")

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))  # the 1.9 MB fp32 weights do not fit

    result = subprocess.run([str(BIN / "dvc"), "repro", "-s", "-f", "finetune"], cwd=repo, env=environment(),
                            capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300, check=False)
    line = one_error(result)
    assert line.startswith("error: finetune: ") and line.endswith("(traceback in logs/finetune.log)"), line
    assert ": [Errno 27] File too large" in line, line  # the OS error and its file, not a wrapper's type
    assert "Traceback" in (repo / "logs/finetune.log").read_text()
    assert stage_outputs(repo, "finetune") == finetune
    stage_run, pipeline = latest_run(repo, "finetune")
    assert stage_run.info.status == "FAILED" and pipeline.info.status == "FAILED"

    # A params section DVC checks only after deleting the outputs: dvc.yaml's `meta` makes DVC refuse it first.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["quantize"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(repo, "repro", check=False)
    assert result.returncode != 0 and "Could not find 'quantize." in result.stderr
    assert stage_outputs(repo, "quantize") == quantize


@pytest.mark.slow
def test_a_stopped_fine_tune_keeps_its_outputs_and_resumes_on_two_processes(copy_built, built_repo):
    """A LoRA fine-tune stopped by SIGTERM (a timeout) at its first checkpoint: outputs kept, one line, MLflow runs
    KILLED. Started as a default run is (global batch = micro-batch), it resumes on 2 processes, DDP and FSDP,
    from that checkpoint (the micro-batch is split: the same gradient, the same curve)."""
    repo = copy_built()
    finetune = stage_outputs(repo, "finetune")
    edit_params(repo, finetune__micro_batch_sequences=4)  # = global_batch_sequences, as by default
    process = subprocess.Popen([str(BIN / "dvc"), "repro", "finetune"], cwd=repo, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not list((repo / "checkpoints/finetune").glob("*/step-*")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # as `timeout` does: DVC and the stage
    stdout, stderr = process.communicate(timeout=120)  # the pipes close when the stage has ended too
    assert one_error(subprocess.CompletedProcess([], process.returncode, stdout, stderr)) == (
        "error: finetune: stopped by SIGTERM")
    assert stage_outputs(repo, "finetune") == finetune
    stage_run, pipeline = latest_run(repo, "finetune")
    assert stage_run.info.status == "KILLED" and pipeline.info.status == "KILLED"
    checkpoints = repo.parent / "checkpoints-after-stop"
    shutil.copytree(repo / "checkpoints", checkpoints)

    def train_losses(root: Path) -> list[float]:
        with open(root / "reports/finetune/train_curve.csv") as handle:
            return [float(row["train_loss"]) for row in csv.DictReader(handle)]

    for parallelism in ("ddp", "fsdp"):
        shutil.rmtree(repo / "checkpoints", ignore_errors=True)
        shutil.copytree(checkpoints, repo / "checkpoints")
        edit_params(repo, finetune__processes=2, finetune__parallelism=parallelism)
        output = dvc(repo, "repro", "finetune").stdout
        assert "resuming from checkpoint" in output and "micro-batches of 2 sequences" in output, output
        assert train_losses(repo) == pytest.approx(train_losses(built_repo), rel=1e-4), parallelism


@pytest.mark.slow
def test_values_are_checked_for_what_they_mean(copy_built):
    repo = copy_built()
    pretrain, finetune, quantize = (stage_outputs(repo, stage) for stage in ("pretrain", "finetune", "quantize"))

    # Finite in params.yaml's type but meaningless: an epsilon that makes every output uniform trains "fine". A poor
    # result is a result: written, flagged (a warning line, a metric `dvc exp show` shows, an MLflow tag), not refused.
    result = dvc(repo, "exp", "run", "-s", "pretrain", "-S", "model.rms_norm_eps=1e30", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: pretrain: the trained model predicts no better than chance: val_loss " in result.stderr
    assert json.loads((repo / "reports/pretrain/metrics.json").read_text())["no_better_than_chance"] == 1
    stage_run, _ = latest_run(repo, "pretrain")
    assert stage_run.info.status == "FINISHED" and "llmpipe.no_better_than_chance" in stage_run.data.tags
    run(["git", "checkout", "params.yaml"], repo)
    dvc(repo, "exp", "run", "-s", "pretrain")  # the default params again: the previous outputs, from the run-cache
    assert stage_outputs(repo, "pretrain") == pretrain
    result = run([sys.executable, "stages/pretrain.py", "model.rms_norm_eps=inf"], repo, check=False)
    assert one_error(result) == "error: params.yaml: model.rms_norm_eps: expected a number > 0, got inf (float)"

    # A LoRA rank wider than the layers it adapts would only cost time: refused before any work, with the bound.
    edit_params(repo, finetune__lora__rank=100000)
    result = dvc(repo, "repro", "-s", "-f", "finetune", check=False)
    assert one_error(result) == ("error: params.yaml: finetune.lora.rank: expected at most 128, the smaller dimension "
                                 "of layers.0.self_attn.k_proj (128 × 256), got 100000")
    assert stage_outputs(repo, "finetune") == finetune

    # Weights checked after conversion to the dtype the model computes in; config.json values typed.
    from safetensors.torch import load_file, save_file

    weights = repo / "models/finetuned/model.safetensors"
    original = weights.read_bytes()
    tensors = {name: tensor.double() for name, tensor in load_file(weights).items()}
    tensors["model.layers.0.mlp.up_proj.weight"][3, 7] = 1e300  # finite in float64, not in float32
    save_file(tensors, weights)
    result = dvc(repo, "repro", "-s", "-f", "quantize", check=False)
    assert one_error(result) == ("error: models/finetuned/model.safetensors: tensor model.layers.0.mlp.up_proj.weight "
                                 "holds NaN or infinite values in float32 (the file stores float64)")
    assert stage_outputs(repo, "quantize") == quantize
    weights.write_bytes(original)
    config = json.loads((repo / "models/finetuned/config.json").read_text())
    config["model"]["rms_norm_eps"] = "1e-5"
    (repo / "models/finetuned/config.json").write_text(json.dumps(config))
    result = run([str(BIN / "llmpipe"), "chat", "Who?"], repo, check=False)
    assert one_error(result) == ("error: models/finetuned/config.json: model.rms_norm_eps: expected a number > 0, got "
                                 "'1e-5' (str)")


@pytest.mark.slow
def test_a_binary_corpus_file_is_refused_at_once_and_the_outputs_are_kept(copy_built):
    repo = copy_built()
    (repo / "user_data/corpus.txt").write_text("\n\n".join(f"Person {i} lives in city {i % 5}." for i in range(300)))
    (repo / "user_data/zeros.txt").write_bytes(bytes(5_000_000))  # no newline, no text
    prepared = stage_outputs(repo, "prepare")
    result = dvc(repo, "exp", "run", "-s", "prepare", "-S", "data=local_files",
                 "-S", 'data.paths=["user_data/*.txt"]', check=False)
    assert one_error(result) == ("error: user_data/zeros.txt: binary content (a NUL byte at byte 0); text and JSONL "
                                 "files must be UTF-8 text")
    assert stage_outputs(repo, "prepare") == prepared


def test_corpus_paths_are_resolved_once_whatever_the_symlinks(tmp_path, monkeypatch):
    from llmpipe.data.sources import expand_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_data/d/e").mkdir(parents=True)
    (tmp_path / "user_data/d/corpus.txt").write_text("text\n")
    (tmp_path / "user_data/d/e/more.txt").write_text("more\n")
    (tmp_path / "user_data/d/loop").symlink_to("..")      # glob reads corpus.txt 41 times through it
    (tmp_path / "user_data/d/e/loop").symlink_to("../..")  # and through two loops walks exponentially many paths
    (tmp_path / "user_data/same.txt").symlink_to("d/corpus.txt")
    start = time.time()
    files = expand_paths(["user_data/**/*.txt", "user_data/d/*.txt"], "data.paths")
    assert [str(f) for f in files] == ["user_data/same.txt", "user_data/d/e/more.txt"] and time.time() - start < 5


def test_line_and_document_bounds_keep_memory_flat(tmp_path, monkeypatch):
    from llmpipe.data import jsonl, sources
    from llmpipe.errors import InputDataError

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 3000)
    (tmp_path / "one_line.txt").write_text("word " * 1000)  # no newline: never held as one line
    with pytest.raises(InputDataError, match=r"one_line.txt:1: a line longer than"):
        sources.check_file(tmp_path / "one_line.txt", "text", "text", "line")
    (tmp_path / "paragraph.txt").write_text("short line\n" * 400)  # lines fine, one 4,400-byte paragraph
    sources.check_file(tmp_path / "paragraph.txt", "text", "text", "line")
    with pytest.raises(InputDataError, match=r"paragraph.txt:1: a document \(data.txt_sample_by=paragraph\) longer"):
        sources.check_file(tmp_path / "paragraph.txt", "text", "text", "paragraph")


@pytest.mark.slow
def test_chat_keeps_its_history_within_the_context_and_refuses_bytes_that_are_not_text(copy_built):
    repo = copy_built()
    turns = "".join(f"What did person {i} study?\n" for i in range(60))
    start = time.time()
    result = subprocess.run([str(BIN / "llmpipe"), "chat", "--history", "--max-new-tokens", "2"], cwd=repo,
                            env=environment(), input=turns, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.count("model> ") == 60, result.stderr[-2000:]
    assert result.stderr.count("note: the conversation is longer than the model's 32-token context") == 1
    assert time.time() - start < 60  # each turn costs one context, whatever came before
    for args, stdin, expected in [(["generate", b"ab\xffc"], b"", "error: the prompt is not valid UTF-8 (byte 2)"),
                                  (["chat"], b"hello\n\xff\xfe\n", "error: input line 2 is not valid UTF-8 (byte 0)")]:
        result = subprocess.run([str(BIN / "llmpipe").encode(), *[a if isinstance(a, bytes) else a.encode()
                                                                  for a in args]],
                                cwd=repo, env=environment(), input=stdin, capture_output=True, timeout=300, check=False)
        errors = [line for line in result.stderr.decode().splitlines() if line.startswith("error: ")]
        assert result.returncode == 1 and errors[0].startswith(expected) and len(errors) == 1, result.stderr


@pytest.mark.slow
def test_the_projects_own_export_imports_and_the_default_fine_tune_trains_its_role_tokens(copy_built):
    """models/hf ends sequences with its end-of-turn token <|end|>: chat_tokens (the default method) trains the role
    tokens, never the end-of-document row."""
    from safetensors.torch import load_file

    repo = copy_built()
    shutil.copytree(repo / "models/hf", repo / "base_models/own")
    dvc(repo, "exp", "run", "finetune", "-S", "base_model=hf", "-S", "base_model.path=base_models/own",
        "-S", "finetune.method=chat_tokens")
    specials = json.loads((repo / "models/tokenizer/special_tokens.json").read_text())
    vocabulary = json.loads((repo / "models/tokenizer/tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocabulary}
    assert specials["end_of_document"] == specials["end_of_turn"] == "<|end|>"
    before = load_file(repo / "models/pretrained/model.safetensors")["model.embed_tokens.weight"]
    after = load_file(repo / "models/finetuned/model.safetensors")["model.embed_tokens.weight"]
    changed = set((before != after).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= {ids["<|system|>"], ids["<|user|>"], ids["<|assistant|>"]}  # <|end|> stays


def test_the_launcher_prints_the_line_that_names_the_cause(tmp_path):
    """Of its processes' lines, a refusal comes before a crash, a crash before a process the launcher then stopped."""
    from llmpipe.runner.guard import collected_error

    (tmp_path / "rank-00000").write_text("stopped\npretrain: stopped by SIGTERM")
    (tmp_path / "rank-00001").write_text("failed\npretrain: RuntimeError: boom (traceback in logs/pretrain-rank1.log)")
    assert collected_error(tmp_path) == ("failed",
                                         "pretrain: RuntimeError: boom (traceback in logs/pretrain-rank1.log)")
    (tmp_path / "rank-00002").write_text("refused\nparams.yaml: pretrain.warmup_steps: expected an integer >= 0")
    assert collected_error(tmp_path)[0] == "refused"
    assert collected_error(tmp_path / "none") is None
