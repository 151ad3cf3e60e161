"""Small inputs several test files share: a byte-level BPE tokenizer trained on a small embedded world,
weights at the edges of the quantization formats' arithmetic, and the pre-tokenization of byte-level families."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = {"end_of_document": "<|endoftext|>", "system": "<|system|>", "user": "<|user|>",
            "assistant": "<|assistant|>", "end_of_turn": "<|end|>"}


def train_test_tokenizer(directory: Path, vocab_size: int):
    """A byte-level BPE trained on a small embedded world, saved in `directory` and loaded."""
    from llmpipe.data.world import WorldConfig, build_world
    from llmpipe.text.tokenizer import LoadedTokenizer, save_tokenizer, train_bpe

    texts = build_world(WorldConfig(num_people=20, paraphrases=2))["pretrain_train"]
    save_tokenizer(train_bpe(texts, vocab_size, 2, SPECIALS), SPECIALS, directory)
    return LoadedTokenizer(directory)


def awkward_weights() -> np.ndarray:
    """Rows of 256 weights (one K-quant block, eight small ones) at the edges of the formats' arithmetic."""
    normal = np.random.default_rng(11).standard_normal((10, 256)).astype(np.float32)
    largest, index = np.finfo(np.float32).max, np.arange(256)
    rows = [
        np.zeros(256), np.full(256, 0.37), np.full(256, -2.5),        # all zero; constants
        # tiny: fp16 scales 0; float32 subnormals; fp16 subnormal scales
        normal[0] * 1e-30, normal[1] * 1e-40, normal[2] * 1e-6,
        normal[3] * 1e5, normal[4] * 1e30,                             # fp16 scales overflow; squares overflow float32
        np.where(index % 2, largest, -largest),                        # ±FLT_MAX
        -np.abs(normal[5]), np.abs(normal[6]) + 1, index == 37,        # negative only; positive only; one spike
        index % 17 - 7.5, np.where(index == 200, 3.0, -0.01),          # halves (rounding ties); constant but one
        np.concatenate([np.zeros(128), normal[7, :128]]),
        np.concatenate([normal[8, :32] * 1e3, normal[9, 32:] * 1e-3]),  # one loud sub-block: the others' sc round to 0
        # -4e6's mn takes dmin to fp16's top, so (x + dmin·mn) / (d·sc) passes ±2^22, where nearest_int's bits
        # are no longer the rounded value (llama.cpp keeps them: so do we)
        np.concatenate([np.full(32, -4e6), np.linspace(-5e-4, 5e-4, 32), -12000 + index[64:] % 8 * 1e-3]),
    ]
    return np.array(rows, dtype=np.float32)


# Chat templates of the families, as their tokenizer_config.json ships them
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_TEMPLATE = (  # ChatML, as Qwen2.5's template renders a conversation that has a system turn
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_pipeline(tokenizer, split: str | None, nfc: bool) -> None:
    """Give a `tokenizers` BPE what a byte-level family's tokenizer.json has around its model: GPT-2's
    pre-tokenizer (`split` None) or the family's split regex then byte-level, NFC (Qwen2) if `nfc`, and the
    byte-level decoder."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
