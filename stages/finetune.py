"""Stage `finetune`: supervised instruction tuning of the pretrained model: chat tokens only, full or LoRA.

Examples (data/prepared/finetune_*.jsonl) are put in the chat template built from the tokenizer's
special tokens; the loss is taken on the answers only. The training loop is the pretraining one
(llmpipe.train.loop). Every `eval_every` steps: validation answer loss and exact-match accuracy on the
validation people's questions, which picks the best step (the output is that step, not the last).
At the end, greedy exact-match accuracy on the fine-tuned, validation and held-out people's questions,
overall and per attribute, for the base model and the fine-tuned one.

Params: finetune (method chat_tokens|full|lora, LoRA rank/alpha/dropout/targets, loop settings), seed.
chat_tokens (the default) trains only the chat template's token rows of the embedding (llmpipe/chat_tokens.py).
Output: models/finetuned/ (merged model.safetensors + config.json; with LoRA also lora_adapter.*),
reports/finetune/: metrics.json (DVC metrics: QA accuracy per split, validation answer loss, best step),
details.json (per attribute, the base model's numbers, example statistics), train/eval curves, samples.md.
Run: `dvc repro finetune`; every weight: `dvc exp run -S finetune.method=full`; LoRA: `-S finetune.method=lora`
(a null finetune.learning_rate takes the method's own); full or LoRA sharded over processes (FSDP2; with LoRA,
frozen base weights and adapters in the same units): `-S finetune.processes=2 -S finetune.parallelism=fsdp`.
Chat: `llmpipe chat`.
"""

import torch

from llmpipe.chat_template import ChatTemplate
from llmpipe.chat_tokens import chat_token_ids, train_only_token_rows
from llmpipe.data.chat_examples import example_statistics, read_prepared_examples
from llmpipe.data.jsonl import read_rows
from llmpipe.eval.metrics import answer_loss
from llmpipe.eval.qa import qa_metrics
from llmpipe.lora import add_lora, merged_copy, save_adapter
from llmpipe.model_io import CONFIG_FILE, TOKENIZER_KEY, load_model, write_model
from llmpipe.pipeline import atomic, distributed, layout
from llmpipe.pipeline.params import StageParams
from llmpipe.pipeline.stage import stage
from llmpipe.pipeline.tracking import StageRun
from llmpipe.report.markdown import finetune_samples
from llmpipe.report.tables import FINETUNE_HEADLINE, write_training_reports
from llmpipe.tokenizer import LoadedTokenizer
from llmpipe.train.batches import EpochBatches
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.loop import shards, train
from llmpipe.train.settings import finetune_settings


def measure(model, template, qa_sets, validation, settings, prefix="") -> tuple[dict, dict]:
    """QA accuracy on every split and the validation answer loss: before, during and after fine-tuning."""
    metrics = {}
    if validation:
        metrics[f"{prefix}val_answer_loss"] = answer_loss(model, validation, template.tokenizer.end_of_document_id,
                                                          settings.batch.micro_sequences)
    qa, answers = qa_metrics(model, template, qa_sets, settings.max_new_tokens, prefix)
    return {**metrics, **qa}, answers


