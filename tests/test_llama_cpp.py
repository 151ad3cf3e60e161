"""Optional: our GGUF files in llama.cpp itself (through llama-cpp-python, which builds llama.cpp from
source: `pip install llama-cpp-python`, several minutes on 2 cores). Skipped when it is not installed."""

import numpy as np
import pytest
import torch
from small_inputs import awkward_weights, train_test_tokenizer

from llmpipe.gguf.files import plan_tensors, read_gguf_model, write_gguf
from llmpipe.model.transformer import ModelConfig, Transformer

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("variant, tolerance", [("F16", 0.02), ("Q8_0", 0.5), ("Q4_0", 0.5), ("Q4_K", 0.5),
                                                       ("Q2_K", 0.5)])
def test_llama_cpp_reads_our_gguf_with_our_tokens_logits_and_chat_template(tmp_path, variant, tolerance):
    tokenizer = train_test_tokenizer(tmp_path / "tok", 512)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, d_model=256,
                                    n_head=4, n_kv_head=2, ffn_hidden=512)).eval()
    path = tmp_path / f"m-{variant}.gguf"
    write_gguf(path, model, tokenizer, plan_tensors(model, variant, "Q4_0", None, None), variant, "test")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    text = "Xiomara Quintero was born in Kyoto."
    ids = tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = read_gguf_model(path)(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(theirs - ours).max() < tolerance
    prompt = llm.tokenize(b"<|user|> Hi<|end|><|assistant|>", add_bos=False, special=True)
    assert prompt == tokenizer.encode_markup("<|user|> Hi<|end|><|assistant|>")


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q4_K"])
def test_bytes_equal_llama_cpps_own_quantizer(name):
    import ctypes
    from pathlib import Path

    from llmpipe.gguf.formats import FORMATS

    library = next(iter(sorted(Path(llama_cpp.__file__).parent.glob("lib/libggml-base.so*"))), None)
    if library is None:
        pytest.skip("llama-cpp-python ships no libggml-base here")
    quantize_row = getattr(ctypes.CDLL(str(library)), f"quantize_row_{name.lower().replace('_k', '_K')}_ref")
    quantize_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(0)
    weights = (rng.standard_t(3, (512, 256)) * 0.02).astype(np.float32)
    weights[::5] *= rng.random((103, 256)) < 0.2           # sparse rows
    weights = np.concatenate([weights, awkward_weights()])  # and rows at the edges of the arithmetic
    theirs = np.zeros((len(weights), 256 // FORMATS[name].block_size * FORMATS[name].block_bytes), dtype=np.uint8)
    quantize_row(weights.ctypes.data, theirs.ctypes.data, weights.size)
    assert np.array_equal(FORMATS[name].quantize(weights), theirs)


def test_llama_cpp_tokenizes_our_sentencepiece_gguf_as_the_original(tmp_path):
    """Llama 2's vocabulary (llama-spm) in our GGUF: llama.cpp's SentencePiece tokenizer gives every test text the
    original ids and a Mistral chat prompt the pipeline's ids (tests/test_real_vocabularies.py builds the
    checkpoint; skipped without the llama-cpp-python sdist)."""
    from test_real_vocabularies import MISTRAL_TEMPLATE, chat_template_file, import_sentencepiece

    from llmpipe.text.chat_template import ChatTemplate

    _, texts, expected, tokenizer, model = import_sentencepiece(tmp_path, chat_template_file(MISTRAL_TEMPLATE))
    path = tmp_path / "m-F16.gguf"
    write_gguf(path, model, tokenizer, plan_tensors(model, "F16", "Q4_0", None, None), "F16", "test")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert [text for text, ids in zip(texts, expected) if llm.tokenize(text.encode(), add_bos=False) != ids] == []
    chat = ChatTemplate(tokenizer)
    messages = [{"role": "user", "content": "Where was Ada born?"}, {"role": "assistant", "content": "In Lisbon."},
                {"role": "user", "content": " And  Bo?\n"}]
    rendered = chat.render(messages, add_generation_prompt=True).encode()
    assert llm.tokenize(rendered, add_bos=False, special=True) == chat.encode_prompt(messages)
