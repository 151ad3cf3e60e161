"""The LoRA adapter the finetune stage writes (tiny config: method lora) in PEFT's layout: `peft` loads it onto
the pretrained model in Hugging Face layout and gives the merged model's logits (the quantize stage's export)."""

import json

import pytest
import torch

peft = pytest.importorskip("peft")  # the dev extra pins it


def test_peft_loads_the_adapter_onto_the_base_and_matches_the_merged_export(built_repo, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmpipe.hf.export import write_hf_directory
    from llmpipe.model.weights import load_model
    from llmpipe.text.tokenizer import LoadedTokenizer

    adapter = built_repo / "models/finetuned/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").is_file()
    tokenizer = LoadedTokenizer(built_repo / "models/tokenizer")
    base, _ = load_model(built_repo / "models/pretrained", tokenizer=tokenizer)
    write_hf_directory(tmp_path / "base", base, tokenizer)  # the pretrained model, as the quantize stage exports

    tokens = torch.tensor([tokenizer.encode("What is the birth city of Ada? She was born in")])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = plain(tokens).logits
        adapted = peft.PeftModel.from_pretrained(plain, adapter).eval()
        adapted_logits = adapted(tokens).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(built_repo / "models/hf").eval()(tokens).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter is loaded and does something
    assert (adapted_logits - merged_logits).abs().max() <= 1e-5
