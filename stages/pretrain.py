"""Stage `pretrain`: train the transformer from scratch on next-token prediction over the token files.

Params: model (the preset: `dvc exp run -S model=small`), pretrain (loop settings), seed.
Output: models/pretrained/ (model.safetensors + config.json), reports/pretrain/metrics.json (final
val_loss, val_bpb, unigram_bpb, tokens_per_second, ...), reports/pretrain/{train,eval}_curve.csv (DVC plots).
Checkpoints go to checkpoints/pretrain/<key>/; a killed run resumes from the last one.
Run: `dvc repro pretrain`; data-parallel: `dvc exp run -S pretrain.processes=2` (the stage runs under
llmpipe.launch, which is torchrun for N > 1), or by hand: `torchrun --nproc_per_node=2 stages/pretrain.py`.
"""

import math
from pathlib import Path

import torch

from llmpipe import distributed
from llmpipe.checkpoint import CheckpointStore, checkpoint_key, default_directory
from llmpipe.errors import ParamError
from llmpipe.lm_data import (RandomWindows, bits_per_byte, language_model_loss, measure_matmul_flops_per_second,
                             unigram_bits_per_byte)
from llmpipe.model import Transformer, count_parameters
from llmpipe.model_io import save_model
from llmpipe.params import StageParams
from llmpipe.stage import stage
from llmpipe.tokenize_corpus import open_tokens, read_meta
from llmpipe.training import train
from llmpipe.training_params import global_batch_sequences, model_config, train_settings
from llmpipe.training_reports import write_training_reports
from llmpipe.tracking import StageRun

TOKENS_DIR = Path("data/tokens")
OUTPUT_DIR = Path("models/pretrained")
REPORTS_DIR = Path("reports/pretrain")


@stage("pretrain")
def pretrain(params: StageParams, run: StageRun) -> None:
    meta = read_meta(TOKENS_DIR)
    config = model_config(params, meta["vocab_size"])
    settings = train_settings(params, "pretrain")
    sequences = global_batch_sequences(params, "pretrain", config.context_length)
    micro = params.int("pretrain.micro_batch_sequences", min=1)
    eval_max_tokens = params.int("pretrain.eval_max_tokens", min=2)
    seed = params.int("seed")
    requested_device = params.str("pretrain.device", choices=["auto", "cpu", "cuda"])
    params.int("pretrain.processes", min=1)  # used by the stage's torchrun command in dvc.yaml

    process = distributed.start(requested_device)
    try:
        torch.manual_seed(seed)
        model = Transformer(config)
        train_tokens, validation_tokens = open_tokens(TOKENS_DIR, "train"), open_tokens(TOKENS_DIR, "validation")
        validation_counts = meta["splits"]["validation"]
        batches = RandomWindows(train_tokens, config.context_length, sequences, micro, seed)
        if sequences // micro < process.world_size:
            raise ParamError(f"params.yaml: pretrain.global_batch_sequences / micro_batch_sequences = {sequences // micro} "
                             f"micro-batches cannot be shared by {process.world_size} processes")
        peak = params.get("pretrain.peak_flops_per_second")
        settings.peak_flops_per_second = (params.float("pretrain.peak_flops_per_second", above=0) if peak is not None
                                          else measure_matmul_flops_per_second(process.device,
                                                                               torch.bfloat16 if settings.precision == "bf16" else torch.float32))

        def evaluate(model: Transformer) -> dict[str, float]:
            loss, predicted = language_model_loss(model, validation_tokens, config.context_length, eval_max_tokens,
                                                  micro, process.device)
            return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
                    "val_bpb": bits_per_byte(loss, predicted, validation_counts["tokens"], validation_counts["utf8_bytes"])}

        store = CheckpointStore(default_directory("pretrain", checkpoint_key(params.declared_values(), run.input_hashes)))
        parameters = count_parameters(model)
        if process.is_main:
            print(f"pretrain: {parameters:,} parameters, {sequences} sequences × {config.context_length} tokens per step, "
                  f"{settings.max_steps} steps, {process.world_size} process(es) on {process.device}", flush=True)
        result = train(model, settings, batches, evaluate, process, run, store)

        if process.is_main:
            unigram = unigram_bits_per_byte(train_tokens, validation_tokens, config.vocab_size, validation_counts["utf8_bytes"])
            train_rows = result.history["train"]
            metrics = {**result.final_metrics, "unigram_bpb": unigram, "parameters": parameters, "steps": settings.max_steps,
                       "tokens_trained": settings.max_steps * sequences * config.context_length,
                       "tokens_per_second": sum(r["tokens_per_second"] for r in train_rows) / max(len(train_rows), 1),
                       "peak_flops_per_second": settings.peak_flops_per_second}
            if train_rows and "model_flops_utilization" in train_rows[-1]:
                metrics["model_flops_utilization"] = sum(r["model_flops_utilization"] for r in train_rows) / len(train_rows)
            save_model(OUTPUT_DIR, model.cpu(), {"stage": "pretrain"})  # no timings: same weights, same files
            write_training_reports(REPORTS_DIR, result, metrics)
            run.log_metrics({k: v for k, v in metrics.items() if k not in result.final_metrics})
            run.log_artifact(OUTPUT_DIR / "config.json")
            store.clear()
            print(f"pretrain: val_bpb {metrics['val_bpb']:.3f} (unigram baseline {unigram:.3f}), "
                  f"val_loss {metrics['val_loss']:.3f}, {metrics['tokens_per_second']:.0f} tokens/s", flush=True)
        distributed.barrier()
    finally:
        distributed.stop()


if __name__ == "__main__":
    pretrain()
