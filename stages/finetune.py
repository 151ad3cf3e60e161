"""Stage `finetune`: supervised instruction tuning of the pretrained model: chat tokens only, full or LoRA.

Examples are put in the chat template and the loss is taken on the answers only; the loop is the
pretraining one (llmpipe.train.loop). Every `eval_every` steps the validation people's QA accuracy picks
the best step (the output is that step, not the last). Before and after: exact-match QA accuracy of the
base and the fine-tuned model on every split, overall and per attribute (bounded for large models by
finetune.max_questions_per_split, max_validation_examples and measure_base: docs/scaling.md).
Run: `dvc repro finetune`; every weight: `dvc exp run -S finetune.method=full`; LoRA: `-S finetune.method=lora`;
sharded: `-S finetune.processes=2 -S finetune.parallelism=fsdp`. Chat: `llmpipe chat`. Outputs: dvc.yaml.
"""

import functools

import torch

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.chat_examples import example_statistics, read_prepared_examples
from llmpipe.data.jsonl import read_rows
from llmpipe.data.sampling import first_items
from llmpipe.eval.qa import answer_loss, qa_metrics
from llmpipe.model.lora import add_lora, check_rank, merge_lora, nf4_as_loaded, save_adapter
from llmpipe.model.weights import (
    CONFIG_FILE,
    TOKENIZER_KEY,
    WEIGHTS_FILE,
    cast_weights,
    check_model_directory,
    empty_model,
    load_state_into,
    read_weight,
    write_model,
)
from llmpipe.report.markdown import finetune_samples
from llmpipe.report.publish import flag_chance_level, publish_training
from llmpipe.report.tables import FINETUNE_METRICS
from llmpipe.runner import distributed
from llmpipe.runner.stage import stage
from llmpipe.text.chat_template import ChatTemplate
from llmpipe.text.tokenizer import LoadedTokenizer
from llmpipe.tracking.stage_run import StageRun
from llmpipe.train.chat_tokens import chat_token_ids, train_only_token_rows
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.example_batches import EpochBatches
from llmpipe.train.finetune_settings import FinetuneSettings, finetune_settings
from llmpipe.train.loop import chance_level_warning, shards, train


def measure(model, template, qa_sets, validation, settings, prefix="") -> tuple[dict, dict]:
    """QA accuracy on every split and the validation answer loss: before, during and after fine-tuning."""
    metrics = {}
    if validation:
        metrics[f"{prefix}val_answer_loss"] = answer_loss(model, validation, template.tokenizer.end_of_document_id,
                                                          settings.batch.micro_sequences, label="finetune: ")
    qa, answers = qa_metrics(model, template, qa_sets, settings.finetune.max_new_tokens, prefix, label="finetune: ",
                             padded=settings.finetune.pad_prompts)
    return {**metrics, **qa}, answers


def encode_examples(template: ChatTemplate, examples: dict[str, list], context: int, is_main: bool):
    """The training and validation examples in the chat template, cut to the context; says what was cut."""
    train_encoded, truncated = template.encode_examples(examples["train"], context)
    validation, validation_truncated = template.encode_examples(examples["validation"], context)
    counts = {"truncated_examples": truncated + validation_truncated,
              "examples_without_answer_after_truncation": len(examples["train"]) - len(train_encoded)}
    if counts["truncated_examples"] and is_main:
        print(f"warning: {counts['truncated_examples']} fine-tuning examples are longer than the {context}-token "
              f"context and were truncated ({counts['examples_without_answer_after_truncation']} training examples "
              "lost their whole answer and were left out)", flush=True)
    return train_encoded, validation, counts


def prepare_method(model, settings: FinetuneSettings, chat_ids: list[int], device) -> None:
    """Make only what the method trains trainable: LoRA adapters (fp32, over the frozen weights in their own dtype),
    the chat tokens' embedding rows, or every weight; what trains is held in fp32 (its master copy)."""
    torch.manual_seed(settings.seed)  # LoRA initialization and dropout
    if settings.lora:
        add_lora(model, settings.lora)
        model.to(device)
    elif settings.finetune.method == "chat_tokens":
        # Not end_of_document's row: it starts every plain-text document, and it is the output head's too.
        train_only_token_rows(model, chat_ids)
    else:
        cast_weights(model, torch.float32)


