"""Sharded token files (written streaming, read across shard boundaries) and the tokenizer's bounded sample."""

import json

import numpy as np
import pytest
from small_inputs import train_test_tokenizer

from llmpipe.config import layout
from llmpipe.data.encode import tokenize_corpus
from llmpipe.data.tokens import open_tokens, token_chunks
from llmpipe.errors import InputDataError
from llmpipe.eval.metrics import unigram_bits_per_byte
from llmpipe.report.markdown import tokenizer_report
from llmpipe.text.tokenizer import TextSample, tokenizer_metrics
from llmpipe.train.batches import RandomWindows

TEXTS = {"train": [f"Person {i} was born in city {i % 7} and studied subject {i % 5}." for i in range(60)],
         "validation": [f"Person {i} works at company {i % 3}." for i in range(5)]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Prepared text, a tokenizer, and the corpus tokenized twice: in 100-token shards and in one shard."""
    root = tmp_path_factory.mktemp("corpus")
    tokenizer = train_test_tokenizer(root / "tokenizer", 300)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for split, texts in TEXTS.items():
            layout.PRETRAIN_TEXT[split].parent.mkdir(parents=True, exist_ok=True)
            layout.PRETRAIN_TEXT[split].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        sharded = tokenize_corpus(tokenizer, "uint16", 1, batch_size=7, shard_tokens=100, tokens_dir=root / "sharded")
        tokenize_corpus(tokenizer, "uint16", 1, batch_size=1000, shard_tokens=10**9, tokens_dir=root / "flat")
    return root, tokenizer, sharded


def test_shards_are_fixed_size_and_join_to_the_encoding_of_every_document(corpus):
    root, tokenizer, meta = corpus
    expected = [i for text in TEXTS["train"] for i in tokenizer.encode(text) + [tokenizer.end_of_document_id]]
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) == -(-len(expected) // 100) >= 3
    assert [s["tokens"] for s in shards[:-1]] == [100] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 100
    assert [s["file"] for s in shards] == [f"train/shard-{i:05d}.bin" for i in range(len(shards))]
    joined = np.concatenate([np.fromfile(root / "sharded" / s["file"], dtype="<u2") for s in shards])
    assert joined.tolist() == expected
    flat = json.loads((root / "flat/meta.json").read_text())["splits"]["train"]
    assert len(flat["shards"]) == 1 and np.fromfile(root / "flat" / flat["shards"][0]["file"], "<u2").tolist() == expected
    assert {k: meta["splits"]["train"][k] for k in ("documents", "tokens", "utf8_bytes")} == {
        "documents": 60, "tokens": len(expected), "utf8_bytes": sum(len(t.encode()) for t in TEXTS["train"])}


def test_reads_across_shard_boundaries_equal_the_flat_array(corpus):
    root, _, _ = corpus
    sharded, flat = open_tokens("train", root / "sharded"), open_tokens("train", root / "flat")
    reference = flat[:]
    assert len(sharded) == len(flat) == len(reference)
    for start, stop in [(0, 100), (95, 105), (95, 305), (100, 200), (250, 251), (0, len(reference)), (-30, None),
                        (7, 7), (len(reference) - 3, len(reference) + 50)]:
        assert np.array_equal(sharded[start:stop], reference[start:stop]), (start, stop)
    assert sharded[100] == reference[100] and sharded[-1] == reference[-1]
    assert np.array_equal(np.concatenate(list(token_chunks(sharded, start=1, size=64))), reference[1:])


def test_random_windows_and_unigram_baseline_are_the_same_on_shards(corpus):
    root, tokenizer, meta = corpus
    sharded, flat = open_tokens("train", root / "sharded"), np.fromfile(root / "flat/train/shard-00000.bin", "<u2")
    for step in range(3):
        for (a_in, a_out), (b_in, b_out) in zip(RandomWindows(sharded, 32, 8, 4, seed=3).global_batch(step),
                                                RandomWindows(flat, 32, 8, 4, seed=3).global_batch(step)):
            assert torch_equal(a_in, b_in) and torch_equal(a_out, b_out)
    validation = open_tokens("validation", root / "sharded")
    bytes_ = meta["splits"]["validation"]["utf8_bytes"]
    assert unigram_bits_per_byte(sharded, validation, tokenizer.vocab_size, bytes_) == unigram_bits_per_byte(
        flat, validation[:], tokenizer.vocab_size, bytes_)


def edit_meta(directory, change) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    change(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "train/shard-00001.bin").write_bytes((d / "train/shard-00001.bin").read_bytes()[:-2]),
     "train/shard-00001.bin: missing or not 200 bytes (100 tokens) as meta.json says; rerun the tokenize stage"),
    (lambda d: (d / "train/shard-00002.bin").unlink(), "train/shard-00002.bin: missing or not 200 bytes"),
    (lambda d: edit_meta(d, lambda meta: meta["splits"]["train"]["shards"][0].update(tokens=99)),
     "meta.json: not the token files' metadata the tokenize stage writes"),  # the shards no longer add up
    (lambda d: edit_meta(d, lambda meta: meta["splits"]["train"]["shards"][0].update(file="../../etc/passwd")),
     "meta.json: not the token files' metadata the tokenize stage writes"),
])
def test_a_damaged_shard_or_meta_is_one_line_naming_the_file(corpus, tmp_path, damage, expected):
    import shutil

    directory = tmp_path / "tokens"
    shutil.copytree(corpus[0] / "sharded", directory)
    damage(directory)
    with pytest.raises(InputDataError) as error:
        open_tokens("train", directory)
    assert str(error.value).startswith(str(directory / expected.split(":")[0])) and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_tokenizer_sample_stops_at_the_byte_bound_and_reports_what_it_took(corpus):
    _, tokenizer, _ = corpus
    texts = ["aaaa", "bbbbbb", "ccc", "dd"]  # 4 + 6 + 3 + 2 bytes
    sample = TextSample(iter(texts), max_bytes=13)
    assert list(sample) == ["aaaa", "bbbbbb", "ccc"]
    assert sample.report() == {"train_sample_documents": 3, "train_sample_bytes": 13, "train_sample_whole_corpus": False}
    whole = TextSample(iter(texts), max_bytes=None)
    assert list(whole) == texts and whole.report()["train_sample_whole_corpus"] is True
    assert list(TextSample(iter(texts), max_bytes=15)) == texts and list(TextSample(iter(texts), max_bytes=1)) == ["aaaa"]
    metrics = tokenizer_metrics(tokenizer, iter(TEXTS["validation"])) | sample.report()
    report = tokenizer_report(tokenizer, metrics, TEXTS["validation"][0])
    assert "Learned from 3 documents, 13 UTF-8 bytes" in report and "up to tokenizer.train_sample_bytes" in report
