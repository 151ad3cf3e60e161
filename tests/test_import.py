"""Starting from an existing open model: Hugging Face Llama checkpoints (built here at random, no network)
import with the same logits as transformers, export back to the same tensors, and refuse what our model
does not implement; the whole pipeline runs on an imported checkpoint."""

import json

import pytest
import torch
from harness import BIN, dvc, make_repo_copy, run
from safetensors.torch import load_file
from small_inputs import SPECIALS

from llmpipe.errors import InputDataError
from llmpipe.hf.checkpoint import fit_vocabulary, read_hf_directory
from llmpipe.hf.export import write_hf_directory
from llmpipe.hf.tokenizer import import_tokenizer
from llmpipe.text.tokenizer import LoadedTokenizer, save_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
SHAPES = {
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "untied_gqa": dict(tie_word_embeddings=False, num_key_value_heads=1),
    "llama3_rope_scaling": dict(tie_word_embeddings=False, num_key_value_heads=2, rope_theta=50000.0,
                                rope_scaling=LLAMA3_ROPE),
}


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def foreign_tokenizer(directory, texts, chat_template=None):
    """A byte-level BPE as another project would ship it: its own end-of-sequence token, and either no chat
    format at all or its own (ChatML, with its two special tokens)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # as Llama 3's
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", **({"chat_template": chat_template} if chat_template else {})}))
    return tokenizer


def make_checkpoint(directory, shape="untied_gqa", vocab_size=320, hidden=64, intermediate=96, layers=2,
                    chat_template=None, dtype=torch.float32, **changes):
    """A random LlamaForCausalLM saved with save_pretrained (safetensors) in `dtype` plus a 300-token tokenizer
    (the model's 320 rows are padded, as real checkpoints often are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.data.world import WorldConfig, build_world

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                         rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, **{**SHAPES[shape], **changes})
    model = LlamaForCausalLM(config).eval().to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    foreign_tokenizer(directory, build_world(WorldConfig(num_people=12, paraphrases=2))["pretrain_train"], chat_template)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_imported_logits_equal_transformers_and_export_gives_back_the_tensors(tmp_path, shape):
    reference = make_checkpoint(tmp_path / "ckpt", shape)
    ours = read_hf_directory(tmp_path / "ckpt")
    ids = torch.randint(0, 320, (2, 100))  # beyond the 32 original positions of the llama3 scaling
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], reference(ids).logits, atol=1e-4, rtol=0)
    tokenizer_dir = tmp_path / "tok"
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    save_tokenizer(imported.tokenizer, imported.special_tokens, tokenizer_dir, imported.chat_template,
                   imported.sequence_tokens)
    write_hf_directory(tmp_path / "export", ours, LoadedTokenizer(tokenizer_dir))
    original, exported = load_file(str(tmp_path / "ckpt" / "model.safetensors")), load_file(
        str(tmp_path / "export" / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name], exported[name]) for name in original)


def test_the_imported_tokenizer_keeps_its_end_of_sequence_and_gains_the_chat_tokens(tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    tokenizer, specials, template, added = imported.tokenizer, imported.special_tokens, imported.chat_template, \
        imported.added
    assert template is None  # without a chat template of its own, the pipeline's chat tokens are added
    assert specials["end_of_document"] == "</s>"
    save_tokenizer(tokenizer, specials, tmp_path / "tok")
    assert LoadedTokenizer(tmp_path / "tok").encode("Hello")[0] != 0  # no automatic <s>: the pipeline places ids
    assert added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] and tokenizer.get_vocab_size() == 304
    model = fit_vocabulary(read_hf_directory(tmp_path / "ckpt"), 304, 300)  # 320 padded rows → 300 + 4 added
    assert model.config.vocab_size == 304
    assert torch.allclose(model.embed_tokens.weight[303], model.embed_tokens.weight[:300].mean(0))


