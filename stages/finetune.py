"""Stage `finetune`: supervised instruction tuning of the pretrained model, full or LoRA.

Examples (data/prepared/finetune_*.jsonl) are put in the chat template built from the tokenizer's
special tokens; the loss is taken on the answers only. The training loop is the pretraining one
(llmpipe.training). Every `eval_every` steps: validation answer loss and exact-match accuracy on the
validation people's questions, which picks the best step (the output is that step, not the last).
At the end, greedy exact-match accuracy on the fine-tuned, validation and held-out people's questions,
overall and per attribute, for the base model and the fine-tuned one.

Params: finetune (method full|lora, LoRA rank/alpha/dropout/targets, loop settings), seed.
Output: models/finetuned/ (merged model.safetensors + config.json; with LoRA also lora_adapter.*),
reports/finetune/ (metrics.json, train/eval curves, samples.md).
Run: `dvc repro finetune`; LoRA: `dvc exp run -S finetune.method=lora`. Chat: `llmpipe chat`.
"""

from pathlib import Path

import torch

from llmpipe import atomic, distributed
from llmpipe.chat_template import ChatTemplate
from llmpipe.checkpoint import CheckpointStore, checkpoint_key, default_directory
from llmpipe.errors import ParamError
from llmpipe.finetune_data import EpochBatches, answer_loss, encode_examples, example_statistics, read_examples
from llmpipe.lora import TARGETABLE, LoRASettings, add_lora, merged_copy, save_adapter
from llmpipe.model_io import load_model, write_model
from llmpipe.params import StageParams
from llmpipe.qa_eval import qa_accuracy
from llmpipe.stage import stage
from llmpipe.tokenizer import LoadedTokenizer
from llmpipe.training import train
from llmpipe.training_params import train_settings
from llmpipe.training_reports import write_training_reports
from llmpipe.tracking import StageRun

PREPARED = Path("data/prepared")
PRETRAINED = Path("models/pretrained")
TOKENIZER_DIR = Path("models/tokenizer")
OUTPUT_DIR = Path("models/finetuned")
REPORTS_DIR = Path("reports/finetune")
QA_SPLITS = {"finetuned_people": "qa_finetune_people.jsonl", "validation_people": "qa_validation_people.jsonl",
             "heldout_people": "qa_heldout_people.jsonl"}
SELECTION_METRIC = "qa_accuracy_validation_people"


def lora_settings(params: StageParams) -> LoRASettings:
    return LoRASettings(rank=params.int("finetune.lora.rank", min=1),
                        alpha=params.float("finetune.lora.alpha", above=0),
                        dropout=params.float("finetune.lora.dropout", min=0, max=0.9),
                        target_modules=tuple(params.str_list("finetune.lora.target_modules", choices=list(TARGETABLE))))


def all_qa_metrics(model, template, qa_sets, max_new_tokens, prefix=""):
    metrics, answers = {}, {}
    for split, pairs in qa_sets.items():
        split_metrics, answers[split] = qa_accuracy(model, template, pairs, max_new_tokens, f"{prefix}qa_accuracy_{split}")
        metrics.update(split_metrics)
    return metrics, answers


def samples_report(answers: dict, base_answers: dict, count: int) -> str:
    lines = ["# Fine-tuning: sample answers", "", "Greedy answers in the chat format, before and after fine-tuning.", ""]
    for split, results in answers.items():
        if not results:
            continue
        lines += [f"## {split.replace('_', ' ')}", "", "| question | expected | base model | fine-tuned |", "|---|---|---|---|"]
        for result, base in list(zip(results, base_answers[split]))[:count]:
            mark = "✓" if result["correct"] else "✗"
            lines.append(f"| {result['question']} | {result['expected']} | {base['answer'].strip() or '(empty)'} | "
                         f"{mark} {result['answer'].strip() or '(empty)'} |")
        lines.append("")
    return "\n".join(lines)


