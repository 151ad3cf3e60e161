"""Stage `pretrain`: train the transformer from scratch on next-token prediction over the token files,
or, with `base_model=hf`, import a Hugging Face Llama checkpoint instead (no training).

Params: model (the preset: `dvc exp run -S model=small`), pretrain (loop settings), seed, base_model
(`dvc exp run -S base_model=hf -S base_model.path=base_models/<checkpoint>`: the checkpoint's config
sets the model shape).
Output: models/pretrained/ (model.safetensors + config.json), reports/pretrain/metrics.json (DVC metrics:
final val_bpb, val_loss, unigram_bpb), details.json (parameters, steps, ...), timings.json (tokens per second,
model FLOPs utilization), {train,eval}_curve.csv (DVC plots).
Checkpoints go to checkpoints/pretrain/<key>/; a killed run resumes from the last one.
Run: `dvc repro pretrain`; data-parallel: `dvc exp run -S pretrain.processes=2` (the stage runs under
llmpipe.pipeline.launch, which is torchrun for N > 1), or by hand: `torchrun --nproc_per_node=2 stages/pretrain.py`;
sharded (FSDP2, for a model too large for one device): `dvc exp run -S pretrain.processes=2 -S pretrain.parallelism=fsdp`
(checkpoints are then resumable with any number of processes; the output is the same whole model).
"""

import functools

import torch

from llmpipe.data.tokens import open_tokens, read_meta
from llmpipe.eval.metrics import perplexity_metrics, unigram_bits_per_byte
from llmpipe.export.hf_import import import_checkpoint
from llmpipe.model import Transformer, count_parameters
from llmpipe.model_io import CONFIG_FILE, TOKENIZER_KEY, save_model
from llmpipe.pipeline import distributed, layout
from llmpipe.pipeline.params import StageParams
from llmpipe.pipeline.stage import stage
from llmpipe.pipeline.tracking import StageRun
from llmpipe.report.tables import PRETRAIN_HEADLINE, write_training_reports
from llmpipe.train.batches import RandomWindows
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.loop import shards, train
from llmpipe.train.settings import pretrain_settings


def import_base_model(params: StageParams, run: StageRun, meta: dict) -> None:
    """base_model=hf: the checkpoint's weights become models/pretrained, measured on the validation text."""
    source = params.str("base_model.path")
    model = import_checkpoint(source, meta["vocab_size"])
    counts = meta["splits"]["validation"]
    validation = perplexity_metrics(model, open_tokens("validation"), counts, params.int("pretrain.eval_max_tokens", min=2))
    metrics = {**validation, "parameters": count_parameters(model), "steps": 0, "tokens_trained": 0,
               "unigram_bpb": unigram_bits_per_byte(
                   open_tokens("train"), open_tokens("validation"), model.config.vocab_size, counts["utf8_bytes"])}
    timings = {"tokens_per_second": 0.0}
    save_model(layout.PRETRAINED, model, {"stage": "import", "source": source,
                                          TOKENIZER_KEY: meta.get("tokenizer_fingerprint")})
    write_training_reports(layout.PRETRAIN_REPORTS, {"train": [], "eval": [{"step": 0, **validation}]}, metrics,
                           PRETRAIN_HEADLINE, timings)
    run.log_facts({key: metrics[key] for key in FACTS})
    run.log_metrics({k: v for k, v in {**metrics, **timings}.items() if k not in FACTS})
    run.log_headline({k: metrics[k] for k in PRETRAIN_HEADLINE})
    run.log_artifact(layout.PRETRAIN_REPORTS, "reports")
    print(f"pretrain: imported {source} ({metrics['parameters']:,} parameters, context {model.config.context_length}); "
          f"val_bpb {metrics['val_bpb']:.3f}", flush=True)


FACTS = ("parameters", "steps", "tokens_trained")  # single numbers: MLflow params of the run


@stage("pretrain")
def pretrain(params: StageParams, run: StageRun) -> None:
    meta = read_meta()
    if params.str("base_model.source", choices=["scratch", "hf"]) == "hf":
        return import_base_model(params, run, meta)
    settings = pretrain_settings(params, meta["vocab_size"])
    config, batch, process = settings.model, settings.batch, distributed.start(settings.process)
    try:
        train_tokens, validation_tokens = open_tokens("train"), open_tokens("validation")
        validation_counts = meta["splits"]["validation"]
        torch.manual_seed(settings.seed)
        model = Transformer(config)
        parameters = count_parameters(model)
        batches = RandomWindows(train_tokens, config.context_length, batch.global_sequences, batch.micro_sequences,
                                settings.seed)
        evaluate = functools.partial(perplexity_metrics, tokens=validation_tokens, split_counts=validation_counts,
                                     max_tokens=settings.eval_max_tokens, batch_size=batch.micro_sequences,
                                     device=process.device)
        store = CheckpointStore.for_stage("pretrain", params.declared_values(), run.input_hashes)
        if process.is_main:
            print(f"pretrain: {parameters:,} parameters, {batch.global_sequences} sequences × {config.context_length} "
                  f"tokens per step, {settings.loop.max_steps} steps, {process.world_size} process(es) "
                  f"{'(FSDP2, sharded) ' if shards(settings.loop, process) else ''}on {process.device}, "
                  f"{settings.loop.precision}", flush=True)
        result = train(model, settings.loop, batches, evaluate, process, run, store)

        if process.is_main:
            unigram = unigram_bits_per_byte(train_tokens, validation_tokens, config.vocab_size,
                                            validation_counts["utf8_bytes"])
            metrics = {**result.final_metrics, "unigram_bpb": unigram, "parameters": parameters,
                       "steps": settings.loop.max_steps,
                       "tokens_trained": settings.loop.max_steps * batch.global_sequences * config.context_length}
            # Timings are machine noise: in MLflow and timings.json, never in the metrics DVC compares.
            timings = {"tokens_per_second": result.mean_of("tokens_per_second") or 0.0,
                       "peak_flops_per_second": settings.loop.peak_flops_per_second}
            if result.mean_of("model_flops_utilization") is not None:
                timings["model_flops_utilization"] = result.mean_of("model_flops_utilization")
            # No timings in the model directory: same weights, same files.
            # result.model: the trained weights, whole (gathered from the shards under FSDP).
            save_model(layout.PRETRAINED, result.model.cpu(), {"stage": "pretrain",
                                                               TOKENIZER_KEY: meta.get("tokenizer_fingerprint")})
            write_training_reports(layout.PRETRAIN_REPORTS, result.history, metrics, PRETRAIN_HEADLINE, timings)
            run.log_facts({key: metrics[key] for key in FACTS} | {
                "peak_flops_per_second": timings.pop("peak_flops_per_second"),
                "precision_used": settings.loop.precision})
            run.log_metrics({k: v for k, v in {**metrics, **timings}.items() if k not in result.final_metrics and k not in FACTS})
            run.log_headline({k: metrics[k] for k in PRETRAIN_HEADLINE})
            run.log_artifact(layout.PRETRAINED / CONFIG_FILE)
            run.log_artifact(layout.PRETRAIN_REPORTS, "reports")  # curves, metrics, details, timings
            store.clear()
            print(f"pretrain: val_bpb {metrics['val_bpb']:.3f} (unigram baseline {unigram:.3f}), "
                  f"val_loss {metrics['val_loss']:.3f}, {timings['tokens_per_second']:.0f} tokens/s", flush=True)
        distributed.barrier()
    finally:
        distributed.stop()


if __name__ == "__main__":
    pretrain()