@stage("finetune")
def finetune(params: StageParams, run: StageRun) -> None:
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    template = ChatTemplate(tokenizer)
    examples = {split: read_prepared_examples(path) for split, path in layout.FINETUNE_EXAMPLES.items()}
    qa_sets = {split: read_rows(path) for split, path in layout.QA_FILES.items()}
    settings = finetune_settings(params, validation_people=bool(qa_sets["validation_people"]),
                                 validation_examples=bool(examples["validation"]))
    process = distributed.start(settings.process)
    try:
        model, _ = load_model(layout.PRETRAINED, device=str(process.device), tokenizer=tokenizer)
        context = model.config.context_length
        train_encoded, truncated = template.encode_examples(examples["train"], context)
        validation, validation_truncated = template.encode_examples(examples["validation"], context)
        dropped = len(examples["train"]) - len(train_encoded)
        if truncated + validation_truncated and process.is_main:
            print(f"warning: {truncated + validation_truncated} fine-tuning examples are longer than the "
                  f"{context}-token context and were truncated ({dropped} training examples lost their whole "
                  "answer and were left out)", flush=True)

        model.eval()
        base_metrics, base_answers = measure(model, template, qa_sets, validation, settings, prefix="base_")
        torch.manual_seed(settings.seed)  # LoRA initialization and dropout
        if settings.lora:
            add_lora(model, settings.lora)
            model.to(process.device)
        elif settings.method == "chat_tokens":
            # Not end_of_document's row: it starts every plain-text document, and it is the output head's too.
            train_only_token_rows(model, chat_token_ids(tokenizer))

        def evaluate(current) -> dict[str, float]:  # every eval_every steps: picks the best step
            return measure(current, template, {"validation_people": qa_sets["validation_people"]}, validation,
                           settings)[0]

        batches = EpochBatches(train_encoded, settings.batch.global_sequences, settings.batch.micro_sequences,
                               tokenizer.end_of_document_id, settings.seed)
        store = CheckpointStore.for_stage("finetune", params.declared_values(), run.input_hashes)
        if process.is_main:
            sharding = " (FSDP2, sharded)" if shards(settings.loop, process) else ""
            print(f"finetune: {settings.method} (learning rate {settings.loop.learning_rate:g}), {len(train_encoded)} "
                  f"examples, {settings.loop.max_steps} steps of "
                  f"{settings.batch.global_sequences}{sharding}; base model: " + ", ".join(
                      f"{k} {v:.3f}" for k, v in base_metrics.items() if k.endswith(("_people", "_loss"))), flush=True)
        result = train(model, settings.loop, batches, evaluate, process, run, store)

        if process.is_main:
            trained = result.model.cpu()  # whole (gathered from the shards under FSDP)
            final_model = merged_copy(trained) if settings.lora else trained.eval()
            final_metrics, answers = measure(final_model, template, qa_sets, validation, settings)
            statistics = example_statistics(examples["train"])
            metrics = {**final_metrics, **base_metrics, "best_step": result.best_step or settings.loop.max_steps,
                       "train_examples": statistics["examples"], "duplicate_examples": statistics["duplicate_examples"],
                       "empty_examples": statistics["empty_examples"], "truncated_examples": truncated + validation_truncated,
                       "examples_without_answer_after_truncation": dropped}
            with atomic.atomic_path(layout.FINETUNED, directory=True) as temp:
                write_model(temp, final_model, {"stage": "finetune", "method": settings.method,
                                                "best_step": metrics["best_step"], TOKENIZER_KEY: tokenizer.fingerprint})
                if settings.lora:
                    save_adapter(trained, settings.lora, temp)
            write_training_reports(layout.FINETUNE_REPORTS, result.history, metrics, FINETUNE_HEADLINE)
            samples = finetune_samples(answers, base_answers, settings.sample_answers)
            atomic.write_text(layout.FINETUNE_REPORTS / layout.SAMPLES, samples)
            run.log_metrics(metrics)
            run.log_headline({k: v for k, v in metrics.items() if k == "best_step" or k in (
                f"{prefix}qa_accuracy_{split}" for prefix in ("", "base_") for split in layout.QA_SPLITS)})
            run.log_text(samples, layout.SAMPLES)
            run.log_artifact(layout.FINETUNED / CONFIG_FILE)
            store.clear()
            print("finetune: best step {best_step}; ".format(**metrics) + ", ".join(
                f"{k} {metrics.get(k, float('nan')):.3f} (base {metrics.get('base_' + k, float('nan')):.3f})"
                for k in ("qa_accuracy_finetuned_people", "qa_accuracy_validation_people", "qa_accuracy_heldout_people")),
                flush=True)
        distributed.barrier()
    finally:
        distributed.stop()


if __name__ == "__main__":
    finetune()
