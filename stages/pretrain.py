"""Stage `pretrain`: train the transformer from scratch on next-token prediction over the token files,
or, with `base_model=hf`, import a Hugging Face checkpoint instead (no training).

Run: `dvc repro pretrain`; a bigger preset: `dvc exp run -S model=small`; data-parallel:
`dvc exp run -S pretrain.processes=2` (torchrun under llmpipe.runner.launch), sharded:
`-S pretrain.parallelism=fsdp`; a checkpoint instead: `dvc exp run -S base_model=hf -S base_model.path=DIR`.
A killed run resumes from its last checkpoint (checkpoints/pretrain/<key>/). Outputs: dvc.yaml.
"""

import functools

import torch

from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.tokens import open_tokens, read_meta
from llmpipe.eval.metrics import perplexity_metrics, unigram_bits_per_byte
from llmpipe.hf.base_model import BaseModelSettings, base_model_settings
from llmpipe.hf.checkpoint import import_checkpoint
from llmpipe.model.transformer import Transformer, count_parameters
from llmpipe.model.weights import CONFIG_FILE, MODEL_DTYPES, TOKENIZER_KEY, dtype_name, save_model
from llmpipe.report.publish import flag_chance_level, publish_training
from llmpipe.report.tables import PRETRAIN_METRICS
from llmpipe.runner import distributed
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.runner.stage import stage
from llmpipe.tracking.stage_run import StageRun
from llmpipe.train.batches import RandomWindows
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.loop import chance_level_warning, shards, train
from llmpipe.train.settings import PretrainParams, PretrainSettings, pretrain_settings


def unigram_baseline(model_vocab_size: int, validation_bytes: int) -> float:
    """Bits per byte of the unigram distribution of the training tokens: what a model that learned nothing
    about context would score."""
    return unigram_bits_per_byte(open_tokens("train"), open_tokens("validation"), model_vocab_size, validation_bytes)


def import_base_model(base_model: BaseModelSettings, eval_max_tokens: int, run: StageRun, meta: dict) -> None:
    """base_model=hf: the checkpoint's weights become models/pretrained (in their own dtype unless
    base_model.dtype says another), measured on the validation text."""
    source = base_model.path
    model = import_checkpoint(source, meta["vocab_size"], MODEL_DTYPES.get(base_model.dtype))
    counts = meta["splits"]["validation"]
    validation = perplexity_metrics(model, open_tokens("validation"), counts, eval_max_tokens)
    metrics = {**validation, "unigram_bpb": unigram_baseline(model.config.vocab_size, counts["utf8_bytes"])}
    save_model(layout.PRETRAINED, model, {"stage": "import", "source": source,
                                          TOKENIZER_KEY: meta.get("tokenizer_fingerprint")})
    facts = {"parameters": count_parameters(model), "steps": 0, "tokens_trained": 0}
    publish_training(run, layout.PRETRAIN_REPORTS, {"train": [], "eval": [{"step": 0, **validation}]},
                     {**metrics, **facts}, PRETRAIN_METRICS, facts=facts, timings={"tokens_per_second": 0.0})
    print(f"pretrain: imported {source} ({facts['parameters']:,} parameters in {dtype_name(model.dtype)}, context "
          f"{model.config.context_length}); "
          f"val_bpb {metrics['val_bpb']:.3f}", flush=True)


def train_from_scratch(settings: PretrainSettings, params: StageParams, run: StageRun, meta: dict) -> None:
    config, batch, process = settings.model, settings.batch, settings.process
    validation_counts = meta["splits"]["validation"]
    torch.manual_seed(settings.seed)
    model = Transformer(config)
    parameters = count_parameters(model)
    batches = RandomWindows(open_tokens("train"), config.context_length, batch.global_sequences, batch.micro_sequences,
                            settings.seed)
    evaluate = functools.partial(perplexity_metrics, tokens=open_tokens("validation"), split_counts=validation_counts,
                                 max_tokens=settings.eval_max_tokens, batch_size=batch.micro_sequences,
                                 device=process.device)
    # Before training: it reads every token once, so a token id outside the vocabulary is refused now.
    unigram_bpb = unigram_baseline(config.vocab_size, validation_counts["utf8_bytes"])
    store = CheckpointStore.for_stage("pretrain", params.declared_values(), run.input_hashes)
    if process.is_main:
        print(f"pretrain: {parameters:,} parameters, {batch.global_sequences} sequences × {config.context_length} "
              f"tokens per step, {settings.pretrain.max_steps} steps, {process.world_size} process(es) "
              f"{'(FSDP2, sharded) ' if shards(settings.pretrain, process) else ''}on {process.device}, "
              f"{settings.pretrain.precision}", flush=True)
    result = train(model, settings.pretrain, batches, evaluate, process, run, store)
    if not process.is_main:
        return
    facts = {"parameters": parameters, "steps": settings.pretrain.max_steps,
             "tokens_trained": settings.pretrain.max_steps * batch.global_sequences * config.context_length}
    chance = flag_chance_level(run, chance_level_warning("pretrain", "val_loss", result.final_metrics,
                                                        config.vocab_size))
    metrics = {**result.final_metrics, "unigram_bpb": unigram_bpb, **facts, **chance}
    # Timings are machine noise: in MLflow and timings.json, never in the metrics DVC compares.
    timings = {"tokens_per_second": result.mean_of("tokens_per_second") or 0.0,
               "peak_flops_per_second": settings.pretrain.peak_flops_per_second}
    if result.mean_of("model_flops_utilization") is not None:
        timings["model_flops_utilization"] = result.mean_of("model_flops_utilization")
    # result.model: the trained weights, whole (gathered from the shards under FSDP). No timings in the model
    # directory: same weights, same files.
    save_model(layout.PRETRAINED, result.model.cpu(), {"stage": "pretrain",
                                                       TOKENIZER_KEY: meta.get("tokenizer_fingerprint")})
    publish_training(run, layout.PRETRAIN_REPORTS, result.history, metrics, PRETRAIN_METRICS, timings=timings,
                     facts={**facts, "peak_flops_per_second": timings["peak_flops_per_second"],
                            "precision_used": settings.pretrain.precision},
                     in_curves=result.final_metrics)
    run.log_artifact(layout.PRETRAINED / CONFIG_FILE)
    store.clear()
    print(f"pretrain: val_bpb {metrics['val_bpb']:.3f} (unigram baseline {metrics['unigram_bpb']:.3f}), "
          f"val_loss {metrics['val_loss']:.3f}, {timings['tokens_per_second']:.0f} tokens/s", flush=True)


def pretrain_inputs(params: StageParams) -> tuple[dict, BaseModelSettings, PretrainSettings | PretrainParams]:
    """The token files' metadata, the base model's settings and either the complete training settings or, to
    import a checkpoint, the pretrain section."""
    meta = read_meta()
    base_model = base_model_settings(params)
    if base_model.source == "hf":
        return meta, base_model, params.read(PretrainParams)
    return meta, base_model, pretrain_settings(params, meta["vocab_size"])


@stage("pretrain", pretrain_inputs)
def pretrain(inputs: tuple[dict, BaseModelSettings, PretrainSettings | PretrainParams], params: StageParams,
             run: StageRun) -> None:
    meta, base_model, settings = inputs
    if base_model.source == "hf":
        with Heartbeat("pretrain: importing:", None):
            return import_base_model(base_model, settings.eval_max_tokens, run, meta)
    run.log_effective_params(settings.effective_params())
    with distributed.joined(settings.process):
        train_from_scratch(settings, params, run, meta)


if __name__ == "__main__":
    pretrain()
