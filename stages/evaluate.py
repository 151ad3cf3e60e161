"""Stage `evaluate`: every model variant side by side, in DVC metrics and plots, MLflow, and a report.

Variants: the pretrained base model, the fine-tuned model (full precision, the reference) and every
GGUF file of the quantize stage, evaluated on the weights the file holds (dequantized). On the same
data each gets: validation perplexity and bits per byte, exact-match QA accuracy on fine-tuned and
held-out people, KL divergence of next-token distributions from the reference, size, bits per weight
and generation speed. The fine-tuned model is logged as an MLflow pyfunc model and registered.

Params: evaluate.* only (e.g. `dvc exp run -S evaluate.sample_answers=10` reruns this stage alone).
Output: reports/evaluate/metrics.json (DVC metrics), reports/evaluate/variants.csv (DVC plots),
reports/report.md with PNG plots in reports/figures/.
Run: `dvc repro evaluate`.
"""

import json
from pathlib import Path

import torch

from llmpipe import atomic
from llmpipe.chat_template import ChatTemplate
from llmpipe.evaluation import (generation_tokens_per_second, mean_kl_divergence, next_token_distributions,
                                perplexity_metrics)
from llmpipe.finetune_data import read_examples
from llmpipe.model_io import WEIGHTS_FILE, load_model
from llmpipe.params import StageParams
from llmpipe.qa_eval import qa_accuracy
from llmpipe.quant.gguf_export import read_gguf_model
from llmpipe.report import (markdown_report, plot_attention, plot_loss_curves, plot_size_versus_quality,
                            plot_tokenization, write_variants_csv)
from llmpipe.stage import stage
from llmpipe.tokenize_corpus import open_tokens, read_meta
from llmpipe.tokenizer import EXAMPLE_STRINGS, LoadedTokenizer
from llmpipe.tracking import StageRun

PREPARED = Path("data/prepared")
TOKENS_DIR = Path("data/tokens")
TOKENIZER_DIR = Path("models/tokenizer")
PRETRAINED, FINETUNED, GGUF_DIR = Path("models/pretrained"), Path("models/finetuned"), Path("models/gguf")
REPORTS, FIGURES = Path("reports/evaluate"), Path("reports/figures")
REFERENCE = "finetuned"


def variants(quantize_sizes: dict) -> dict[str, tuple]:
    """name → (loader, file path, bits per weight)."""
    found = {"base": (lambda: load_model(PRETRAINED)[0], PRETRAINED / WEIGHTS_FILE, 32.0),
             REFERENCE: (lambda: load_model(FINETUNED)[0], FINETUNED / WEIGHTS_FILE, 32.0)}
    by_size = sorted(quantize_sizes["variants"].items(), key=lambda item: -item[1]["bits_per_weight"])
    for name, row in by_size:
        path = next(GGUF_DIR.glob(f"*-{name}.gguf"), None)
        if path is not None:
            found[name] = (lambda p=path: read_gguf_model(p), path, row["bits_per_weight"])
    return found


