"""Bad input through the real stage scripts: one line on stderr naming what is wrong, exit status 1,
and the previous outputs left as they were."""

import hashlib
import io
import json
import shutil
import struct
import sys

import pytest
from harness import BIN, dvc, edit_params, mlflow_runs, run
from small_inputs import train_test_tokenizer


def tree_digest(path):
    digest = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def fail(repo, script):
    result = run([sys.executable, f"stages/{script}.py"], repo, check=False)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture
def repo(copy_built):
    return copy_built()


def user_files(repo, name, content: bytes):
    (repo / "user_data" / name).write_bytes(content)
    edit_params(repo, data={"source": "local_files", "paths": [f"user_data/{name}"], "text_column": "text",
                            "txt_sample_by": "paragraph", "validation_fraction": 0.1, "finetune_train": None,
                            "finetune_validation": None, "finetune_validation_fraction": 0.1})


@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", b"\n\n  \n", "error: data.paths: the corpus is empty"),
    ("bad.txt", b"good line\n\nbad \xff\xfe line\n", "error: user_data/bad.txt:3: not valid UTF-8"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": \n',
     "error: user_data/rows.jsonl:2: not valid JSON (Expecting value at column 9)"),
    ("blank.jsonl", b"\n\n", "error: user_data/blank.jsonl: no JSON records"),
    ("zero.txt", b"", "error: user_data/zero.txt: empty file (0 bytes)"),
    ("rows.jsonl", b'{"text": "fine"}\n{"body": "x"}\n', "error: user_data/rows.jsonl:2: expected an object with a string field 'text'"),
])
def test_prepare_refuses_bad_user_data_and_keeps_the_old_output(repo, name, content, expected):
    before = tree_digest(repo / "data/prepared")
    user_files(repo, name, content)
    assert fail(repo, "prepare").startswith(expected)
    assert tree_digest(repo / "data/prepared") == before


def test_missing_user_file_and_unknown_source(repo):
    edit_params(repo, data={"source": "local_files", "paths": ["user_data/none*.txt"], "text_column": "text",
                            "txt_sample_by": "paragraph", "validation_fraction": 0.1, "finetune_train": None,
                            "finetune_validation": None, "finetune_validation_fraction": 0.1})
    assert fail(repo, "prepare") == "error: data.paths: no file matches 'user_data/none*.txt'"
    edit_params(repo, data__source="ftp")
    assert fail(repo, "prepare") == ("error: params.yaml: data.source: expected one of embedded, local_files, "
                                     "hf_dataset, got 'ftp' (str)")


