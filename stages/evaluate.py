"""Stage `evaluate`: every model variant side by side, in DVC metrics and plots, MLflow, and a report.

Variants: the pretrained base model, the fine-tuned model (full precision, the reference) and every
GGUF file of the quantize stage, evaluated on the weights the file holds (dequantized). On the same
data each gets: validation perplexity and bits per byte, exact-match QA accuracy on fine-tuned and
held-out people, KL divergence of next-token distributions from the reference, size, bits per weight
and generation speed (llmpipe.eval.compare). The fine-tuned model is logged as an MLflow pyfunc model
and registered.

Params: evaluate.* only (`evaluate.device`: where the variants are measured) (e.g. `dvc exp run -S evaluate.sample_answers=10` reruns this stage alone).
Output: reports/evaluate/metrics.json (DVC metrics: each variant's held-out people's QA accuracy, and the
F16 file's bits per byte), reports/evaluate/variants.csv (every measurement of every variant; DVC plots),
reports/report.md with PNG plots in reports/figures/.
Run: `dvc repro evaluate`.
"""

import json
import os

import torch

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import StageParams
from llmpipe.data.jsonl import read_rows
from llmpipe.data.sampling import first_items
from llmpipe.data.tokens import open_tokens, read_meta
from llmpipe.eval.compare import (
    EvaluateSettings,
    Variant,
    compare_variants,
    evaluation_device,
)
from llmpipe.gguf.files import check_gguf_file, read_gguf_model
from llmpipe.model.weights import WEIGHTS_FILE, check_model_directory, load_model, stored_dtype
from llmpipe.report.markdown import evaluation_report
from llmpipe.report.plots import (
    plot_attention,
    plot_loss_curves,
    plot_size_versus_quality,
    plot_tokenization,
)
from llmpipe.report.tables import (
    evaluate_metrics,
    read_curve,
    read_training_reports,
    write_variants_table,
)
from llmpipe.runner.heartbeat import Heartbeat
from llmpipe.runner.stage import stage
from llmpipe.serve.registry import register_chat_model
from llmpipe.text.chat_template import ChatTemplate
from llmpipe.text.tokenizer import EXAMPLE_STRINGS, LoadedTokenizer
from llmpipe.tracking.provenance import git_commit
from llmpipe.tracking.stage_run import StageRun

REFERENCE = "finetuned"
IMAGES = {"loss": "loss_curves.png", "size": "size_vs_quality.png", "tokens": "tokenization.png",
          "attention": "attention.png"}


def read_json(path):
    return json.loads(path.read_text("utf-8"))


def variants(quantize_sizes: dict, tokenizer: LoadedTokenizer, measure_base: bool) -> list[Variant]:
    """The base (unless `measure_base` is false) and fine-tuned models, then every GGUF file from the most to the
    fewest bits per weight (each checked now, before any measurement: config.json and tokenizer, a GGUF file's
    structure and token list)."""
    for directory in (layout.PRETRAINED, layout.FINETUNED):
        check_model_directory(directory, tokenizer)
    base, finetuned = layout.PRETRAINED / WEIGHTS_FILE, layout.FINETUNED / WEIGHTS_FILE
    # GGUF variants are dequantized into the fine-tuned model's dtype: a bf16 model's are held in bf16, not fp32.
    dtype = stored_dtype([finetuned])
    found = [Variant("base", lambda: load_model(layout.PRETRAINED, tokenizer=tokenizer)[0], base,
                     8.0 * stored_dtype([base]).itemsize)] if measure_base else []
    found.append(Variant(REFERENCE, lambda: load_model(layout.FINETUNED, tokenizer=tokenizer)[0], finetuned,
                         8.0 * dtype.itemsize))
    by_size = sorted(quantize_sizes["variants"].items(), key=lambda item: -item[1]["bits_per_weight"])
    for name, row in by_size:
        path = layout.find_gguf_file(name)
        if path is not None:
            check_gguf_file(path, tokenizer)
            found.append(Variant(name, lambda p=path: read_gguf_model(p, tokenizer, dtype), path,
                                 row["bits_per_weight"]))
    return found


