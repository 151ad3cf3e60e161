"""The pipeline's stages, declared once: what each runs, which params sections it reads, which artifacts it
reads and writes (paths from llmpipe.config.layout), its metrics and plots. dvc.yaml is written from this table,
with each stage's code deps (its import closure, llmpipe.generate.code_deps) and, under `meta: sections:`, one key
of each section it reads: DVC parses dvc.yaml before it deletes any output, so a section missing from
params.yaml is refused first (docs/bad-input.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmpipe.config import layout
from llmpipe.config.params import SECTIONS, SeedSettings, flatten, param_fields
from llmpipe.data.encode import TokenizeSettings
from llmpipe.data.settings import EmbeddedData
from llmpipe.eval.compare import EvaluateSettings
from llmpipe.generate.code_deps import code_dependencies
from llmpipe.gguf.files import QuantizeSettings
from llmpipe.hf.base_model import BaseModelSettings
from llmpipe.model.transformer import ModelConfig
from llmpipe.text.tokenizer import TokenizerSettings
from llmpipe.train.finetune_settings import FinetuneParams
from llmpipe.train.settings import PretrainParams



@dataclass(frozen=True)
class Stage:
    name: str
    command: str                   # what DVC runs, from the repository root
    params: tuple[type, ...]       # settings dataclasses whose sections the stage reads
    deps: tuple[Path | str, ...]   # artifacts it reads (its code is found by code_deps)
    outs: tuple[Path, ...]
    metrics: tuple[Path, ...] = ()
    plots: dict[Path, dict] = field(default_factory=dict)  # plot data it writes → DVC's chart settings
    always_changed: bool = False   # DVC runs it every time (check_inputs, log_pipeline: no cached result to reuse)


def curve(y: str, title: str, y_label: str) -> dict:
    return {"template": "simple", "x": "step", "y": y, "title": title, "x_label": "optimizer step",
            "y_label": y_label}


PRETRAIN_CURVES = (layout.PRETRAIN_REPORTS / layout.TRAIN_CURVE, layout.PRETRAIN_REPORTS / layout.EVAL_CURVE)
FINETUNE_CURVES = (layout.FINETUNE_REPORTS / layout.TRAIN_CURVE, layout.FINETUNE_REPORTS / layout.EVAL_CURVE)
STAGES = [
    # No stage depends on a path the user supplies: DVC would hash it outside any stage's code (a FIFO there
    # blocks `dvc status`; a missing path fails after DVC deleted the stage's outputs). check_inputs checks each
    # one and writes its fingerprint, which the stages reading it depend on (llmpipe.data.inputs).
    Stage("check_inputs", "python stages/check_inputs.py", (BaseModelSettings,), (),
          (layout.USER_DATA_FINGERPRINT, layout.BASE_MODEL_FINGERPRINT), always_changed=True),
    Stage("prepare", "python stages/prepare.py", (SeedSettings, EmbeddedData), (layout.USER_DATA_FINGERPRINT,),
          (layout.PREPARED,)),
    Stage("train_tokenizer", "python stages/train_tokenizer.py", (TokenizerSettings, BaseModelSettings),
          (*layout.PRETRAIN_TEXT.values(), layout.BASE_MODEL_FINGERPRINT),
          (layout.TOKENIZER, layout.TOKENIZER_REPORT, layout.TOKENIZER_DETAILS), (layout.TOKENIZER_METRICS,)),
    Stage("tokenize", "python stages/tokenize_text.py", (TokenizeSettings,),
          (*layout.PRETRAIN_TEXT.values(), layout.TOKENIZER), (layout.TOKENS,)),
    Stage("pretrain", "python -m llmpipe.runner.launch --nodes ${pretrain.nodes} --processes ${pretrain.processes} "
                      "stages/pretrain.py", (SeedSettings, ModelConfig, PretrainParams, BaseModelSettings),
          (layout.TOKENS, layout.BASE_MODEL_FINGERPRINT),
          (layout.PRETRAINED, layout.PRETRAIN_REPORTS / layout.DETAILS, layout.PRETRAIN_REPORTS / layout.TIMINGS,
           layout.EFFECTIVE_PARAMS["pretrain"]),
          (layout.PRETRAIN_REPORTS / layout.METRICS,),
          {PRETRAIN_CURVES[0]: curve("learning_rate", "Pretraining learning rate (warmup, then cosine decay)",
                                     "learning rate"),
           PRETRAIN_CURVES[1]: curve("val_bpb", "Pretraining validation bits per byte",
                                     "bits per byte of validation text")}),
    Stage("finetune", "python -m llmpipe.runner.launch --nodes ${finetune.nodes} --processes ${finetune.processes} "
                      "stages/finetune.py", (SeedSettings, FinetuneParams),
          (layout.PRETRAINED, layout.TOKENIZER, *layout.FINETUNE_EXAMPLES.values(), *layout.QA_FILES.values()),
          (layout.FINETUNED, layout.FINETUNE_REPORTS / layout.DETAILS, layout.FINETUNE_REPORTS / layout.SAMPLES,
           layout.EFFECTIVE_PARAMS["finetune"]),
          (layout.FINETUNE_REPORTS / layout.METRICS,),
          {FINETUNE_CURVES[0]: curve("train_loss", "Fine-tuning training loss (answer tokens)",
                                     "loss (nats per answer token)"),
           FINETUNE_CURVES[1]: curve("qa_accuracy_validation_people", "Validation people's QA accuracy during "
                                     "fine-tuning (picks the best step)", "exact-match accuracy")}),
    Stage("quantize", "python stages/quantize.py", (QuantizeSettings,), (layout.FINETUNED, layout.TOKENIZER),
          (layout.GGUF, layout.HF_EXPORT, layout.SIZES_TABLE, layout.SIZES_JSON)),
    Stage("evaluate", "python stages/evaluate.py", (EvaluateSettings,),
          (layout.QA_FILES["finetuned_people"], layout.QA_FILES["heldout_people"], layout.PRETRAIN_TEXT["validation"],
           layout.TOKENS, layout.TOKENIZER, layout.PRETRAINED, layout.FINETUNED, layout.GGUF, layout.SIZES_JSON,
           *(layout.PRETRAIN_REPORTS / name for name in (layout.METRICS, layout.DETAILS, layout.TIMINGS)),
           *PRETRAIN_CURVES, *(layout.FINETUNE_REPORTS / name for name in (layout.METRICS, layout.DETAILS)),
           *FINETUNE_CURVES),
          (layout.REPORT, layout.FIGURES), (layout.EVALUATE_METRICS,),
          {layout.VARIANTS_TABLE: {"template": "scatter_variants", "x": "bits_per_weight",
                                   "y": "qa_accuracy_heldout_people", "title": "Held-out people's QA accuracy of "
                                   "every variant against bits per weight", "x_label": "bits per weight",
                                   "y_label": "held-out people's exact-match accuracy"}}),
]
# Last, every time: the execution's MLflow pipeline run, from the outputs the execution ends with, whether their
# stages ran or DVC restored them (llmpipe.tracking.pipeline_run). Its deps (every stage's metrics and effective
# params) put it after every other stage; it reads every params section, and writes nothing DVC tracks.
STAGES.append(Stage("log_pipeline", "python stages/log_pipeline.py",
                    tuple(dict.fromkeys(cls for stage in STAGES for cls in stage.params)),
                    tuple(dict.fromkeys((*(path for stage in STAGES for path in stage.metrics),
                                         *layout.EFFECTIVE_PARAMS.values()))),
                    (), always_changed=True))
# Charts that combine files or columns. `simple` is DVC's line chart without the smoothing slider;
# scatter_variants (.dvc/plots/) colours points by revision and shapes them by variant.
COMBINED_PLOTS = {
    "pretrain_loss": {"title": "Pretraining loss", "template": "simple", "x": "step", "x_label": "optimizer step",
                      "y_label": "loss (nats per token)",
                      "y": {str(PRETRAIN_CURVES[0]): "train_loss", str(PRETRAIN_CURVES[1]): "val_loss"}},
    "finetune_validation_loss": {"title": "Fine-tuning validation loss (answer tokens)", "template": "simple",
                                 "x": "step", "x_label": "optimizer step", "y_label": "loss (nats per answer token)",
                                 "y": {str(FINETUNE_CURVES[1]): "val_answer_loss"}},
    "size_vs_perplexity": {"title": "Validation perplexity of every variant against bits per weight",
                           "template": "scatter_variants", "x": "bits_per_weight", "x_label": "bits per weight",
                           "y_label": "validation perplexity", "y": {str(layout.VARIANTS_TABLE): "val_perplexity"}},
}
HEADER = """\
# The pipeline: prepare → train_tokenizer → tokenize → pretrain → finetune → quantize → evaluate.
# Generated by `llmpipe compose` from llmpipe/generate/dvc_pipeline.py (the stages) and each stage's imports (its
# code deps): edit those, then run `llmpipe compose`. Paths are named once, in llmpipe/config/layout.py.
# Each stage declares the params.yaml keys it reads; a stage cannot read any other (llmpipe/config/params.py).
# `meta: sections:` names a key of each declared section, so that DVC refuses a section missing from params.yaml
# before it deletes any output. check_inputs, which DVC runs every time, checks the paths a user supplies (user_data,
# base_model.path) and writes their fingerprints: the stages depend on those, so DVC never hashes a user's path
# itself (llmpipe/data/inputs.py). log_pipeline, which DVC runs last every time, logs the execution's MLflow
# pipeline run (every param, every stage's metrics), also when every stage was restored from the run-cache.
# Metrics are each stage's few headline numbers; plots are the curves and the per-variant table. No output is
# `cache: false`: DVC leaves a stage with such an output out of the run-cache and never pushes it to a remote, so a
# teammate could not restore the stage.
"""


def section_keys(stage: Stage) -> list[str]:
    """The params keys a stage declares: each section's name, or its keys for the top-level section."""
    keys = []
    for cls in stage.params:
        section = cls.params_section
        keys += [f.name for f in param_fields(cls)] if section == "" else [section]
    return keys


