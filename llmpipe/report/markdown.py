"""Every Markdown report of the pipeline, for a person to read: the tokenizer report, the quantization
size table, sample answers (fine-tuning and evaluation), and the evaluation report."""

from __future__ import annotations

from llmpipe.data.sampling import spread_sample
from llmpipe.report.tables import CHANCE_METRIC
from llmpipe.text.tokenizer import (
    EXAMPLE_STRINGS,
    LoadedTokenizer,
    longest_learned_tokens,
)

SPLIT_TITLES = {"finetuned_people": "fine-tuned people (their questions were in the fine-tuning set)",
                "validation_people": "validation people (their questions picked the best fine-tuning step)",
                "heldout_people": "held-out people (known from pretraining only, never in fine-tuning)"}


def split_title(split: str) -> str:
    return SPLIT_TITLES.get(split, split.replace("_", " "))


def cell(text: str) -> str:
    """Text that stays inside one Markdown table cell (pipes escaped, line breaks as spaces)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def tokenizer_report(tokenizer: LoadedTokenizer, metrics: dict, validation_example: str | None,
                     longest: int = 15) -> str:
    """The vocabulary, characters per token, the sample BPE learned from (when trained here), and how example
    strings and the first sentence of `validation_example` (the first validation document) split."""
    lines = ["# Tokenizer report", "",
             f"Vocabulary: {tokenizer.vocab_size} tokens (256 bytes, {len(tokenizer.special_ids)} special, "
             f"the rest learned merges).", ""]
    if "train_sample_bytes" in metrics:
        lines += [f"Learned from {metrics['train_sample_documents']:,} documents, {metrics['train_sample_bytes']:,} "
                  "UTF-8 bytes of the training text: "
                  + ("the whole corpus." if metrics["train_sample_whole_corpus"] else
                     "its first documents, up to tokenizer.train_sample_bytes (the corpus is larger)."), ""]
    lines += [f"On the validation text: {metrics['validation_characters_per_token']:.2f} characters per token, "
              f"{metrics['validation_tokens_per_100_words']:.1f} tokens per 100 words.", "",
              "| text | tokens | pieces |", "|---|---:|---|"]
    examples = EXAMPLE_STRINGS + ([validation_example.split(". ")[0] + "."] if validation_example else [])
    for text in examples:
        ids = tokenizer.encode(text)
        pieces = " · ".join(repr(p)[1:-1].replace("|", "\\|") for p in tokenizer.token_strings(ids))
        lines.append(f"| {text} | {len(ids)} | {pieces} |")
    lines += ["", "Longest learned tokens: " + ", ".join(repr(t) for t in longest_learned_tokens(tokenizer, longest)), ""]
    return "\n".join(lines)


def _answer(result: dict) -> str:
    return cell(result["answer"].strip()) or "(empty)"


def finetune_samples(answers: dict[str, list[dict]], base_answers: dict[str, list[dict]], count: int,
                     warning: str | None = None) -> str:
    """Greedy answers per QA split, before and after fine-tuning, spread over the split's people; `warning` (a model
    no better than chance) first."""
    lines = ["# Fine-tuning: sample answers", "", "Greedy answers in the chat format, before and after fine-tuning.", ""]
    lines += [f"**Warning:** {warning}.", ""] if warning else []
    for split, results in answers.items():
        if not results:
            continue
        lines += [f"## {split_title(split)}", "", "| question | expected | base model | fine-tuned |", "|---|---|---|---|"]
        bases = base_answers.get(split) or [None] * len(results)  # None: the base model was not measured
        for result, base in spread_sample(list(zip(results, bases)), count):
            mark = "✓" if result["correct"] else "✗"
            lines.append(f"| {cell(result['question'])} | {cell(result['expected'])} | "
                         f"{_answer(base) if base else '(not measured)'} | "
                         f"{mark} {_answer(result)} |")
        lines.append("")
    return "\n".join(lines)


def size_table(rows: list[dict], parameters: int) -> str:
    lines = [f"# Quantization: sizes of the fine-tuned model ({parameters:,} parameters)", "",
             "Bits per weight and ratios count the weights' bytes; file bytes add the metadata and tokenizer "
             "(about the same for every variant, large next to a model this small).", "",
             "| format | bits/weight | weight bytes | file bytes | vs fp32 | vs fp16 | tensor types |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        types = ", ".join(f"{name}×{count}" for name, count in sorted(row["tensor_types"].items()))
        lines.append(f"| {row['format']} | {row['bits_per_weight']:.3f} | {row['tensor_bytes']:,} | {row['file_bytes']:,} | "
                     f"{row['ratio_to_fp32']:.3f} | {row['ratio_to_fp16']:.3f} | {types} |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def best_pretrain_step_note(pretrain_eval_curve: list[dict]) -> str:
    """Where validation loss was lowest, when that is not the end (the weights kept are the final ones)."""
    rows = [row for row in pretrain_eval_curve if "val_loss" in row]
    if len(rows) < 2:
        return ""
    best, last = min(rows, key=lambda row: row["val_loss"]), rows[-1]
    if best["step"] == last["step"]:
        return " Validation loss was lowest at the last step."
    return (f" Validation loss was lowest at step {int(best['step'])} ({best['val_loss']:.3f}); the final weights "
            f"(step {int(last['step'])}, {last['val_loss']:.3f}, {last['val_loss'] / best['val_loss'] - 1:+.0%}) are the "
            "ones fine-tuned (pretraining keeps its last step, not its best).")


def chance_level_lines(stages: dict[str, dict]) -> list[str]:
    """A warning line for each training stage whose numbers (details.json) flag a model no better than chance."""
    flagged = [name for name, numbers in stages.items() if numbers.get(CHANCE_METRIC)]
    return [f"**Warning:** {name}: the trained model predicts no better than chance (its validation loss is not "
            f"below the uniform distribution's; `{CHANCE_METRIC}` in its metrics)." for name in flagged] + \
        ([""] if flagged else [])


def evaluation_report(rows: list[dict], reference: str, pretrain: dict, finetune: dict, samples: dict[str, list[dict]],
                      images: dict[str, str], pretrain_eval_curve: list[dict] | None = None,
                      provenance: dict[str, str] | None = None) -> str:
    by_name = {row["variant"]: row for row in rows}
    ref = by_name[reference]
    lines = ["# llmpipe evaluation report", "",
             "Every model variant on the same held-out data: the validation text (perplexity, bits per byte), "
             "questions about the fine-tuned people and about held-out people never seen in fine-tuning "
             "(greedy exact match in the chat format), KL divergence of next-token distributions from the "
             f"full-precision fine-tuned model (`{reference}`), file size and generation speed on this machine "
             "(greedy, fastest of 5 runs; PyTorch runs every GGUF variant as its dequantized fp32 weights, so "
             "speed differences between variants here are noise: llama.cpp is where quantized files run faster).", "",
             "## Training in numbers", "",
             (f"- Pretraining: {int(pretrain['parameters']):,} parameters, {int(pretrain['tokens_trained']):,} tokens in "
              f"{int(pretrain['steps'])} steps at {pretrain['tokens_per_second']:,.0f} tokens/s" if pretrain["steps"] else
              f"- Base model: an imported checkpoint (base_model=hf), {int(pretrain['parameters']):,} parameters")
             + f"; validation bits per byte {pretrain['val_bpb']:.3f} against {pretrain['unigram_bpb']:.3f} for a "
             "unigram model of the corpus." + best_pretrain_step_note(pretrain_eval_curve or []),
             f"- Fine-tuning: best step {int(finetune['best_step'])}; exact match on fine-tuned people (or your "
             f"examples) {_fmt(finetune.get('base_qa_accuracy_finetuned_people'))} → "
             f"{_fmt(finetune.get('qa_accuracy_finetuned_people'))}, on held-out people "
             f"{_fmt(finetune.get('base_qa_accuracy_heldout_people'))} → {_fmt(finetune.get('qa_accuracy_heldout_people'))} "
             "(base model → fine-tuned; – where there is no such set).", "",
             *chance_level_lines({"Pretraining": pretrain, "Fine-tuning": finetune}),
             "## Every variant", "",
             "| variant | bits/weight | file size | perplexity | bits/byte | QA fine-tuned people | QA held-out people | KL vs " + reference + " | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {_fmt(row['bits_per_weight'], 2)} | {row['file_bytes'] / 1e6:.2f} MB | "
                     f"{_fmt(row['val_perplexity'])} | {_fmt(row['val_bpb'])} | {_fmt(row['qa_accuracy_finetuned_people'])} | "
                     f"{_fmt(row['qa_accuracy_heldout_people'])} | {_fmt(row['kl_divergence'], 4)} | {row['tokens_per_second']:,.0f} |")
    lines += ["", "## What quantization costs, measured", "",
              f"Changes against `{reference}` (the tutorials' \"minimal / small / noticeable\", in numbers):", "",
              "| format | bits/weight | size vs fp32 | perplexity change | held-out accuracy change | fine-tuned accuracy change |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["variant"] in ("base", reference):
            continue
        lines.append(
            f"| {row['variant']} | {row['bits_per_weight']:.2f} | {row['bits_per_weight'] / 32:.1%} | "
            f"{row['val_perplexity'] - ref['val_perplexity']:+.4f} ({(row['val_perplexity'] / ref['val_perplexity'] - 1):+.2%}) | "
            f"{row['qa_accuracy_heldout_people'] - ref['qa_accuracy_heldout_people']:+.3f} | "
            f"{row['qa_accuracy_finetuned_people'] - ref['qa_accuracy_finetuned_people']:+.3f} |")
    lines += ["", "## Plots", "", f"![loss curves]({images['loss']})", "", f"![size against quality]({images['size']})", "",
              "## Tokenization", "", f"![tokenization]({images['tokens']})", "",
              "## Attention", "", f"![attention heads]({images['attention']})", "",
              "## Sample answers", ""]
    sample_split = next((r.get("split") for results in samples.values() for r in results if r.get("split")), None)
    if sample_split:
        lines += [f"The same questions for every variant, about {split_title(sample_split)}.", ""]
    for variant, results in samples.items():
        lines += [f"### {variant}", "", "| question | expected | answer |", "|---|---|---|"]
        lines += [f"| {cell(r['question'])} | {cell(r['expected'])} | {'✓' if r['correct'] else '✗'} {_answer(r)} |"
                  for r in results]
        lines.append("")
    if provenance:
        lines += ["## Where this report came from", ""] + [f"- {key}: `{value}`" for key, value in provenance.items()] + [""]
    return "\n".join(lines)