def read_settings(params: StageParams) -> tuple[EvaluateSettings, torch.device]:
    """The evaluate section and the device it names (`cuda` without CUDA is refused)."""
    settings = params.read(EvaluateSettings)
    return settings, evaluation_device(settings, params.source)


@stage("evaluate", read_settings)
def evaluate(both: tuple[EvaluateSettings, torch.device], params: StageParams, run: StageRun) -> None:
    settings, device = both
    print(f"evaluate: every variant is measured on {device}", flush=True)
    torch.manual_seed(0)

    tokenizer = LoadedTokenizer(layout.TOKENIZER)
    template = ChatTemplate(tokenizer)
    validation_tokens = open_tokens("validation")
    qa_sets = {split: first_items(read_rows(layout.QA_FILES[split]), settings.max_questions_per_split)
               for split in ("finetuned_people", "heldout_people")}
    training_reports = {"pretrain": read_training_reports(layout.PRETRAIN_REPORTS),  # read now: inputs before work
                        "finetune": read_training_reports(layout.FINETUNE_REPORTS),
                        "pretrain curve": read_curve(layout.PRETRAIN_REPORTS / layout.EVAL_CURVE)}
    rows, samples = compare_variants(
        variants(read_json(layout.SIZES_JSON), tokenizer, settings.measure_base), REFERENCE, template,
        validation_tokens, read_meta()["splits"]["validation"], qa_sets, settings, device)
    reference_model = load_model(layout.FINETUNED, tokenizer=tokenizer)[0]  # for the attention plot

    with atomic.atomic_path(layout.FIGURES, directory=True) as temp:
        plot_loss_curves(temp / IMAGES["loss"])
        plot_size_versus_quality(rows, temp / IMAGES["size"])
        plot_tokenization(tokenizer, EXAMPLE_STRINGS[:5], temp / IMAGES["tokens"])
        sentence = " ".join(read_rows(layout.PRETRAIN_TEXT["validation"])[0]["text"].split(". ")[:2]) + "."
        plot_attention(reference_model, tokenizer, sentence, temp / IMAGES["attention"])
    del reference_model  # registering the model loads it once more
    images = {key: f"{layout.FIGURES.name}/{name}" for key, name in IMAGES.items()}
    provenance = {"git commit": git_commit() or "not a git repository",
                  "DVC experiment": os.environ.get("DVC_EXP_NAME", "none (dvc repro)"),
                  "MLflow pipeline run (holds every param)": run.parent_id or "none",
                  "fine-tuned weights (md5 of models/finetuned)": run.input_hashes.get(str(layout.FINETUNED), "unknown"),
                  "QA questions asked per split (evaluate.max_questions_per_split)": ", ".join(
                      f"{split} {len(pairs)}" for split, pairs in qa_sets.items())}
    report = evaluation_report(rows, REFERENCE, training_reports["pretrain"], training_reports["finetune"], samples,
                               images, pretrain_eval_curve=training_reports["pretrain curve"], provenance=provenance)
    atomic.write_text(layout.REPORT, report)
    atomic.write_json(layout.EVALUATE_METRICS, evaluate_metrics(rows))
    write_variants_table(rows)

    for row in rows:
        run.log_metrics({f"{row['variant']}.{k}": v for k, v in row.items() if k != "variant"})
    run.log_artifact(layout.REPORT)
    run.log_artifact(layout.FIGURES, "figures")
    run.log_artifact(layout.VARIANTS_TABLE)
    reference_row = next(row for row in rows if row["variant"] == REFERENCE)
    print(f"evaluate: registering {layout.FINETUNED} as {settings.registered_model_name} (weights: "
          f"{settings.registry_weights})", flush=True)
    with Heartbeat("evaluate: registering:", None):
        version, new = register_chat_model(run, layout.FINETUNED, layout.TOKENIZER, settings.registered_model_name, {
            k: v for k, v in reference_row.items() if k.startswith("qa_accuracy") or k == "val_perplexity"},
            weights=settings.registry_weights)
    if version:
        print(f"evaluate: {'registered' if new else 'unchanged weights, kept'} {settings.registered_model_name} version {version}",
              flush=True)
    print(f"evaluate: wrote {layout.REPORT}", flush=True)


if __name__ == "__main__":
    evaluate()
