"""Our GGUF files in llama.cpp itself, through llama-cpp-python (its binding, which vendors llama.cpp and builds it
from source): every family `base_model=hf` imports, in every variant the quantize stage writes by default, gives
llama.cpp our token ids and our logits; the block formats are byte for byte llama.cpp's own quantizer's.

llama-cpp-python is a source build of 10-25 minutes on 2 cores, so it is not in the [dev] extra: install it with
`CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e ".[llama-cpp]"` (a native build crashes on AMX CPUs). .ci/run
installs it. Without it these tests skip, saying so; under CI (CI=true) they fail instead."""

import numpy as np
import pytest
import torch
from harness import skip_outside_ci
from small_inputs import awkward_weights, train_test_tokenizer

from llmpipe.gguf.files import QuantizeSettings, plan_tensors, read_gguf_model, write_gguf
from llmpipe.model.transformer import ModelConfig, Transformer

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


@pytest.fixture(autouse=True)
def llama_cpp_installed():
    if llama_cpp is None:
        skip_outside_ci('llama-cpp-python (llama.cpp) is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF" '
                        'pip install -e ".[llama-cpp]" (a source build, 10-25 min on 2 cores)')


WIDE = {"hidden_size": 256, "intermediate_size": 256}  # rows of whole K-quant blocks: each variant's own format
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
TEXTS = ["Xiomara Quintero was born in Kyoto.", "  Two  spaces,\ttabs\nand ünïcödé: 3.14159 — ok?"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada born?"},
            {"role": "assistant", "content": "In Lisbon."}, {"role": "user", "content": "And Bo?"}]


def pipelines_own(tmp_path):
    """A model the pipeline trains from nothing, with its own byte-level BPE and chat tokens."""
    tokenizer = train_test_tokenizer(tmp_path / "tok", 512)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, d_model=256,
                                    n_head=4, n_kv_head=2, ffn_hidden=512)).eval()
    return model, tokenizer, model


def imported(family: str, **changes):
    """A random checkpoint of `family` built with transformers' own class (tests/test_families.py), imported."""
    def build(tmp_path):
        from test_families import import_into

        reference, model, tokenizer = import_into(tmp_path, family, **WIDE, **changes)
        return model, tokenizer, reference
    return build


def llama_2(tmp_path):
    """Llama 2 / TinyLlama: LlamaForCausalLM with Llama 2's real SentencePiece vocabulary (32,000 tokens) and chat
    template (tests/test_real_vocabularies.py; needs the llama-cpp-python sdist)."""
    import transformers
    from test_real_vocabularies import LLAMA2_TEMPLATE, import_sentencepiece

    *_, tokenizer, model = import_sentencepiece(tmp_path, LLAMA2_TEMPLATE)
    return model, tokenizer, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()


FAMILIES = {
    "pipelines-own": pipelines_own,
    "llama-3": imported("llama"),  # untied head
    "llama-3.2": imported("llama", tie_word_embeddings=True, rope_theta=50000.0, rope_scaling=LLAMA3_ROPE),
    "llama-2-sentencepiece": llama_2,
    "mistral": imported("mistral"),
    "qwen2": imported("qwen2"),  # q/k/v biases, tied head
    "qwen3": imported("qwen3"),  # q/k norms, head_dim ≠ hidden / heads
}
# llama.cpp multiplies a quantized weight by activations it quantizes to 8 bits itself (Q8_0 / Q8_K blocks); PyTorch
# multiplies the dequantized weights by float activations: the logits differ by that rounding of the activations
# (measured 2026-12-08: at most 0.0014 for F16, 0.047 for the quantized variants, over these families).
TOLERANCE = {"F16": 0.05}
QUANTIZED_TOLERANCE = 0.1


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0].float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_in_each_default_variant_runs_in_llama_cpp_with_our_ids_and_logits(tmp_path, family):
    """For each GGUF variant the quantize stage writes by default: llama.cpp tokenizes texts (adding BOS where the
    checkpoint does) and a rendered chat prompt to the pipeline's ids, and its logits are PyTorch's: F16 within
    0.05 of the original model's (transformers' class for an imported checkpoint), a quantized variant within
    the rounding of llama.cpp's 8-bit activations of our model holding that file's dequantized weights."""
    from llmpipe.text.chat_template import ChatTemplate

    model, tokenizer, reference = FAMILIES[family](tmp_path)
    sequence = tokenizer.sequence_tokens
    bos = [tokenizer.token_id(sequence.bos)] if sequence.add_bos else []
    texts = [bos + tokenizer.encode(text) for text in TEXTS]
    chat = ChatTemplate(tokenizer)
    prompt, prompt_ids = chat.render(MESSAGES, add_generation_prompt=True), chat.encode_prompt(MESSAGES)
    ids = (texts[0] + texts[1][len(bos):])[:model.config.context_length]
    vocabulary = min(model.config.vocab_size, logits(reference, ids[:1]).shape[-1])  # tokens the pipeline added
    expected = logits(reference, ids)[:, :vocabulary]
    settings = QuantizeSettings()
    differences = {}
    for variant in settings.variants:
        path = tmp_path / f"m-{variant}.gguf"
        write_gguf(path, model, tokenizer, plan_tensors(model, variant, settings.fallback,
                                                        settings.embeddings.get(variant),
                                                        settings.output.get(variant)), variant, "m")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.context_length, logits_all=True,
                              verbose=False, n_threads=1)
        assert [llm.tokenize(text.encode(), add_bos=True) for text in TEXTS] == texts, variant
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids, variant
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])[:, :vocabulary]
        ours = expected if variant == "F16" else logits(read_gguf_model(path, tokenizer), ids)[:, :vocabulary]
        differences[variant] = float(np.abs(theirs - ours).max())
        llm.close()
    print(f"{family}: max |Δlogit| llama.cpp vs PyTorch: {differences}")
    assert {variant: difference for variant, difference in differences.items()
            if difference > TOLERANCE.get(variant, QUANTIZED_TOLERANCE)} == {}


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
