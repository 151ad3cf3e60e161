"""Tokenizer: byte-level BPE encodes any text and decodes it back exactly."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from small_inputs import SPECIALS, train_test_tokenizer

from llmpipe.data.encode import choose_dtype
from llmpipe.data.world import WorldConfig, build_world
from llmpipe.errors import ParamError
from llmpipe.text.tokenizer import minimum_vocab_size, save_tokenizer, train_bpe


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok"), 400)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_on_arbitrary_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_training_is_deterministic(tmp_path):
    texts = build_world(WorldConfig(num_people=20, paraphrases=2))["pretrain_train"]
    for name in ("a", "b"):
        save_tokenizer(train_bpe(texts, 400, 2, SPECIALS), SPECIALS, tmp_path / name)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_special_tokens_are_single_ids_in_template_text_and_plain_text_in_data(tokenizer):
    for role, token in SPECIALS.items():
        assert tokenizer.encode_markup(token) == [tokenizer.special_ids[role]]
        assert tokenizer.special_ids[role] not in tokenizer.encode(token)


def test_learned_merges_compress_the_training_domain(tokenizer):
    text = build_world(WorldConfig(num_people=20, paraphrases=2))["pretrain_train"][0]
    assert len(text) / len(tokenizer.encode(text)) > 1.5  # bytes alone would give 1.0


def test_vocabulary_floor_and_token_file_type():
    assert minimum_vocab_size(SPECIALS) == 261
    assert choose_dtype(1024, "auto") == "uint16"
    assert choose_dtype(70000, "auto") == "uint32"
    with pytest.raises(ParamError, match="tokenize.token_dtype: uint16 holds at most 65536 ids but the tokenizer has 70000"):
        choose_dtype(70000, "uint16")