def finetune_model(settings: FinetuneSettings, params: StageParams, run: StageRun) -> None:
    process = settings.process
    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    template = ChatTemplate(tokenizer)
    chat_ids = chat_token_ids(template) if settings.finetune.method == "chat_tokens" else []  # refused now, before any work
    examples = {split: read_prepared_examples(path) for split, path in layout.FINETUNE_EXAMPLES.items()}
    qa_sets = {split: first_items(read_rows(path), settings.finetune.max_questions_per_split)
               for split, path in layout.QA_FILES.items()}
    model = empty_model(check_model_directory(layout.PRETRAINED, tokenizer)[1])
    if settings.lora:  # refused before the weights are read
        check_rank(model, settings.lora, f"{params.source}: finetune.lora")
    # QLoRA: each target weight becomes NF4 as it is read, so the 16-bit base is never held whole
    load_state_into(model, layout.PRETRAINED / WEIGHTS_FILE,
                    convert=nf4_as_loaded(settings.lora) if settings.lora and settings.lora.base_bits == 4 else None)
    model.to(process.device)
    stored_as = model.dtype  # the output keeps it (bf16 in, bf16 out)
    train_encoded, validation, cut = encode_examples(template, examples, model.config.context_length, process.is_main)
    validation = first_items(validation, settings.finetune.max_validation_examples)
    measured = {f"qa_questions_{split}": len(pairs) for split, pairs in qa_sets.items()}
    measured["validation_examples_measured"] = len(validation)

    model.eval()
    base_metrics, base_answers = (measure(model, template, qa_sets, validation, settings, prefix="base_")
                                  if settings.finetune.measure_base else ({}, {}))
    prepare_method(model, settings, chat_ids, process.device)

    def evaluate(current) -> dict[str, float]:  # every eval_every steps: picks the best step
        return measure(current, template, {"validation_people": qa_sets["validation_people"]}, validation, settings)[0]

    batches = EpochBatches(train_encoded, settings.batch.global_sequences, settings.batch.micro_sequences,
                           tokenizer.end_of_document_id, settings.seed)
    store = CheckpointStore.for_stage("finetune", params.declared_values(), run.input_hashes)
    if process.is_main:
        sharding = " (FSDP2, sharded)" if shards(settings.finetune, process) else ""
        print(f"finetune: {settings.finetune.method} (learning rate {settings.finetune.learning_rate:g}), {len(train_encoded)} "
              f"examples, {settings.finetune.max_steps} steps of {settings.batch.global_sequences}{sharding}; base model: "
              + (", ".join(f"{k} {v:.3f}" for k, v in base_metrics.items() if k.endswith(("_people", "_loss")))
                 or "not measured (finetune.measure_base)"), flush=True)
    result = train(model, settings.finetune, batches, evaluate, process, run, store)
    if not process.is_main:
        return

    trained = result.model.cpu()  # whole (gathered from the shards under FSDP)
    with atomic.atomic_path(layout.FINETUNED, directory=True) as temp:
        if settings.lora:
            save_adapter(trained, settings.lora, temp)
            # QLoRA: into the weights as stored (read a layer at a time), not their NF4 approximation
            stored = (functools.partial(read_weight, layout.PRETRAINED / WEIGHTS_FILE, dtype=stored_as)
                      if settings.lora.base_bits == 4 else None)
            merge_lora(trained, stored)  # in place: no second copy of the weights
        final_model = cast_weights(trained, stored_as).eval()  # measured as written
        final_metrics, answers = measure(final_model, template, qa_sets, validation, settings)
        warning = chance_level_warning("finetune", "val_answer_loss", final_metrics, final_model.config.vocab_size)
        statistics = example_statistics(examples["train"])
        metrics = {**final_metrics, **base_metrics, **flag_chance_level(run, warning),
                   "best_step": result.best_step or settings.finetune.max_steps,
                   "train_examples": statistics["examples"], "duplicate_examples": statistics["duplicate_examples"],
                   "empty_examples": statistics["empty_examples"], **cut, **measured}
        write_model(temp, final_model, {"stage": "finetune", "method": settings.finetune.method,
                                        "best_step": metrics["best_step"], TOKENIZER_KEY: tokenizer.fingerprint})
    atomic.write_text(layout.FINETUNE_REPORTS / layout.SAMPLES,
                      finetune_samples(answers, base_answers, settings.finetune.sample_answers, warning))
    publish_training(run, layout.FINETUNE_REPORTS, result.history, metrics, FINETUNE_METRICS)
    run.log_artifact(layout.FINETUNED / CONFIG_FILE)
    store.clear()
    print("finetune: best step {best_step}; ".format(**metrics) + ", ".join(
        f"{k} {metrics.get(k, float('nan')):.3f} (base {metrics.get('base_' + k, float('nan')):.3f})"
        for k in ("qa_accuracy_finetuned_people", "qa_accuracy_validation_people", "qa_accuracy_heldout_people")),
        flush=True)


def read_settings(params: StageParams) -> FinetuneSettings:
    """The finetune section, with the best step picked by what the prepared data holds for validation."""
    qa_files_have_validation_people = bool(read_rows(layout.QA_FILES["validation_people"]))
    examples_have_validation = bool(read_prepared_examples(layout.FINETUNE_EXAMPLES["validation"]))
    return finetune_settings(params, validation_people=qa_files_have_validation_people,
                             validation_examples=examples_have_validation)


@stage("finetune", read_settings)
def finetune(settings: FinetuneSettings, params: StageParams, run: StageRun) -> None:
    run.log_effective_params({"finetune.learning_rate": settings.finetune.learning_rate,  # null: the method's rate
                              "finetune.min_learning_rate": settings.finetune.min_learning_rate})
    with distributed.joined(settings.process):
        finetune_model(settings, params, run)


if __name__ == "__main__":
    finetune()
