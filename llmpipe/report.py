"""The evaluation report: Markdown for a person to read, PNG plots made with matplotlib."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

COLUMNS = ["variant", "bits_per_weight", "file_bytes", "val_perplexity", "val_bpb", "qa_accuracy_finetuned_people",
           "qa_accuracy_heldout_people", "kl_divergence", "tokens_per_second"]


def read_curve(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def plot_loss_curves(pretrain_dir: Path, finetune_dir: Path, output: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for directory, axis, title, train_key, eval_key in (
            (pretrain_dir, left, "Pretraining", "train_loss", "val_loss"),
            (finetune_dir, right, "Fine-tuning (answer tokens)", "train_loss", "val_answer_loss")):
        train, evaluation = read_curve(directory / "train_curve.csv"), read_curve(directory / "eval_curve.csv")
        axis.plot([r["step"] for r in train], [r[train_key] for r in train], label="training loss")
        if evaluation and eval_key in evaluation[0]:
            axis.plot([r["step"] for r in evaluation], [r[eval_key] for r in evaluation], "o-", label="validation loss")
        axis.set(title=title, xlabel="step", ylabel="loss (nats per token)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def plot_size_versus_quality(rows: list[dict], output: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        megabytes = row["file_bytes"] / 1e6
        left.scatter(megabytes, row["val_perplexity"])
        left.annotate(row["variant"], (megabytes, row["val_perplexity"]), textcoords="offset points", xytext=(4, 4))
        right.scatter(megabytes, row["qa_accuracy_heldout_people"], marker="s")
        right.annotate(row["variant"], (megabytes, row["qa_accuracy_heldout_people"]), textcoords="offset points",
                       xytext=(4, 4))
    left.set(title="Validation perplexity against file size", xlabel="file size (MB)", ylabel="perplexity")
    right.set(title="Held-out people's QA accuracy against file size", xlabel="file size (MB)", ylabel="exact match")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def plot_tokenization(tokenizer, texts: list[str], output: Path) -> None:
    """Each example string cut into its tokens, alternating colors, with the token count."""
    figure, axis = plt.subplots(figsize=(12, 0.6 * len(texts) + 0.6))
    axis.axis("off")
    colors = ["#cfe8ff", "#ffe3c2"]
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        pieces = tokenizer.token_strings(ids)
        y = 1 - (row + 0.5) / len(texts)
        x = 0.0
        axis.text(x, y, f"{len(ids):>3} tokens ", family="monospace", fontsize=9, va="center", transform=axis.transAxes)
        x = 0.1
        for index, piece in enumerate(pieces):
            label = piece.replace(" ", "␣").replace("\n", "⏎")
            width = 0.0105 * max(len(label), 1) + 0.004
            axis.text(x, y, label, family="monospace", fontsize=9, va="center", transform=axis.transAxes,
                      bbox={"facecolor": colors[index % 2], "edgecolor": "none", "pad": 1.5})
            x += width
    axis.set_title("How the tokenizer cuts example strings (␣ = space)")
    figure.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(figure)


@torch.no_grad()
def plot_attention(model, tokenizer, sentence: str, output: Path, layer: int = -1) -> None:
    """Attention weights of every head of one layer for one sentence: row = query token, column = key."""
    ids = tokenizer.encode(sentence)[: model.config.context_length]
    weights = model.attention_weights(torch.tensor([ids]))[layer][0]
    labels = [p.replace(" ", "␣") for p in tokenizer.token_strings(ids)]
    heads = weights.shape[0]
    figure, axes = plt.subplots(1, heads, figsize=(4.2 * heads, 4.4))
    for head, axis in enumerate(axes if heads > 1 else [axes]):
        axis.imshow(weights[head].numpy(), cmap="viridis", vmin=0, vmax=1)
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axis.set_yticks(range(len(labels)), labels, fontsize=6)
        axis.set_title(f"head {head}")
    layer_number = layer if layer >= 0 else model.config.n_layer + layer
    figure.suptitle(f"Attention of layer {layer_number} (row: token attending, column: token attended to)")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_report(rows: list[dict], reference: str, pretrain: dict, finetune: dict, samples: dict[str, list[dict]],
                    images: dict[str, str]) -> str:
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
             f"- Pretraining: {int(pretrain['parameters']):,} parameters, {int(pretrain['tokens_trained']):,} tokens in "
             f"{int(pretrain['steps'])} steps at {pretrain['tokens_per_second']:,.0f} tokens/s; validation bits per byte "
             f"{pretrain['val_bpb']:.3f} against {pretrain['unigram_bpb']:.3f} for a unigram model of the corpus.",
             f"- Fine-tuning: best step {int(finetune['best_step'])} by the validation people's accuracy; exact match on "
             f"fine-tuned people {finetune['base_qa_accuracy_finetuned_people']:.3f} → "
             f"{finetune['qa_accuracy_finetuned_people']:.3f}, on held-out people "
             f"{finetune['base_qa_accuracy_heldout_people']:.3f} → {finetune['qa_accuracy_heldout_people']:.3f} "
             "(base model → fine-tuned).", "",
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
    for variant, results in samples.items():
        lines += [f"### {variant}", "", "| question | expected | answer |", "|---|---|---|"]
        lines += [f"| {r['question']} | {r['expected']} | {'✓' if r['correct'] else '✗'} {r['answer'].strip() or '(empty)'} |"
                  for r in results]
        lines.append("")
    return "\n".join(lines)


def write_variants_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
