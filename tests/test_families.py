"""The open-model families `base_model=hf` imports besides Llama (Qwen2/2.5, Qwen3, Mistral), each checked against
transformers' own class (random checkpoints built here, no network): the same logits on import, the HF export
loads as the same class with the same logits, the GGUF uses llama.cpp's architecture and tensor names for the
family; and every export carries the checkpoint's own BOS/EOS/end-of-turn/padding tokens and add-BOS behaviour."""

import json

import numpy as np
import pytest
import torch
from small_inputs import LLAMA3_TEMPLATE, QWEN_TEMPLATE, SPECIALS, byte_level_pipeline

from llmpipe.errors import InputDataError
from llmpipe.hf.checkpoint import import_checkpoint, read_hf_directory
from llmpipe.hf.export import write_hf_directory
from llmpipe.hf.tokenizer import import_tokenizer
from llmpipe.text.tokenizer import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    LoadedTokenizer,
    save_tokenizer,
)

transformers = pytest.importorskip("transformers")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada born?"},
            {"role": "assistant", "content": "In Lisbon."}]


def byte_level_tokenizer(directory, split: str | None, specials: list[str], bos: str | None, config: dict):
    """A byte-level BPE as Llama 3 (`split` LLAMA3_SPLIT, `bos` added by its post-processor) or Qwen2 (QWEN2_SPLIT,
    NFC, no BOS) ship one: special tokens after the learned ones, and tokenizer_config.json `config`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from llmpipe.data.world import WorldConfig, build_world

    tokenizer = Tokenizer(models.BPE())
    byte_level_pipeline(tokenizer, split, nfc=split == QWEN2_SPLIT)
    trainer = trainers.BpeTrainer(vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(build_world(WorldConfig(num_people=12, paraphrases=2))["pretrain_train"], trainer)
    tokenizer.add_special_tokens(specials)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


def llama3_tokenizer(directory):
    return byte_level_tokenizer(directory, LLAMA3_SPLIT, LLAMA3_SPECIALS, "<|begin_of_text|>", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3_TEMPLATE})


def qwen_tokenizer(directory):
    return byte_level_tokenizer(directory, QWEN2_SPLIT, QWEN_SPECIALS, None, {
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE})


FAMILIES = {  # transformers class, its tiny config, the tokenizer such a checkpoint ships
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False), llama3_tokenizer),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), qwen_tokenizer),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32), qwen_tokenizer),  # ≠ hidden / heads
    "mistral": ("MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None), llama3_tokenizer),
}


def make_family_checkpoint(directory, family: str, dtype: torch.dtype = torch.float32, **changes):
    """A random checkpoint of `family` built with transformers' own class and saved with save_pretrained
    (safetensors) in `dtype`; every bias and norm weight random too (transformers starts them at 0 and 1)."""
    class_name, shape, make_tokenizer = FAMILIES[family]
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **{
        "vocab_size": tokenizer.get_vocab_size(), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, **shape, **changes})
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0, 0.5)
    model = model.to(dtype)
    model.save_pretrained(directory)
    return model


def import_into(tmp_path, family: str, **changes):
    """(transformers' model, ours imported, the pipeline's tokenizer) for a fresh checkpoint of `family` (its
    config.json `changes` from the tiny shape)."""
    reference = make_family_checkpoint(tmp_path / "ckpt", family, **changes)
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    save_tokenizer(imported.tokenizer, imported.special_tokens, tmp_path / "tok", imported.chat_template,
                   imported.sequence_tokens)
    tokenizer = LoadedTokenizer(tmp_path / "tok")
    return reference, import_checkpoint(tmp_path / "ckpt", tokenizer.vocab_size), tokenizer


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_each_family_imports_and_exports_as_its_own_transformers_class_with_the_same_logits(tmp_path, family):
    reference, ours, tokenizer = import_into(tmp_path, family)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 50))
    with torch.no_grad():
        expected = reference(ids).logits
        assert (ours(ids)[0] - expected).abs().max() <= 1e-4
    write_hf_directory(tmp_path / "export", ours, tokenizer)
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILIES[family][0]]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == FAMILIES[family][0]
    with torch.no_grad():
        assert (exported(ids).logits - expected).abs().max() <= 1e-4


def test_lora_and_its_merge_keep_the_query_key_value_biases(tmp_path):
    from llmpipe.model.lora import add_lora, merge_lora
    from llmpipe.train.finetune_settings import LoRASettings

    _, ours, _ = import_into(tmp_path, "qwen2")
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        before = ours(ids)[0]
        add_lora(ours, LoRASettings(rank=4))
        assert torch.equal(ours(ids)[0], before)  # B starts at zero: the biases still apply
        merged = merge_lora(ours)
    assert merged.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        assert torch.allclose(merged(ids)[0], before, atol=1e-6)


@pytest.mark.parametrize("family, architecture, extra", [
    ("qwen2", "qwen2", ["blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"]),
    ("qwen3", "qwen3", ["blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"]),
    ("mistral", "llama", []),
])
def test_the_gguf_uses_llama_cpps_architecture_and_tensor_names_and_reads_back(tmp_path, family, architecture, extra):
    import gguf

    from llmpipe.gguf.files import plan_tensors, read_gguf_model, write_gguf

    reference, ours, tokenizer = import_into(tmp_path, family)
    path = tmp_path / "m-F16.gguf"
    write_gguf(path, ours, tokenizer, plan_tensors(ours, "F16", "Q4_0", None, None), "F16", "m")
    reader = gguf.GGUFReader(str(path))
    names = {tensor.name for tensor in reader.tensors}
    stored = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    q_proj = reference.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    if architecture == "llama":  # convert_hf_to_gguf.py's LlamaModel.permute (llama's rope: interleaved pairs)
        q_proj = q_proj.reshape(4, 2, q_proj.shape[0] // 8, -1).swapaxes(1, 2).reshape(q_proj.shape)
    assert np.array_equal(stored["blk.0.attn_q.weight"], q_proj.astype(np.float16))  # qwen2/3: rows as they are
    for name in extra:  # biases and q/k norms: float32, as they are
        ours_name = name.replace("blk.0.attn_", "layers.0.self_attn.").replace(".bias", "_proj.bias")
        assert np.array_equal(stored[name], reference.model.state_dict()[ours_name].numpy())
    assert reader.fields["general.architecture"].contents() == architecture
    assert reader.fields[f"{architecture}.block_count"].contents() == 2 and set(extra) <= names
    assert not {"blk.0.attn_output.bias", "blk.0.attn_q_norm.weight"} & names or family == "qwen3"
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if family.startswith("qwen") else "llama-bpe")
    back = read_gguf_model(path, tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 40))
    with torch.no_grad():
        assert (back(ids)[0] - ours(ids)[0]).abs().max() < 0.05  # F16 weights


def test_the_exports_carry_a_llama3_checkpoints_own_special_tokens(tmp_path):
    """BOS <|begin_of_text|> (added by the tokenizer), EOS <|end_of_text|>, end of turn <|eot_id|>, no padding:
    as the checkpoint has them, in the HF export and the GGUF, and the chat template renders with that BOS."""
    import gguf

    from llmpipe.gguf.files import plan_tensors, write_gguf
    from llmpipe.text.chat_template import ChatTemplate

    _, ours, tokenizer = import_into(tmp_path, "llama")
    begin, end, eot = (tokenizer.tokenizer.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>",
                                                                     "<|eot_id|>"))
    write_hf_directory(tmp_path / "export", ours, tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", None)
    assert hf_tokenizer("Hello")["input_ids"][0] == begin  # the checkpoint's tokenizer adds BOS; so does the export's
    chat = hf_tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    assert chat[0] == begin and chat == ChatTemplate(tokenizer).encode_prompt(MESSAGES[:2])  # what fine-tuning used
    config = json.loads((tmp_path / "export/config.json").read_text())
    generation = json.loads((tmp_path / "export/generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (begin, end, None)
    assert generation["eos_token_id"] == [end, eot]  # generation stops at the end of a turn too

    path = tmp_path / "m-F16.gguf"
    write_gguf(path, ours, tokenizer, plan_tensors(ours, "F16", "Q4_0", None, None), "F16", "m")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.bos_token_id"].contents() == begin
    assert fields["tokenizer.ggml.eos_token_id"].contents() == end
    assert fields["tokenizer.ggml.eot_token_id"].contents() == eot
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "tokenizer.ggml.padding_token_id" not in fields


def test_the_exports_carry_a_qwen_checkpoints_padding_and_add_no_bos(tmp_path):
    import gguf

    from llmpipe.gguf.files import plan_tensors, write_gguf

    _, ours, tokenizer = import_into(tmp_path, "qwen2")
    end, im_end = (tokenizer.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>"))
    write_hf_directory(tmp_path / "export", ours, tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert (hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert hf_tokenizer("Hello")["input_ids"] == tokenizer.encode("Hello")  # nothing added before the text
    path = tmp_path / "m-F16.gguf"
    write_gguf(path, ours, tokenizer, plan_tensors(ours, "F16", "Q4_0", None, None), "F16", "m")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.eos_token_id"].contents() == end
    assert fields["tokenizer.ggml.padding_token_id"].contents() == end
    assert fields["tokenizer.ggml.eot_token_id"].contents() == im_end


@pytest.mark.parametrize("family, change, message", [
    ("mistral", {"sliding_window": 64}, r"sliding_window = 64 is smaller than the context length "
                                        r"\(max_position_embeddings = 128\)"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window = True is not supported"),
    ("qwen3", {"attention_bias": True}, "attention_bias = True is not supported"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types has 'sliding_attention' layers; only 'full_attention' is supported"),
])
def test_what_a_family_needs_beyond_our_model_is_refused_by_key(tmp_path, family, change, message):
    make_family_checkpoint(tmp_path / "ckpt", family)
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    (tmp_path / "ckpt/config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputDataError, match=message):
        read_hf_directory(tmp_path / "ckpt")


@pytest.mark.parametrize("window", [None, 128, 4096])
def test_a_mistral_sliding_window_of_at_least_the_context_is_full_attention(tmp_path, window):
    reference = make_family_checkpoint(tmp_path / "ckpt", "mistral", sliding_window=window)
    ids = torch.randint(0, reference.config.vocab_size, (1, 128))
    with torch.no_grad():
        assert (read_hf_directory(tmp_path / "ckpt")(ids)[0] - reference(ids).logits).abs().max() <= 1e-4


def test_an_unreadable_tokenizer_config_is_named(tmp_path):
    qwen_tokenizer(tmp_path / "ckpt")
    (tmp_path / "ckpt/tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",')
    with pytest.raises(InputDataError, match=r"tokenizer_config.json: not valid JSON \(.*line 1\)"):
        import_tokenizer(tmp_path / "ckpt", SPECIALS)