@stage("finetune")
def finetune(params: StageParams, run: StageRun) -> None:
    method = params.str("finetune.method", choices=["full", "lora"])
    settings = train_settings(params, "finetune")
    global_batch = params.int("finetune.global_batch_sequences", min=1)
    micro = params.int("finetune.micro_batch_sequences", min=1)
    if global_batch % micro:
        raise ParamError(f"params.yaml: finetune.global_batch_sequences ({global_batch}) must be a multiple of "
                         f"finetune.micro_batch_sequences ({micro})")
    max_new_tokens = params.int("finetune.max_new_tokens", min=1)
    sample_count = params.int("finetune.sample_answers", min=0)
    seed = params.int("seed")
    lora = lora_settings(params) if method == "lora" else None
    params.int("finetune.processes", min=1)  # used by the stage's launch command in dvc.yaml
    process = distributed.start(params.str("finetune.device", choices=["auto", "cpu", "cuda"]))
    try:
        tokenizer = LoadedTokenizer(TOKENIZER_DIR)
        template = ChatTemplate(tokenizer)
        model, _ = load_model(PRETRAINED, device=str(process.device))
        context = model.config.context_length
        train_examples = read_examples(PREPARED / "finetune_train.jsonl")
        statistics = example_statistics(train_examples)
        train_encoded, truncated = encode_examples(template, train_examples, context)
        validation_encoded, validation_truncated = encode_examples(
            template, read_examples(PREPARED / "finetune_validation.jsonl"), context)
        dropped = len(train_examples) - len(train_encoded)
        if truncated + validation_truncated and process.is_main:
            print(f"warning: {truncated + validation_truncated} fine-tuning examples are longer than the "
                  f"{context}-token context and were truncated ({dropped} training examples lost their whole "
                  "answer and were left out)", flush=True)
        qa_sets = {split: read_examples(PREPARED / name) for split, name in QA_SPLITS.items()}
        pad_id = tokenizer.end_of_document_id

        model.eval()
        base_metrics, base_answers = all_qa_metrics(model, template, qa_sets, max_new_tokens, prefix="base_")
        if validation_encoded:
            base_metrics["base_val_answer_loss"] = answer_loss(model, validation_encoded, pad_id, micro)
        torch.manual_seed(seed)  # LoRA initialization and dropout
        if lora:
            add_lora(model, lora)
            model.to(process.device)
        settings.best_metric, settings.best_mode = ((SELECTION_METRIC, "max") if qa_sets["validation_people"]
                                                    else ("val_answer_loss", "min") if validation_encoded else (None, "min"))

        def evaluate(current) -> dict[str, float]:
            metrics = {}
            if validation_encoded:
                metrics["val_answer_loss"] = answer_loss(current, validation_encoded, pad_id, micro)
            if qa_sets["validation_people"]:
                metrics.update(qa_accuracy(current, template, qa_sets["validation_people"], max_new_tokens,
                                           SELECTION_METRIC)[0])
            return metrics

        batches = EpochBatches(train_encoded, global_batch, micro, pad_id, seed)
        store = CheckpointStore(default_directory("finetune", checkpoint_key(params.declared_values(), run.input_hashes)))
        if process.is_main:
            print(f"finetune: {method}, {len(train_encoded)} examples, {settings.max_steps} steps of {global_batch}; "
                  "base model: " + ", ".join(f"{k} {v:.3f}" for k, v in base_metrics.items()
                                             if k.endswith(("_people", "_loss"))), flush=True)
        result = train(model, settings, batches, evaluate, process, run, store)

        if process.is_main:
            final_model = merged_copy(model.cpu()) if lora else model.cpu().eval()
            final_metrics, answers = all_qa_metrics(final_model, template, qa_sets, max_new_tokens)
            if validation_encoded:
                final_metrics["val_answer_loss"] = answer_loss(final_model, validation_encoded, pad_id, micro)
            metrics = {**final_metrics, **base_metrics, "best_step": result.best_step or settings.max_steps,
                       "train_examples": statistics["examples"], "duplicate_examples": statistics["duplicate_examples"],
                       "empty_examples": statistics["empty_examples"], "truncated_examples": truncated + validation_truncated,
                       "examples_without_answer_after_truncation": dropped}
            with atomic.atomic_path(OUTPUT_DIR, directory=True) as temp:
                write_model(temp, final_model, {"stage": "finetune", "method": method, "best_step": metrics["best_step"]})
                if lora:
                    save_adapter(model, lora, temp)
            write_training_reports(REPORTS_DIR, result, metrics)
            samples = samples_report(answers, base_answers, sample_count)
            atomic.write_text(REPORTS_DIR / "samples.md", samples)
            run.log_metrics(metrics)
            run.log_text(samples, "samples.md")
            run.log_artifact(OUTPUT_DIR / "config.json")
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