def test_bad_finetune_file_is_named_with_its_line(repo):
    (repo / "user_data" / "corpus.txt").write_text("Some text.\n\nMore text.\n")
    (repo / "user_data" / "ft.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n')
    edit_params(repo, data={"source": "local_files", "paths": ["user_data/corpus.txt"], "text_column": "text",
                            "txt_sample_by": "paragraph", "validation_fraction": 0.1,
                            "finetune_train": "user_data/ft.jsonl", "finetune_validation": None,
                            "finetune_validation_fraction": 0.1})
    assert fail(repo, "prepare") == "error: user_data/ft.jsonl:2: 'prompt' and 'completion' must both be strings"


def test_vocabulary_smaller_than_bytes_plus_specials(repo):
    before = tree_digest(repo / "models/tokenizer")
    edit_params(repo, tokenizer__vocab_size=200)
    assert fail(repo, "train_tokenizer") == ("error: params.yaml: tokenizer.vocab_size: expected at least 261 "
                                             "(256 byte tokens + 5 special tokens), got 200")
    assert tree_digest(repo / "models/tokenizer") == before


def test_wrong_type_in_params(repo):
    edit_params(repo, tokenize__num_proc="two")
    assert fail(repo, "tokenize_text") == "error: params.yaml: tokenize.num_proc: expected an integer >= 1, got 'two' (str)"
    edit_params(repo, tokenize__num_proc=1, pretrain__learning_rate=-1)
    assert fail(repo, "pretrain") == ("error: params.yaml: pretrain.learning_rate: expected a number > 0 and <= 10.0, "
                                      "got -1.0 (float)")
    _, runs = mlflow_runs(repo)
    assert len(runs) == 8  # the build's 7 stage runs and their pipeline run: settings refused by hand record no run


def test_missing_upstream_output(repo):
    import shutil

    shutil.rmtree(repo / "data/tokens")
    assert fail(repo, "pretrain") == ("error: data/tokens/meta.json: not found; run the tokenize stage first "
                                      "(dvc repro tokenize)")


def test_truncated_weights_file_is_refused(repo):
    weights = repo / "models/pretrained/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = fail(repo, "finetune")
    assert message.startswith("error: models/pretrained/model.safetensors: not a readable safetensors file")


def test_weights_that_do_not_match_the_config_are_refused(repo):
    import json

    config_path = repo / "models/pretrained/config.json"
    config = json.loads(config_path.read_text())
    config["model"]["ffn_hidden"] += 8
    config_path.write_text(json.dumps(config))
    message = fail(repo, "finetune")
    assert message.startswith("error: models/pretrained/model.safetensors: tensor layers.0.mlp.") and "the config needs" in message


def test_tampered_gguf_file_is_refused_by_evaluate_before_any_measurement(repo):
    gguf_file = next((repo / "models/gguf").glob("*-Q4_0.gguf"))
    data = bytearray(gguf_file.read_bytes())
    gguf_file.write_bytes(bytes(data[: len(data) - 5000]))
    message = fail(repo, "evaluate")
    assert message.startswith(f"error: models/gguf/{gguf_file.name}")
    gguf_file.write_bytes(b"")
    result = run([sys.executable, "stages/evaluate.py"], repo, check=False)
    assert f"error: models/gguf/{gguf_file.name}: not a readable GGUF file" in result.stderr
    assert "evaluate: base:" not in result.stdout  # inputs checked before the other variants are measured


def parquet_bytes(values) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": values}), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("values, expected", [
    (["a document", None, "another"], "error: user_data/rows.parquet: row 2: 'text' (data.text_column) is null"),
    ([1, 2, 3], "error: user_data/rows.parquet: column 'text' (data.text_column) holds int64, expected strings"),
])
def test_parquet_columns_are_checked_per_file_like_jsonl_lines(repo, values, expected):
    before = tree_digest(repo / "data/prepared")
    (repo / "user_data" / "good.parquet").write_bytes(parquet_bytes(["good text"]))
    user_files(repo, "rows.parquet", parquet_bytes(values))
    edit_params(repo, data__paths=["user_data/good.parquet", "user_data/rows.parquet"])
    assert fail(repo, "prepare").startswith(expected)
    assert tree_digest(repo / "data/prepared") == before


def test_unknown_key_under_a_declared_section_names_the_closest_known_one(repo):
    edit_params(repo, pretrain__learning_rat=0.001)
    assert fail(repo, "pretrain") == ("error: params.yaml: pretrain.learning_rat: unknown key (conf/ declares no such "
                                      "key); did you mean pretrain.learning_rate?")


def test_head_count_that_does_not_divide_the_width_is_refused_where_the_model_is_read(repo):
    before = tree_digest(repo / "models/pretrained")
    edit_params(repo, model__n_head=6, model__n_kv_head=2)
    assert fail(repo, "pretrain") == ("error: params.yaml: model: d_model (256) is not a multiple of n_head (6): "
                                      "choose n_head among its divisors, or set head_dim explicitly")
    assert tree_digest(repo / "models/pretrained") == before


def other_tokenizer(repo, vocab_size):
    """A tokenizer trained on other text, put where the pipeline's tokenizer was."""
    shutil.rmtree(repo / "models/tokenizer")
    train_test_tokenizer(repo / "models/tokenizer", vocab_size)


