"""GGUF and Hugging Face exports: what we write reads back, in gguf's reader, in our model and in transformers."""

import numpy as np
import pytest
import torch
from small_inputs import SPECIALS, train_test_tokenizer

from llmpipe.gguf.files import (
    permute_for_interleaved_rope,
    plan_tensors,
    read_gguf_model,
    unpermute_from_interleaved_rope,
    write_gguf,
)
from llmpipe.model.transformer import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok"), 512)


def model(vocab_size: int, tie: bool = True, d_model: int = 256) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, context_length=64, n_layer=2, d_model=d_model, n_head=4,
                                   n_kv_head=2, ffn_hidden=512, tie_embeddings=tie)).eval()


def logits(net: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(tokens)[0]


def test_rope_row_permutation_round_trips():
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    permuted = permute_for_interleaved_rope(weight, heads=2)
    # Head 0 rows were [first half: 0, 1 | second half: 2, 3]; interleaved pairs: 0, 2, 1, 3.
    assert permuted[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert np.array_equal(unpermute_from_interleaved_rope(permuted, heads=2), weight)


@pytest.mark.parametrize("variant, tolerance", [("F16", 1e-2), ("Q8_0", 0.1), ("Q4_K", 0.5), ("Q2_K", None)])
def test_gguf_reads_back_with_metadata_tensors_and_weights(tmp_path, tokenizer, variant, tolerance):
    import gguf

    net = model(tokenizer.vocab_size, tie=variant != "Q8_0")
    plans = plan_tensors(net, variant, fallback="Q4_0", keep_embeddings=None, keep_output=None)
    path = tmp_path / f"m-{variant}.gguf"
    write_gguf(path, net, tokenizer, plans, variant, "test-model")

    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "test-model"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 256
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.feed_forward_length") == 512 and field("llama.context_length") == 64
    assert field("llama.rope.dimension_count") == 64 and field("llama.rope.freq_base") == 10000.0
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.end_of_document_id] == "<|endoftext|>"
    assert field("tokenizer.ggml.token_type")[tokenizer.special_ids["user"]] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.special_ids["end_of_turn"]
    assert len(field("tokenizer.ggml.merges")) == tokenizer.vocab_size - 256 - len(SPECIALS)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == variant
    assert ("output.weight" in types) == (variant == "Q8_0")

    tokens_in = torch.randint(0, tokenizer.vocab_size, (1, 40))
    restored = read_gguf_model(path)
    if tolerance is not None:
        assert (logits(restored, tokens_in) - logits(net, tokens_in)).abs().max() < tolerance
    else:  # 2-bit weights: the model changes, but it is still the same function family, not noise
        correlation = np.corrcoef(logits(restored, tokens_in).flatten(), logits(net, tokens_in).flatten())[0, 1]
        assert correlation > 0.5


def test_rows_that_are_not_whole_super_blocks_fall_back(tokenizer):
    net = model(tokenizer.vocab_size, d_model=128)
    types = {p.gguf_name: p.type_name for p in plan_tensors(net, "Q2_K", "Q4_0", None, None)}
    assert types["blk.0.attn_q.weight"] == "Q4_0"   # rows of 128: no 256-weight super-block fits
    assert types["blk.0.ffn_down.weight"] == "Q2_K"  # rows of 512
    kept = {p.gguf_name: p.type_name for p in plan_tensors(net, "Q4_0", "Q8_0", keep_embeddings="Q8_0", keep_output=None)}
    assert kept["token_embd.weight"] == "Q8_0" and kept["blk.0.attn_v.weight"] == "Q4_0"


def test_tampered_gguf_is_refused(tmp_path, tokenizer):
    from llmpipe.errors import InputDataError

    net = model(tokenizer.vocab_size)
    path = tmp_path / "m.gguf"
    write_gguf(path, net, tokenizer, plan_tensors(net, "Q4_0", "Q8_0", None, None), "Q4_0", "m")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="m.gguf"):
        read_gguf_model(path)


def test_hugging_face_export_loads_in_transformers_with_the_same_logits_and_ids(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpipe.hf.export import write_hf_directory

    net = model(tokenizer.vocab_size)
    write_hf_directory(tmp_path / "hf", net, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Xiomara Quintero was born in Kyoto. <|user|> What? <|end|> Ünïcödé"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode_markup(text)  # transformers reads special tokens' strings as the tokens
    tokens_in = torch.tensor([ids])
    with torch.no_grad():
        difference = (hf(input_ids=tokens_in).logits - logits(net, tokens_in)).abs().max()
    assert difference < 1e-4
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True,
                                            tokenize=False)
    assert chat == "<|user|> Hi?<|end|><|assistant|>"


def test_a_tensor_no_format_fits_is_named_with_the_formats_tried(tokenizer):
    from llmpipe.errors import InputDataError

    net = model(tokenizer.vocab_size, d_model=48)
    with pytest.raises(InputDataError, match=r"tensor token_embd.weight has rows of 48 weights, which fit neither "
                                             r"Q4_K \(rows of multiples of 256\) and Q4_0 \(rows of multiples of 32\)"):
        plan_tensors(net, "Q4_K", "Q4_0", None, None)
    assert {p.type_name for p in plan_tensors(net, "Q4_K", "F16", None, None)} == {"Q4_K", "F16", "F32"}  # ffn_down rows of 512