@stage("evaluate")
def evaluate(params: StageParams, run: StageRun) -> None:
    sample_count = params.int("evaluate.sample_answers", min=0)
    eval_max_tokens = params.int("evaluate.eval_max_tokens", min=2)
    kl_max_tokens = params.int("evaluate.kl_max_tokens", min=2)
    questions = params.int("evaluate.max_questions_per_split", min=1)
    generation_tokens = params.int("evaluate.generation_tokens", min=1)
    max_new_tokens = params.int("evaluate.max_new_tokens", min=1)
    registered_name = params.str("evaluate.registered_model_name")
    torch.manual_seed(0)

    tokenizer = LoadedTokenizer(TOKENIZER_DIR)
    template = ChatTemplate(tokenizer)
    meta = read_meta(TOKENS_DIR)
    validation_tokens = open_tokens(TOKENS_DIR, "validation")
    qa_sets = {"finetuned_people": read_examples(PREPARED / "qa_finetune_people.jsonl")[:questions],
               "heldout_people": read_examples(PREPARED / "qa_heldout_people.jsonl")[:questions]}
    sizes = json.loads(Path("reports/quantize/sizes.json").read_text("utf-8"))
    prompt = template.encode_prompt([{"role": "user", "content": qa_sets["finetuned_people"][0]["question"]}]
                                    if qa_sets["finetuned_people"] else [{"role": "user", "content": "Hello"}])

    rows, samples, reference_log_probs, reference_model = [], {}, None, None
    for name, (load, path, bits) in variants(sizes).items():
        model = load()
        row = {"variant": name, "bits_per_weight": bits, "file_bytes": path.stat().st_size,
               **perplexity_metrics(model, validation_tokens, meta["splits"]["validation"], eval_max_tokens)}
        for split, pairs in qa_sets.items():
            metrics, results = qa_accuracy(model, template, pairs, max_new_tokens, f"qa_accuracy_{split}")
            row[f"qa_accuracy_{split}"] = metrics.get(f"qa_accuracy_{split}", 0.0)
            if split == "heldout_people" or not qa_sets["heldout_people"]:
                samples[name] = results[:sample_count]
        log_probs = next_token_distributions(model, validation_tokens, kl_max_tokens)
        if name == REFERENCE:
            reference_log_probs, reference_model = log_probs, model
        row["_log_probs"] = log_probs
        row["tokens_per_second"] = generation_tokens_per_second(model, prompt, generation_tokens)
        rows.append(row)
        print(f"evaluate: {name}: perplexity {row['val_perplexity']:.3f}, held-out accuracy "
              f"{row['qa_accuracy_heldout_people']:.3f}, {row['tokens_per_second']:.0f} tokens/s", flush=True)
    for row in rows:
        row["kl_divergence"] = mean_kl_divergence(reference_log_probs, row.pop("_log_probs"))

    pretrain = json.loads(Path("reports/pretrain/metrics.json").read_text("utf-8"))
    finetune = json.loads(Path("reports/finetune/metrics.json").read_text("utf-8"))
    images = {"loss": "figures/loss_curves.png", "size": "figures/size_vs_quality.png",
              "tokens": "figures/tokenization.png", "attention": "figures/attention.png"}
    with atomic.atomic_path(FIGURES, directory=True) as temp:
        plot_loss_curves(Path("reports/pretrain"), Path("reports/finetune"), temp / "loss_curves.png")
        plot_size_versus_quality(rows, temp / "size_vs_quality.png")
        plot_tokenization(tokenizer, EXAMPLE_STRINGS[:5], temp / "tokenization.png")
        sentence = " ".join(read_examples(PREPARED / "pretrain_validation.jsonl")[0]["text"].split(". ")[:2]) + "."
        plot_attention(reference_model, tokenizer, sentence, temp / "attention.png")
    report = markdown_report(rows, REFERENCE, pretrain, finetune, samples, images)
    atomic.write_text("reports/report.md", report)
    metrics = {row["variant"]: {k: v for k, v in row.items() if k != "variant"} for row in rows}
    atomic.write_json(REPORTS / "metrics.json", metrics)
    with atomic.atomic_path(REPORTS / "variants.csv") as temp:
        write_variants_csv(rows, temp)

    for row in rows:
        run.log_metrics({f"{row['variant']}.{k}": v for k, v in row.items() if k != "variant"})
    run.log_artifact("reports/report.md")
    run.log_artifact(FIGURES, "figures")
    run.log_artifact(REPORTS / "variants.csv")
    version = run.log_chat_model(FINETUNED, TOKENIZER_DIR, registered_name)
    if version:
        print(f"evaluate: registered the fine-tuned model as {registered_name} version {version}", flush=True)
    print("evaluate: wrote reports/report.md", flush=True)


if __name__ == "__main__":
    evaluate()