@pytest.mark.parametrize("stage, vocab_size, model, output", [
    ("finetune", 300, "models/pretrained", "models/finetuned"), ("finetune", 600, "models/pretrained", "models/finetuned"),
    ("quantize", 300, "models/finetuned", "models/gguf"), ("evaluate", 300, "models/pretrained", "reports/figures"),
])
def test_a_tokenizer_that_does_not_belong_to_the_model_is_refused(repo, stage, vocab_size, model, output):
    before = tree_digest(repo / output)
    other_tokenizer(repo, vocab_size)  # 300 is the tiny pipeline's size: same size, other merges
    message = fail(repo, stage)
    assert message.startswith(f"error: {model} does not match models/tokenizer: the model was trained with tokenizer ")
    assert tree_digest(repo / output) == before


def test_a_gguf_file_whose_token_list_is_not_the_tokenizer_is_refused(repo):
    other_tokenizer(repo, 300)
    gguf_file = next(str(p.relative_to(repo)) for p in (repo / "models/gguf").glob("*-Q8_0.gguf"))
    code, message = cli(repo, "chat", "Who?", "--model", gguf_file)
    assert code == 1 and message.startswith(f"error: {gguf_file} does not match models/tokenizer: its token list")


def test_a_misaligned_tensor_offset_in_a_gguf_file_is_refused(repo):
    import gguf

    path = next((repo / "models/gguf").glob("*-Q4_0.gguf"))
    tensor = gguf.GGUFReader(str(path)).tensors[3]
    position = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:-1])  # its data offset
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, position, struct.unpack_from("<Q", data, position)[0] + 144)
    path.write_bytes(bytes(data))
    before = tree_digest(repo / "reports/figures")
    assert fail(repo, "evaluate") == (f"error: models/gguf/{path.name}: tensor {tensor.name} starts at byte "
                                      f"{tensor.data_offset + 144}, not on the file's 32-byte alignment (a corrupted "
                                      "or hand-edited file)")
    assert tree_digest(repo / "reports/figures") == before


