"""Every model variant side by side on the same data: the evaluate stage's measurements.

Each variant (the base model, the fine-tuned reference, every GGUF file read back) gets validation
perplexity and bits per byte, exact-match QA accuracy per split, KL divergence of its next-token
distributions from the reference, file size and bits per weight, and greedy generation speed. Every variant
is measured on the device `evaluate.device` names (a GGUF file on its dequantized weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmpipe.config.params import params_section, setting
from llmpipe.data.sampling import spread_sample
from llmpipe.eval.metrics import (
    mean_kl_divergence,
    next_token_distributions,
    perplexity_metrics,
)
from llmpipe.eval.qa import qa_metrics
from llmpipe.model.generation import Engine, SamplingSettings
from llmpipe.model.transformer import Transformer
from llmpipe.runner.distributed import check_device_available, resolve_device
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.text.chat_template import ChatTemplate


@dataclass(frozen=True)
class Variant:
    name: str
    load: Callable[[], Transformer]
    path: Path                     # the file whose size is reported
    bits_per_weight: float


@params_section("evaluate")
@dataclass(frozen=True)
class EvaluateSettings:
    sample_answers: int = setting(5, "sample answers per variant in the report", min=0)
    eval_max_tokens: int = setting(65536, "validation tokens for perplexity and bits per byte", min=2)
    kl_max_tokens: int = setting(4096, "validation tokens for the KL divergence against the full-precision model",
                                 min=2)
    max_questions_per_split: int = setting(400, "QA questions per split (fine-tuned people, held-out people): the "
                                                "first N of each file", min=1)
    max_new_tokens: int = setting(24, "longest generated answer", min=1)
    pad_prompts: bool = setting(False, "answer questions of all lengths in one batch, left-padded (one decoding "
                                       "pass instead of one per length: for large models; last digits of logits "
                                       "may differ)")
    generation_tokens: int = setting(64, "tokens generated when measuring generation speed", min=1)
    measure_base: bool = setting(True, "evaluate the pretrained base model too (false: one variant fewer, for large "
                                       "models)")
    registered_model_name: str = setting("llmpipe-chat", "MLflow Model Registry name of the fine-tuned model",
                                         name=True)
    registry_weights: str = setting("copy", "copy (the registered model holds the weights) | dvc_cache (it names "
                                    "them in DVC's cache by md5: stored once, for large models)",
                                    choices=["copy", "dvc_cache"])
    device: str = setting("auto", "auto (cuda when available) | cpu | cuda: where every variant is measured (a GGUF "
                                  "file on its dequantized weights)", choices=["auto", "cpu", "cuda"])


def evaluation_device(settings: EvaluateSettings, source: str) -> torch.device:
    """The device every variant is measured on; `cuda` without CUDA is refused naming evaluate.device."""
    check_device_available(settings.device, "evaluate.device", source)
    return resolve_device(settings.device)


def compare_variants(variants: list[Variant], reference: str, template: ChatTemplate, validation_tokens: np.ndarray,
                     validation_counts: dict, qa_sets: dict[str, list[dict]], limits: EvaluateSettings,
                     device: torch.device = torch.device("cpu")) -> tuple[list[dict], dict[str, list[dict]]]:
    """(one row of measurements per variant, sample answers per variant), measured on `device`. One variant's
    model is in memory at a time."""
    first_question = next((pairs[0]["question"] for pairs in qa_sets.values() if pairs), "Hello")
    speed_prompt = template.encode_prompt([{"role": "user", "content": first_question}])
    sample_split = "heldout_people" if qa_sets.get("heldout_people") else next(iter(qa_sets))
    rows, samples, log_probs = [], {}, {}
    for variant in variants:
        row, answers, log_probs[variant.name] = measure_variant(variant, template, validation_tokens,
                                                                validation_counts, qa_sets, speed_prompt, limits,
                                                                device)
        samples[variant.name] = spread_sample(answers[sample_split], limits.sample_answers)
        rows.append(row)
        print(f"evaluate: {variant.name}: perplexity {row['val_perplexity']:.3f}, held-out accuracy "
              f"{row.get('qa_accuracy_heldout_people', 0.0):.3f}, {row['tokens_per_second']:.0f} tokens/s", flush=True)
    for row in rows:
        row["kl_divergence"] = mean_kl_divergence(log_probs[reference], log_probs[row["variant"]])
    return rows, samples


def measure_variant(variant: Variant, template: ChatTemplate, validation_tokens: np.ndarray, validation_counts: dict,
                    qa_sets: dict[str, list[dict]], speed_prompt: list[int], limits: EvaluateSettings,
                    device: torch.device = torch.device("cpu")) -> tuple[dict, dict[str, list[dict]], torch.Tensor]:
    """One variant's row, answers by QA split and next-token log-probabilities (in CPU memory), measured on
    `device` (its model is loaded here, moved there, and freed on return)."""
    label = f"evaluate: {variant.name}: "
    with Heartbeat(label.rstrip(), None):
        model = variant.load().to(device)
        row = {"variant": variant.name, "bits_per_weight": variant.bits_per_weight,
               "file_bytes": variant.path.stat().st_size,
               **perplexity_metrics(model, validation_tokens, validation_counts, limits.eval_max_tokens, label=label)}
        qa, answers = qa_metrics(model, template, qa_sets, limits.max_new_tokens, label=label,
                                 padded=limits.pad_prompts)
        row.update({f"qa_accuracy_{split}": qa.get(f"qa_accuracy_{split}", 0.0) for split in qa_sets})
        log_probs = next_token_distributions(model, validation_tokens, limits.kl_max_tokens, label=label)
        row["tokens_per_second"] = generation_tokens_per_second(model, speed_prompt, limits.generation_tokens,
                                                                label=label)
    return row, answers, log_probs


@torch.no_grad()
def generation_tokens_per_second(model: Transformer, prompt: list[int], new_tokens: int, repeats: int = 5,
                                 label: str = "") -> float:
    """Greedy generation speed: the fastest of `repeats` timed runs after a warm-up (the fastest run is
    the one least slowed down by whatever else the machine was doing)."""
    engine, settings = Engine(model), SamplingSettings(max_new_tokens=new_tokens)
    best = 0.0
    with Heartbeat(f"{label}generation speed:", repeats + 1, "runs") as beat:
        list(engine.stream(prompt, settings))  # warm up
        for run in range(repeats):
            beat.tick(run + 1)
            start = time.perf_counter()
            produced = len(list(engine.stream(prompt, settings)))
            best = max(best, produced / (time.perf_counter() - start))
    return best
