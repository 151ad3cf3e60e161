"""Bad input through the real stage scripts: one line on stderr naming what is wrong, exit status 1,
and the previous outputs left as they were."""

import hashlib
import sys

import pytest
from conftest import run
from test_pipeline import edit_params


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
    ("rows.jsonl", b'{"text": "fine"}\n{"text": \n', "error: user_data/rows.jsonl:2: not valid JSON"),
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
    assert fail(repo, "pretrain") == "error: params.yaml: pretrain.learning_rate: expected a number > 0, got -1.0 (float)"


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


def test_tampered_gguf_file_is_refused_by_evaluate(repo):
    gguf_file = next((repo / "models/gguf").glob("*-Q4_0.gguf"))
    data = bytearray(gguf_file.read_bytes())
    gguf_file.write_bytes(bytes(data[: len(data) - 5000]))
    message = fail(repo, "evaluate")
    assert message.startswith(f"error: models/gguf/{gguf_file.name}")