def cli(repo, *args, cwd=None):
    result = run([str(BIN / "llmpipe"), *args], cwd or repo, check=False, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.returncode, errors[0]


def test_command_line_refuses_bad_options_and_prompts_in_one_line(repo, tmp_path):
    assert cli(repo, "chat", "") == (1, "error: the question is empty (or only white space); omit it for an "
                                        "interactive chat")
    assert cli(repo, "generate", "   ") == (1, "error: the prompt is empty (or only white space)")
    for option, value, expected in [("--top-p", "0", "a number > 0.0 and <= 1.0"), ("--top-k", "-1", "an integer >= 0"),
                                    ("--max-new-tokens", "-1", "an integer >= 1"),
                                    ("--temperature", "-1", "a number >= 0.0"), ("--top-p", "x", "a number > 0.0")]:
        code, message = cli(repo, "generate", "Hello", option, value)
        assert code == 2 and message.startswith(f"error: llmpipe generate: argument {option}: expected {expected}")
    assert cli(repo, "model-size", "model.n_head=7")[1].startswith(
        "error: conf/ with model.n_head=7: model: d_model (256) is not a multiple of n_head (7)")
    assert cli(repo, "chat", "Who?", "--tokenizer", "elsewhere") == (
        1, "error: --tokenizer elsewhere: no such file or directory")
    assert cli(repo, "chat", "Who?", cwd=tmp_path) == (
        1, "error: --tokenizer models/tokenizer: not found; run llmpipe from the repository root after `dvc repro`, "
           "or pass --tokenizer")
    assert cli(repo, "chat", "Who?", "--model", "params.yaml")[1].startswith("error: params.yaml: not a model the pipeline writes")


def test_chat_reads_every_model_form_the_pipeline_writes_and_fits_long_prompts(repo):
    question = json.loads((repo / "data/prepared/qa_finetuned_people.jsonl").read_text().splitlines()[0])["question"]
    answers = [run([str(BIN / "llmpipe"), "chat", question, "--model", model, "--max-new-tokens", "6"], repo).stdout
               for model in ("models/finetuned", "models/hf")]
    assert answers[0] == answers[1]  # the Hugging Face export holds the same weights
    gguf_file = next(str(p.relative_to(repo)) for p in (repo / "models/gguf").glob("*-F16.gguf"))
    run([str(BIN / "llmpipe"), "chat", question, "--model", gguf_file, "--max-new-tokens", "6"], repo)
    long = run([str(BIN / "llmpipe"), "chat", "word " * 3000 + question, "--max-new-tokens", "6"], repo)
    assert "note: the question is" in long.stderr and "so only its last 26 are used" in long.stderr


def test_a_fine_tuning_example_longer_than_the_context_is_cut_and_counted_never_a_crash(repo):
    (repo / "user_data" / "corpus.txt").write_text("\n\n".join(
        f"Person {i} lives in city {i % 5} and works at company {i % 3}." for i in range(300)))
    rows = [{"prompt": f"Where does person {i} live?", "completion": f"city {i % 5}"} for i in range(20)]
    rows.append({"prompt": "word " * 40000 + "Where does person 1 live?", "completion": "city 1"})  # ~40,000 tokens
    (repo / "user_data" / "ft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    edit_params(repo, data={"source": "local_files", "paths": ["user_data/corpus.txt"], "text_column": "text",
                            "txt_sample_by": "paragraph", "validation_fraction": 0.1,
                            "finetune_train": "user_data/ft.jsonl", "finetune_validation": None,
                            "finetune_validation_fraction": 0.1})
    dvc(repo, "repro")  # to the end: evaluate and its report work on your own data (no held-out people)
    details = json.loads((repo / "reports/finetune/details.json").read_text())
    assert details["truncated_examples"] == 1 and "– where there is no such set" in (repo / "reports/report.md").read_text()
    assert sum(value for key, value in details.items() if key.endswith("_questions_cut_to_fit")) >= 1


def test_refused_input_under_dvc_repro_and_exp_run_keeps_every_previous_output(repo):
    outputs = ("data/prepared", "models/pretrained", "reports/pretrain")
    before = {path: tree_digest(repo / path) for path in outputs}
    user_files(repo, "bad.txt", b"good line\n\nbad \xff line\n")
    result = dvc(repo, "repro", check=False)  # DVC deletes data/prepared before prepare refuses the file
    assert result.returncode != 0 and "error: user_data/bad.txt:3: not valid UTF-8" in result.stderr + result.stdout

    _, runs = mlflow_runs(repo)
    latest = max((r for r in runs if r.data.tags.get("llmpipe.kind") == "pipeline"), key=lambda r: r.info.start_time)
    assert latest.info.status == "FAILED"  # the pipeline run shows its stage failed
    run(["git", "checkout", "params.yaml"], repo)
    result = dvc(repo, "exp", "run", "-S", "pretrain.learning_rate=-1", check=False)
    assert result.returncode != 0 and "pretrain.learning_rate: expected a number > 0" in result.stderr + result.stdout
    _, runs = mlflow_runs(repo)
    refused = max((r for r in runs if r.info.run_name == "pretrain"), key=lambda r: r.info.start_time)
    assert refused.info.status == "FAILED"  # under DVC, settings refused before the run opens are a FAILED run too
    assert {path: tree_digest(repo / path) for path in outputs} == before
    assert run(["git", "status", "--porcelain", "params.yaml"], repo).stdout == ""  # as it was before the experiment
    assert "pretrain" not in dvc(repo, "status").stdout  # the restored outputs are the ones dvc.lock records