def test_a_checkpoint_with_its_own_chat_template_keeps_it_token_for_token(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from llmpipe.model.transformer import IGNORE_INDEX
    from llmpipe.text.chat_template import ChatTemplate

    make_checkpoint(tmp_path / "ckpt", chat_template=CHATML)
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    tokenizer, specials, template, added = imported.tokenizer, imported.special_tokens, imported.chat_template, \
        imported.added
    assert added == [] and specials == {"end_of_document": "</s>", "end_of_turn": "<|im_end|>"}
    save_tokenizer(tokenizer, specials, tmp_path / "tok", template)
    chat = ChatTemplate(LoadedTokenizer(tmp_path / "tok"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada born?"},
                {"role": "assistant", "content": "In Lisbon."}]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ckpt/tokenizer.json"), chat_template=CHATML)
    expected = reference.apply_chat_template(messages, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    example = chat.encode_example(messages, 512)
    assert example.ids + [expected[-1]] == expected  # transformers' ids for the same conversation
    learned = [token for token in example.labels if token != IGNORE_INDEX]
    assert chat.tokenizer.decode(learned) == "In Lisbon.<|im_end|>" and chat.jinja() == CHATML
    prompt = reference.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    assert chat.encode_prompt(messages[:2]) == list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, "model_type is 'gemma2'; supported: llama, mistral, qwen2, qwen3"),
    ({"model_type": "phi3"}, "model_type is 'phi3'; supported: llama, mistral, qwen2, qwen3"),
    ({"attention_bias": True}, "attention_bias = True is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "rope scaling 'yarn' is not supported"),
    ({"num_local_experts": 8}, "num_local_experts = 8 is not supported"),
])
def test_what_our_model_does_not_implement_is_refused_by_key(tmp_path, change, message):
    make_checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    (tmp_path / "ckpt/config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(InputDataError, match=message):
        read_hf_directory(tmp_path / "ckpt")


@pytest.mark.parametrize("change", [
    {"model": {"byte_fallback": True}},  # byte fallback under a byte-level decoder: neither kind
    {"decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"}]},
     "model": {"byte_fallback": True},  # SentencePiece-style, but its Metaspace splits at spaces (llama.cpp does not)
     "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}},
])
def test_pickled_weights_and_other_tokenizer_kinds_are_refused(tmp_path, change):
    make_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt/model.safetensors"
    weights.rename(tmp_path / "ckpt/pytorch_model.bin")
    with pytest.raises(InputDataError, match="pytorch_model.bin is a pickle, which the pipeline never loads"):
        read_hf_directory(tmp_path / "ckpt")
    spec = json.loads((tmp_path / "ckpt/tokenizer.json").read_text())
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if key == "model" else value
    (tmp_path / "ckpt/tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputDataError, match="tokenizer.json: this tokenizer kind is not supported; supported: "
                                             "byte-level BPE .* SentencePiece-style BPE"):
        import_tokenizer(tmp_path / "ckpt", SPECIALS)


