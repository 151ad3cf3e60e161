"""The PNG plots of the evaluation report, made with matplotlib: loss curves, size against quality,
tokenization, attention heads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from llmpipe.config import layout  # noqa: E402
from llmpipe.report.tables import read_curve  # noqa: E402


def plot_loss_curves(output: Path, pretrain_dir: Path = layout.PRETRAIN_REPORTS,
                     finetune_dir: Path = layout.FINETUNE_REPORTS) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for directory, axis, title, train_key, eval_key in (
            (pretrain_dir, left, "Pretraining", "train_loss", "val_loss"),
            (finetune_dir, right, "Fine-tuning (answer tokens)", "train_loss", "val_answer_loss")):
        train, evaluation = read_curve(directory / layout.TRAIN_CURVE), read_curve(directory / layout.EVAL_CURVE)
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
    """Perplexity and held-out accuracy against file size; one marker and colour per variant, named in a
    legend (variants of nearly the same size would hide each other's text labels)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    markers = "osD^vP*Xh<>"
    for index, row in enumerate(rows):
        megabytes = row["file_bytes"] / 1e6
        style = {"marker": markers[index % len(markers)], "color": f"C{index % 10}", "s": 46, "alpha": 0.85}
        left.scatter(megabytes, row["val_perplexity"], label=row["variant"], **style)
        right.scatter(megabytes, row["qa_accuracy_heldout_people"], **style)
    left.set(title="Validation perplexity against file size", xlabel="file size (MB)", ylabel="perplexity")
    right.set(title="Held-out people's QA accuracy against file size", xlabel="file size (MB)",
              ylabel="exact-match accuracy")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=min(len(rows), 8), title="variant", fontsize=8, title_fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
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
        image = axis.imshow(weights[head].float().numpy(), cmap="viridis", vmin=0, vmax=1)
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axis.set_yticks(range(len(labels)), labels, fontsize=6)
        axis.set_title(f"head {head}")
    layer_number = layer if layer >= 0 else model.config.n_layer + layer
    figure.suptitle(f"Attention of layer {layer_number} (row: token attending, column: token attended to)")
    figure.tight_layout()
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    figure.savefig(output, dpi=110, bbox_inches="tight")  # keeps the tick labels whole
    plt.close(figure)


def plot_spread_against_param(points: dict[str, list[tuple[float, float, float, float]]], x_label: str,
                              y_label: str, title: str, output: Path) -> None:
    """One line per metric: its mean over seeds against a param's value, with a min-max band.
    `points[label]` holds (x, mean, min, max) tuples."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, rows in points.items():
        rows = sorted(rows)
        xs = [row[0] for row in rows]
        axis.plot(xs, [row[1] for row in rows], "o-", label=f"{label} (mean)")
        axis.fill_between(xs, [row[2] for row in rows], [row[3] for row in rows], alpha=0.2,
                          label=f"{label} (min-max over seeds)")
    axis.set(title=title, xlabel=x_label, ylabel=y_label)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