@pytest.mark.parametrize("edit, script, expected", [
    (lambda text: text + "pretrain:\n  max_steps: [1,\n", "pretrain", "error: params.yaml:"),
    (lambda text: text.replace("seed: 1337", "seed: ${nope}"), "prepare",
     "error: params.yaml: Interpolation key 'nope' not found"),
    (lambda text: text + "pretrian:\n  max_steps: 5\n", "tokenize_text",
     "error: params.yaml: pretrian: unknown section (conf/ declares no such key); did you mean pretrain?"),
    (lambda text: text.replace("seed: 1337", "seed: -5"), "prepare",
     "error: params.yaml: seed: expected an integer >= 0 and <= 4294967295, got -5 (int)"),
    (lambda text: text.replace("learning_rate: 0.003", "learning_rate: 1.0e+300", 1), "pretrain",
     "error: params.yaml: pretrain.learning_rate: expected a number > 0 and <= 10.0"),
    (lambda text: text.replace("device: auto", "device: cuda", 1), "pretrain",
     "error: params.yaml: pretrain.device: cuda, but this PyTorch sees no CUDA device"),
    (lambda text: text.replace("registry_weights: copy\n  device: auto", "registry_weights: copy\n  device: cuda"),
     "evaluate", "error: params.yaml: evaluate.device: cuda, but this PyTorch sees no CUDA device"),
    (lambda text: text.replace("model_name: llmpipe", "model_name: ../../escaped"), "quantize",
     "error: params.yaml: quantize.model_name: expected a name of letters, digits"),
    (lambda text: text.replace("registered_model_name: llmpipe-chat", "registered_model_name: bad/name:x"), "evaluate",
     "error: params.yaml: evaluate.registered_model_name: expected a name of letters, digits"),
])
def test_params_file_errors_are_one_line_before_any_work(repo, edit, script, expected):
    import torch

    if "cuda" in expected and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    outputs = {path: tree_digest(repo / path) for path in ("models", "reports", "data")}
    params = repo / "params.yaml"
    params.write_text(edit(params.read_text()))
    assert fail(repo, script).startswith(expected)
    assert {path: tree_digest(repo / path) for path in ("models", "reports", "data")} == outputs


@pytest.mark.parametrize("path, content, script, expected", [
    ("data/tokens/meta.json", '{"dtype": "uint16"', "pretrain", "error: data/tokens/meta.json: not the token files' metadata"),
    ("models/tokenizer/special_tokens.json", "[1, 2]", "finetune",
     "error: models/tokenizer/special_tokens.json: expected an object mapping roles"),
    ("models/finetuned/config.json", "[]", "quantize", 'error: models/finetuned/config.json: expected an object with a "model"'),
    ("data/prepared/finetune_train.jsonl", '{"messages": 5}\n', "finetune",
     "error: data/prepared/finetune_train.jsonl:1: 'messages' must be a non-empty list"),
    ("data/prepared/qa_heldout_people.jsonl", '{"question": "Who?", "answ', "evaluate",
     "error: data/prepared/qa_heldout_people.jsonl:1: not a JSON object as the prepare stage writes"),
])
def test_damaged_pipeline_artifacts_are_named_with_the_stage_to_rerun(repo, path, content, script, expected):
    (repo / path).write_text(content)
    assert fail(repo, script).startswith(expected)


@pytest.mark.parametrize("name, content, expected", [
    ("array.json", b'[\n{"text": "a"},\n{"text": "b"}\n]\n', "error: user_data/array.json: a JSON array; local files must be JSON Lines"),
    ("one.txt", b"Only one paragraph here.\n", "error: the corpus has 1 document; at least 2 are needed"),
])
def test_user_files_that_cannot_make_a_corpus_are_refused(repo, name, content, expected):
    user_files(repo, name, content)
    assert fail(repo, "prepare").startswith(expected)


def test_an_export_whose_tokenizer_is_not_the_pipelines_is_refused_by_the_cli(repo):
    other_tokenizer(repo, 300)  # same size as the export's own tokenizer.json, other tokens
    code, message = cli(repo, "chat", "Who?", "--model", "models/hf")
    assert code == 1 and message.startswith("error: models/hf does not match models/tokenizer")
