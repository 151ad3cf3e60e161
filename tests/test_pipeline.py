"""End to end: the real pipeline (`dvc repro`, `dvc exp run`) on a tiny configuration in a temporary copy."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import (
    BIN,
    OUTPUT_FILES,
    STAGES,
    dvc,
    edit_params,
    environment,
    kill_at_first_checkpoint,
    md5,
    mlflow_runs,
    ran,
    run,
)


def test_repro_runs_every_stage_then_nothing(built_repo):
    first = (built_repo.parent / "first_repro.log").read_text()
    assert ran(first) == STAGES
    second = dvc(built_repo, "repro")
    assert ran(second.stdout) == [] and "Stage 'evaluate' didn't change, skipping" in second.stdout
    for name in OUTPUT_FILES + ["reports/pretrain/metrics.json", "reports/pretrain/train_curve.csv"]:
        assert (built_repo / name).is_file(), name
    metrics = yaml.safe_load((built_repo / "reports/pretrain/metrics.json").read_text())  # what DVC compares
    assert set(metrics) == {"val_bpb"} and 0 < metrics["val_bpb"]
    details = yaml.safe_load((built_repo / "reports/pretrain/details.json").read_text())  # every number
    assert details["steps"] == 6 and details["parameters"] > 0 and details["val_bpb"] == metrics["val_bpb"]
    assert 0 < details["unigram_bpb"] and 0 < details["val_loss"]
    timings = yaml.safe_load((built_repo / "reports/pretrain/timings.json").read_text())  # machine noise: no metric
    assert timings["tokens_per_second"] > 0 and "model_flops_utilization" in timings


def test_each_stage_is_one_mlflow_run_with_params_tags_and_a_shared_parent(built_repo):
    client, runs = mlflow_runs(built_repo)
    stage_runs = {r.info.run_name: r for r in runs if r.data.tags.get("llmpipe.kind") == "stage"}
    assert set(stage_runs) == set(STAGES)
    parents = {r.data.tags["mlflow.parentRunId"] for r in stage_runs.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["llmpipe.kind"] == "pipeline"
    # The pipeline run is what two executions are compared by: the whole config, headline metrics, a real
    # duration spanning the stages, and their final status.
    assert parent.data.params["pretrain.learning_rate"] == "0.003" and parent.data.params["model.n_layer"] == "1"
    assert set(parent.data.metrics) == {"train_tokenizer.chars_per_token", "pretrain.val_bpb", "finetune.heldout_acc",
                                        "finetune.tuned_acc", "evaluate.Q4_K", "evaluate.Q2_K"}  # the DVC metrics
    assert parent.data.metrics["pretrain.val_bpb"] == stage_runs["pretrain"].data.metrics["val_bpb"]
    assert parent.data.tags["llmpipe.stages_ran"] == ",".join(STAGES) and parent.data.tags["llmpipe.stages_cached"] == ""
    assert parent.data.params["model.vocab_size"] == "300"  # null in params.yaml: the value pretrain used
    assert "None" not in parent.data.params.values()
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= max(r.info.end_time for r in stage_runs.values()) > parent.info.start_time
    tokenizer_run = stage_runs["train_tokenizer"]
    assert tokenizer_run.data.params["tokenizer.vocab_size"] == "300"
    assert "model.n_layer" not in tokenizer_run.data.params  # only the declared params
    assert tokenizer_run.data.tags["dvc.stage"] == "train_tokenizer"
    assert len(tokenizer_run.data.tags["mlflow.source.git.commit"]) == 40
    assert tokenizer_run.data.tags["input.md5.data/prepared/pretrain_train.jsonl"] == md5(
        built_repo / "data/prepared/pretrain_train.jsonl")
    assert "validation_characters_per_token" in tokenizer_run.data.metrics
    curve = client.get_metric_history(stage_runs["pretrain"].info.run_id, "train_loss")
    assert sorted(m.step for m in curve) == [1, 2, 3, 4, 5, 6]
    pretrain_run = stage_runs["pretrain"]
    assert pretrain_run.data.params["steps"] == "6" and int(pretrain_run.data.params["parameters"]) > 0  # not metrics
    assert "parameters" not in pretrain_run.data.metrics
    assert {"reports/train_curve.csv", "reports/metrics.json"} <= {
        a.path for a in client.list_artifacts(pretrain_run.info.run_id, "reports")}
    assert [d.dataset.name for d in pretrain_run.inputs.dataset_inputs] == ["data/inputs/base_model.json", "data/tokens"]
    artifacts = {a.path for a in client.list_artifacts(tokenizer_run.info.run_id)}
    assert {"tokenizer", "tokenizer.md"} <= artifacts
    assert all(r.info.status == "FINISHED" for r in stage_runs.values())


def test_tokenize_only_change_reruns_only_tokenize(copy_built):
    repo = copy_built()
    edit_params(repo, tokenize__batch_size=7)
    status = dvc(repo, "status").stdout
    assert "tokenize:" in status and "prepare:" not in status and "train_tokenizer:" not in status
    output = dvc(repo, "repro").stdout
    # The token files come out identical, so pretrain is not rerun either.
    assert ran(output) == ["tokenize"]


def test_exp_run_with_other_vocab_size_reruns_tokenizer_and_downstream_only(copy_built):
    repo = copy_built()
    output = dvc(repo, "exp", "run", "-S", "tokenizer.vocab_size=320").stdout
    assert ran(output) == ["train_tokenizer", "tokenize", "pretrain", "finetune", "quantize", "evaluate"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["tokenizer"]["vocab_size"] == 320
    assert '"vocab_size": 320' in (repo / "data/tokens/meta.json").read_text()


def test_finetune_only_change_reruns_finetune_and_downstream_only(copy_built):
    repo = copy_built()
    assert (repo / "models/finetuned/adapter/adapter_model.safetensors").is_file()  # the tiny config fine-tunes with LoRA
    output = dvc(repo, "exp", "run", "-S", "finetune.method=full").stdout
    assert ran(output) == ["finetune", "quantize", "evaluate"]
    assert not (repo / "models/finetuned/adapter/adapter_model.safetensors").exists()
    metrics = yaml.safe_load((repo / "reports/finetune/metrics.json").read_text())
    details = yaml.safe_load((repo / "reports/finetune/details.json").read_text())
    assert set(metrics) == {"heldout_acc", "tuned_acc"}
    for key in ("qa_accuracy_heldout_people", "qa_accuracy_heldout_people_birth_city", "base_qa_accuracy_heldout_people",
                "duplicate_examples", "truncated_examples", "best_step", "val_answer_loss"):
        assert key in details, key


def test_the_hugging_face_export_and_the_model_share_one_weights_file(built_repo):
    """The export's weights are the fine-tuned model's file, byte for byte (a hard link): DVC caches them once."""
    finetuned, exported = built_repo / "models/finetuned/model.safetensors", built_repo / "models/hf/model.safetensors"
    assert md5(finetuned) == md5(exported)


def test_chat_tokens_finetune_changes_only_the_chat_templates_token_rows(copy_built):
    from safetensors.torch import load_file

    from llmpipe.text.chat_template import ChatTemplate
    from llmpipe.text.tokenizer import LoadedTokenizer
    from llmpipe.train.chat_tokens import chat_token_ids

    repo = copy_built()
    output = dvc(repo, "exp", "run", "-S", "finetune.method=chat_tokens", "-S", "finetune.learning_rate=0.01",
                 "finetune").stdout
    assert ran(output) == ["finetune"] and "finetune: chat_tokens" in output
    tokenizer = LoadedTokenizer(repo / "models/tokenizer")
    chat_ids = set(chat_token_ids(ChatTemplate(tokenizer)))
    assert tokenizer.end_of_document_id not in chat_ids and len(chat_ids) == len(tokenizer.special_ids) - 1
    pretrained = load_file(repo / "models/pretrained/model.safetensors")
    finetuned = load_file(repo / "models/finetuned/model.safetensors")
    assert set(finetuned) == set(pretrained)
    for name, tensor in pretrained.items():
        changed_rows = (finetuned[name] != tensor).reshape(len(tensor), -1).any(dim=1).nonzero().flatten().tolist()
        if name == "model.embed_tokens.weight":  # tied: also the output head
            assert changed_rows and set(changed_rows) <= chat_ids
        else:
            assert not changed_rows, name


def test_report_has_every_section_filled_with_numbers(built_repo):
    report = (built_repo / "reports/report.md").read_text()
    for heading in ("## Training in numbers", "## Every variant", "## What quantization costs, measured", "## Plots",
                    "## Tokenization", "## Attention", "## Sample answers"):
        assert heading in report, heading
    for variant in ("| base |", "| finetuned |", "| F16 |", "| Q8_0 |", "| Q4_0 |", "| Q4_1 |", "| Q4_K |", "| Q2_K |"):
        assert variant in report, variant
    assert "nan" not in report.lower() and "| – |" not in report and "TODO" not in report
    assert "Validation loss was lowest" in report and "held-out people (known from pretraining only" in report
    assert "## Where this report came from" in report and "- git commit: `" in report
    for image in ("loss_curves", "size_vs_quality", "tokenization", "attention"):
        png = built_repo / "reports/figures" / f"{image}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with open(built_repo / "reports/evaluate/variants.csv") as handle:
        variants = {row["variant"]: row for row in csv.DictReader(handle)}
    assert float(variants["finetuned"]["kl_divergence"]) == 0.0 and float(variants["Q2_K"]["kl_divergence"]) > 0
    assert float(variants["Q4_0"]["bits_per_weight"]) == pytest.approx(4.5, abs=0.2)
    metrics = yaml.safe_load((built_repo / "reports/evaluate/metrics.json").read_text())  # the headline only
    assert metrics == {v: float(variants[v]["qa_accuracy_heldout_people"]) for v in ("Q4_K", "Q2_K")}
    plots = json.loads(dvc(built_repo, "plots", "show", "--json").stdout)["data"]
    for name in ("pretrain_loss", "reports/finetune/eval_curve.csv", "size_vs_perplexity", "reports/evaluate/variants.csv"):
        assert plots[name][0]["content"]["data"]["values"], name


def test_quantize_writes_each_variant_in_its_own_format_with_its_bits_per_weight(built_repo):
    # The test model's rows are 256 wide (like the default's), so every format applies to every matrix;
    # by default (quantize.embeddings) Q2_K keeps the tied embeddings / output head at Q4_K.
    sizes = json.loads((built_repo / "reports/quantize/sizes.json").read_text())["variants"]
    manifest = json.loads((built_repo / "models/gguf/manifest.json").read_text())
    for variant, bits in {"F16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q2_K": 2.625}.items():
        types = manifest[f"llmpipe-{variant}.gguf"]
        embeddings = types.pop("token_embd.weight")
        assert embeddings == ("Q4_K" if variant == "Q2_K" else variant)
        assert {t for name, t in types.items() if not name.endswith("norm.weight")} == {variant}, variant
        most = 4.5 if variant == "Q2_K" else bits
        assert bits < sizes[variant]["bits_per_weight"] < most + 0.1, variant  # + the F32 norms
        assert sizes[variant]["file_bytes"] == (built_repo / f"models/gguf/llmpipe-{variant}.gguf").stat().st_size


def test_evaluate_only_change_reruns_only_evaluate_and_registers_no_new_version(copy_built):
    """One `dvc exp run` of an evaluate-only change: only evaluate reruns, DVC compares its params and metrics,
    and the same weights keep their registered version."""
    repo = copy_built()
    client, _ = mlflow_runs(repo)
    [version] = client.search_model_versions("name = 'llmpipe-chat'")
    assert version.tags["weights_md5"] and float(version.tags["metric.qa_accuracy_heldout_people"]) >= 0
    assert client.get_model_version_by_alias("llmpipe-chat", "champion").version == version.version
    assert version.tags["alias"] == "champion" and version.tags["source"] == "workspace"
    output = dvc(repo, "exp", "run", "-S", "evaluate.sample_answers=1").stdout
    assert ran(output) == ["evaluate"] and f"unchanged weights, kept llmpipe-chat version {version.version}" in output
    assert len(client.search_model_versions("name = 'llmpipe-chat'")) == 1
    assert "evaluate.sample_answers" in dvc(repo, "params", "diff").stdout
    diff = dvc(repo, "metrics", "diff", "--json").stdout
    assert diff.strip().startswith("{")


def test_registered_model_loads_in_a_fresh_process_and_answers(built_repo):
    code = ("import json, mlflow; mlflow.set_tracking_uri('sqlite:///.mlflow/mlflow.db'); "
            "model = mlflow.pyfunc.load_model('models:/llmpipe-chat/latest'); "
            "print(json.dumps(model.predict({'messages': [{'role': 'user', 'content': 'What is the birth city of Ada?'}], "
            "'max_tokens': 4, 'temperature': 0.0})))")
    answer = json.loads(run([sys.executable, "-c", code], built_repo).stdout.strip().splitlines()[-1])
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert answer["usage"]["completion_tokens"] <= 4


def test_chat_runs_one_shot_and_interactive(built_repo):
    # The tiny test model may answer with nothing at all; what it answers is checked in test_finetune.py.
    one_shot = run([str(BIN / "llmpipe"), "chat", "What is the birth city of Ada?", "--max-new-tokens", "4"], built_repo)
    assert one_shot.stdout.endswith("\n")
    session = subprocess.run([str(BIN / "llmpipe"), "chat", "--max-new-tokens", "4"], cwd=built_repo, env=environment(),
                             input="Who?\nWhere?\n\n", capture_output=True, text=True, timeout=120)
    assert session.returncode == 0 and session.stdout.count("model> ") == 2


def test_temp_experiment_runs_are_kept_in_the_repository_store(copy_built):
    repo = copy_built()
    # A fine-tuning change: new weights (so a new registered version) from the three last stages only.
    dvc(repo, "exp", "run", "--temp", "-n", "slower", "-S", "finetune.learning_rate=0.002")
    client, runs = mlflow_runs(repo)
    experiment_runs = [r for r in runs if r.data.tags.get("dvc.experiment") == "slower"]
    names = {r.info.run_name for r in experiment_runs}
    assert "finetune" in names and any(n.startswith("pipeline slower") for n in names)
    finetune = next(r for r in experiment_runs if r.info.run_name == "finetune")
    assert finetune.data.params["finetune.learning_rate"] == "0.002"
    # Artifacts too: next to the database, not in ./mlruns of DVC's temporary working copy.
    assert "/.mlflow/artifacts/" in finetune.info.artifact_uri and client.list_artifacts(finetune.info.run_id)
    assert not (repo / "mlruns").exists()
    assert "slower" in dvc(repo, "exp", "show", "--csv").stdout
    # Its model is registered, but a --temp experiment never applied does not take the alias (llmpipe.serve.alias).
    versions = {str(v.version): v for v in client.search_model_versions("name = 'llmpipe-chat'")}
    assert versions["2"].tags["source"] == "temporary copy" and "alias" not in versions["2"].tags
    assert str(client.get_model_version_by_alias("llmpipe-chat", "champion").version) == "1"


def test_same_params_give_byte_identical_outputs(copy_built, built_repo):
    repo = copy_built()
    # Every stage whose outputs are compared, forced; evaluate writes only reports, which may carry timings.
    assert ran(dvc(repo, "repro", "--force", "quantize").stdout) == STAGES[:-1]
    for name in OUTPUT_FILES:
        assert md5(repo / name) == md5(built_repo / name), name
    # Every data and model output as DVC hashes it (only reports may carry timings): a rerun that
    # reproduces a stage's output bit for bit leaves its downstream stages cached.
    def output_hashes(root: Path) -> dict[str, str]:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
                if not out["path"].startswith("reports/")}
    assert output_hashes(repo) == output_hashes(built_repo)


def test_next_token_and_generate_commands_use_the_pipeline_model(built_repo):
    output = run([str(BIN / "llmpipe"), "next-token", "The", "--top-k", "3"], built_repo).stdout
    lines = [line for line in output.splitlines() if "%" in line]
    assert len(lines) == 3
    assert sum(float(line.split("%")[0]) for line in lines) <= 100.01
    generated = run([str(BIN / "llmpipe"), "generate", "The", "--max-new-tokens", "5"], built_repo).stdout
    assert generated.startswith("The")


def test_sigkill_during_pretrain_then_rerun_resumes_to_identical_weights(copy_built):
    repo = copy_built()
    edit_params(repo, pretrain__max_steps=80, pretrain__checkpoint_every=10, pretrain__eval_every=40)
    run([sys.executable, "stages/pretrain.py"], repo)
    uninterrupted = md5(repo / "models/pretrained/model.safetensors")
    subprocess.run(["rm", "-rf", "models/pretrained"], cwd=repo, check=True)

    kill_at_first_checkpoint(repo, "pretrain")
    assert not (repo / "models/pretrained").exists()  # nothing half-written where DVC would look

    output = dvc(repo, "repro", "pretrain").stdout
    assert "resuming from checkpoint" in output
    assert md5(repo / "models/pretrained/model.safetensors") == uninterrupted
    assert not list((repo / "checkpoints/pretrain").glob("*/step-*"))  # cleared after success


def test_two_process_ddp_matches_one_process(copy_built, built_repo):
    repo = copy_built()
    edit_params(repo, pretrain__processes=2)
    output = dvc(repo, "repro", "pretrain").stdout
    assert "2 process(es)" in output

    def losses(root):
        lines = (root / "reports/pretrain/train_curve.csv").read_text().splitlines()
        column = lines[0].split(",").index("train_loss")
        return [float(line.split(",")[column]) for line in lines[1:]]

    single, double = losses(built_repo), losses(repo)
    assert len(single) == len(double) == 6
    assert double == pytest.approx(single, rel=1e-4)


def test_large_model_settings_bound_the_measurements_and_store_the_registered_weights_once(copy_built):
    """The large-model settings (docs/scaling.md, "A 1B model through every stage"): questions and validation examples
    bounded (the first N, recorded), no base-model measurement, and a registered model that names its weights in
    DVC's cache instead of holding a copy."""
    repo = copy_built()
    output = dvc(repo, "exp", "run", "-S", "finetune.max_questions_per_split=3", "-S", "finetune.measure_base=false",
                 "-S", "finetune.max_validation_examples=2", "-S", "evaluate.max_questions_per_split=4",
                 "-S", "evaluate.measure_base=false", "-S", "evaluate.registry_weights=dvc_cache",
                 "-S", "evaluate.registered_model_name=llmpipe-chat-once", "-S", "finetune.pad_prompts=true",
                 "-S", "evaluate.pad_prompts=true").stdout
    assert {"finetune", "evaluate"} <= set(ran(output))  # quantize too when the best step's weights changed
    details = json.loads((repo / "reports/finetune/details.json").read_text())
    assert {details[f"qa_questions_{split}"] for split in ("finetuned_people", "heldout_people")} == {3}
    assert details["validation_examples_measured"] <= 2 and not [key for key in details if key.startswith("base_")]
    assert "(not measured)" in (repo / "reports/finetune/samples.md").read_text()
    with open(repo / "reports/evaluate/variants.csv") as handle:
        assert "base" not in [row["variant"] for row in csv.DictReader(handle)]
    assert "finetuned_people 4, heldout_people 4" in (repo / "reports/report.md").read_text()

    client, _ = mlflow_runs(repo)
    [version] = client.search_model_versions("name = 'llmpipe-chat-once'")
    assert version.tags["weights_storage"] == "dvc_cache"
    code = ("import json, mlflow, pathlib; mlflow.set_tracking_uri('sqlite:///.mlflow/mlflow.db'); "
            "logged = pathlib.Path(mlflow.artifacts.download_artifacts('models:/llmpipe-chat-once/latest')); "
            "print(json.dumps(sorted(p.name for p in logged.rglob('*')))); "
            "print(json.loads(next(logged.rglob('weights.json')).read_text())['md5']); "
            "model = mlflow.pyfunc.load_model('models:/llmpipe-chat-once/latest'); "
            "print(json.dumps(model.predict({'messages': [{'role': 'user', 'content': 'Who?'}], 'max_tokens': 2, "
            "'temperature': 0.0})))")
    files, digest, answer = run([sys.executable, "-c", code], repo).stdout.strip().splitlines()[-3:]
    assert "weights.json" in json.loads(files) and "model.safetensors" not in json.loads(files)
    assert digest == md5(repo / "models/finetuned/model.safetensors")  # DVC's cache holds it under that name
    answer = json.loads(answer)
    assert answer["usage"]["completion_tokens"] <= 2
