"""The `base_model` section: pretrain the model preset from scratch, or import a Hugging Face checkpoint
(train_tokenizer takes its tokenizer, pretrain its weights: llmpipe.hf.checkpoint). Kept apart from the import
itself, so train_tokenizer reads it without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.config.params import StageParams, params_section, setting


@params_section("base_model", option="scratch")
@dataclass(frozen=True)
class BaseModelSettings:
    source: str = setting("scratch", "scratch (pretrain the model preset) | hf (import a Hugging Face Llama "
                                     "checkpoint instead)", choices=["scratch", "hf"])
    path: str = setting("base_models/README.md", "directory with config.json, *.safetensors, tokenizer.json "
                                                 "(checked and fingerprinted by check_inputs when source is hf)")
    dtype: str = setting("auto", "the imported weights' dtype, kept by every later stage: auto (the checkpoint's "
                                 "own) | bf16 | fp16 | fp32", choices=["auto", "bf16", "fp16", "fp32"],
                         used_when=("source", "hf"))


def base_model_settings(params: StageParams) -> BaseModelSettings:
    """The `base_model` section (train_tokenizer and pretrain read it)."""
    return params.read(BaseModelSettings)