def tiny_sentencepiece_tokenizer(directory):
    """A SentencePiece-style tokenizer.json (Llama 2's layout) over a few pieces: <unk> <s> </s>, the 256 byte
    tokens, then "▁", "a", "b", "▁a", "▁ab" (merged in that order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), "\u2581", "a", "b", "\u2581a",
              "\u2581ab"]
    tokenizer = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)},
                                     merges=[("\u2581", "a"), ("\u2581a", "b")], unk_token="<unk>", fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in pieces[:3]])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))


def test_a_sentencepiece_tokenizer_without_its_model_file_gets_scores_in_merge_order(tmp_path):
    """Without tokenizer.model, the GGUF's scores rank each merged piece by its merge (llama.cpp merges the
    highest-scoring pair first); a tokenizer.model that is not SentencePiece's protobuf is named."""
    import gguf

    from llmpipe.gguf.files import sentencepiece_scores_and_types

    tiny_sentencepiece_tokenizer(tmp_path / "ckpt")
    imported = import_tokenizer(tmp_path / "ckpt", SPECIALS)
    assert imported.sentencepiece is None and imported.sequence_tokens == {
        "bos": "<s>", "eos": "</s>", "pad": None, "add_bos": True}
    save_tokenizer(imported.tokenizer, imported.special_tokens, tmp_path / "tok")
    tokenizer = LoadedTokenizer(tmp_path / "tok")
    assert tokenizer.encode("ab a") == [263, 262]  # "▁ab" "▁a"
    vocabulary = [token for token, _ in sorted(tokenizer.tokenizer.get_vocab().items(), key=lambda item: item[1])]
    scores, types = sentencepiece_scores_and_types(tokenizer, vocabulary)
    assert scores[259:264] == [0.0, 0.0, 0.0, -0.0, -1.0] and scores[:3] == [-1000.0] * 3
    assert types[3] == types[258] == gguf.TokenType.BYTE and types[259] == gguf.TokenType.NORMAL
    (tmp_path / "ckpt/tokenizer.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(InputDataError, match="tokenizer.model: not a SentencePiece model file"):
        import_tokenizer(tmp_path / "ckpt", SPECIALS)


@pytest.mark.slow
def test_the_pipeline_fine_tunes_quantizes_and_evaluates_an_imported_bf16_checkpoint_under_qlora(tmp_path):
    """The one imported checkpoint through every stage (each family's own parts are checked above and in
    tests/test_families.py without a pipeline run each): a bf16 Llama 3.1-style checkpoint with rope scaling and
    a chat template, fine-tuned with QLoRA (an NF4 base). Its weights stay bf16 in models/pretrained,
    models/finetuned and the Hugging Face export; the adapter trains in fp32; rope scaling and the template
    travel to the GGUF files and the export."""
    import gguf
    from safetensors import safe_open

    from llmpipe.gguf.files import read_gguf_model
    from llmpipe.model.weights import load_model

    repo = make_repo_copy(tmp_path / "repo")
    saved = make_checkpoint(repo / "base_models/tiny-llama", "llama3_rope_scaling", hidden=256, intermediate=256,
                            layers=1, chat_template=CHATML, dtype=torch.bfloat16)
    output = dvc(repo, "exp", "run", "-S", "base_model=hf", "-S", "base_model.path=base_models/tiny-llama",
                 "-S", "finetune.lora.base_bits=4").stdout
    assert "took the tokenizer of base_models/tiny-llama and its chat template" in output
    assert "parameters in bfloat16" in output

    def stored(path):
        with safe_open(str(path), framework="pt") as handle:
            return {handle.get_slice(name).get_dtype() for name in handle.keys()}

    for directory in ("models/pretrained", "models/finetuned", "models/hf"):
        assert stored(repo / directory / "model.safetensors") == {"BF16"}, directory
    assert stored(repo / "models/finetuned/adapter/adapter_model.safetensors") == {"F32"}
    assert json.loads((repo / "models/hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    pretrained, config = load_model(repo / "models/pretrained")
    assert config["stage"] == "import" and pretrained.config.rope_scaling is not None
    assert pretrained.dtype == torch.bfloat16
    from transformers import AutoModelForCausalLM

    # The same bf16 weights, both computed in fp32 (loaded afresh: a model cast to bf16 keeps bf16 rotary tables).
    reference = AutoModelForCausalLM.from_pretrained(repo / "base_models/tiny-llama", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 60))
    with torch.no_grad():
        torch.testing.assert_close(pretrained.float()(ids)[0][..., :300], reference(ids).logits[..., :300],
                                   atol=1e-4, rtol=0)
    finetune = json.loads((repo / "reports/finetune/details.json").read_text())
    assert "qa_accuracy_finetuned_people" in finetune and finetune["best_step"] >= 1
    tokenizer = LoadedTokenizer(repo / "models/tokenizer")
    for gguf_file in (repo / "models/gguf").glob("*.gguf"):  # the tokenizer, template and rope scaling travel
        assert read_gguf_model(gguf_file, tokenizer).config.rope_scaling == pytest.approx(
            {k: float(v) for k, v in pretrained.config.rope_scaling.items()})
    reader = gguf.GGUFReader(str(next((repo / "models/gguf").glob("*-Q8_0.gguf"))))
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert (repo / "models/hf/chat_template.jinja").read_text() == CHATML  # where transformers 5 keeps it
    exported = AutoModelForCausalLM.from_pretrained(repo / "models/hf").eval()
    assert exported.dtype == torch.bfloat16
    finetuned, _ = load_model(repo / "models/finetuned")
    with torch.no_grad():
        assert (exported.float()(ids).logits - finetuned.float()(ids)[0]).abs().max() <= 1e-4
    evaluate = (repo / "reports/evaluate/variants.csv").read_text()
    assert all(f"\n{variant}," in evaluate for variant in ("base", "finetuned", "Q8_0", "Q4_0"))
    assert "\nfinetuned,16," in evaluate and "\nbase,16," in evaluate  # bits per weight: bf16
    assert "imported checkpoint" in (repo / "reports/report.md").read_text()
    size = run([str(BIN / "llmpipe"), "model-size", "--checkpoint", "base_models/tiny-llama", "--json"], repo)
    assert json.loads(size.stdout)["parameters"] == sum(p.numel() for p in saved.parameters())