def guard_keys(keys: list[str], params: dict) -> str:
    """One scalar key of each declared section, interpolated: DVC fails on a missing one while parsing."""
    flat = flatten(params)
    chosen = []
    for key in keys:
        scalar = next((k for k, v in flat.items() if (k == key or k.startswith(key + "."))
                       and isinstance(v, (str, int, float)) and not isinstance(v, bool)), None)
        if scalar:
            chosen.append("${" + scalar + "}")
    return " ".join(chosen)


def stage_entry(stage: Stage, root: Path, params: dict) -> dict:
    keys = section_keys(stage)
    entry: dict = {"cmd": stage.command, **({"always_changed": True} if stage.always_changed else {}),
                   "meta": {"sections": guard_keys(keys, params)},
                   "deps": code_dependencies(root, stage.command) + [str(path) for path in stage.deps],
                   "params": keys, **({"outs": [str(path) for path in stage.outs]} if stage.outs else {})}
    if stage.metrics:
        entry["metrics"] = [str(path) for path in stage.metrics]
    if stage.plots:
        entry["plots"] = [{str(path): options} for path, options in stage.plots.items()]
    return entry


def dvc_yaml(root: Path, params: dict) -> str:
    """dvc.yaml as the table above and the code under `root` make it (`params`: the composed params.yaml)."""
    pipeline = {"stages": {stage.name: stage_entry(stage, root, params) for stage in STAGES},
                "plots": [{name: chart} for name, chart in COMBINED_PLOTS.items()]}
    text = yaml.safe_dump(pipeline, sort_keys=False, width=10**6, allow_unicode=True)
    lines = []
    for line in text.splitlines():
        if (line.startswith("  ") and not line.startswith("   ") and line.endswith(":") and lines
                and lines[-1] != "stages:") or line == "plots:":
            lines.append("")
        lines.append(line)
    return HEADER + "\n".join(lines) + "\n"


def section_order() -> list[str]:
    """The sections of conf/config.yaml in the order the stages first read them."""
    order: list[str] = []
    for stage in STAGES:
        for cls in stage.params:
            if cls.params_section not in order and cls.params_section in SECTIONS:
                order.append(cls.params_section)
    return order
