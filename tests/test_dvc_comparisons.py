"""Everyday comparisons after a one-param fine-tuning experiment on the tiny pipeline: plain `dvc exp show
--only-changed` fits a 120-column terminal, `dvc plots diff` tells the revisions apart, and the two pipeline runs
compare like for like in MLflow (same metric keys, effective param values, commits)."""

import json

import pytest
from harness import STAGES, dvc, mlflow_runs, ran, run

pytestmark = pytest.mark.xdist_group("dvc_comparisons")  # one worker: the experiment fixture runs three stages

# On the default config every fine-tuning and evaluation metric moves in a fine-tuning experiment; the tiny
# model answers no question (every accuracy is 0), so the baseline gets the default config's accuracies
# (recorded with `dvc commit`, as a run that produced them would) for the experiment to differ from.
DEFAULT_LIKE = {"reports/finetune/metrics.json": {"heldout_acc": 0.9775, "tuned_acc": 1.0},
                "reports/evaluate/metrics.json": {"Q2_K": 0.885, "Q4_K": 0.9825}}
DATE_WIDTH = len("Dec 04, 2026") - len("03:34 PM")  # `Created` of a baseline committed on an earlier day


@pytest.fixture(scope="module")
def experiment(built_repo, tmp_path_factory):
    """The built repository with a committed baseline, after `dvc exp run -S finetune.learning_rate=0.002`."""
    import shutil

    repo = tmp_path_factory.mktemp("comparisons") / "repo"
    shutil.copytree(built_repo, repo, symlinks=True)
    for path, values in DEFAULT_LIKE.items():
        (repo / path).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    dvc(repo, "commit", "-f", "finetune", "evaluate")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    assert ran(dvc(repo, "exp", "run", "-S", "finetune.learning_rate=0.002").stdout) == ["finetune", "quantize",
                                                                                          "evaluate"]
    return repo


def width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_plain_exp_show_only_changed_fits_120_columns_with_the_param_and_the_heldout_accuracy(experiment):
    table = dvc(experiment, "exp", "show", "--only-changed", "--no-pager", COLUMNS="120").stdout
    header, baseline = (next(line for line in table.splitlines() if word in line) for word in ("Experiment", "0.003"))
    for column in ("heldout_acc", "tuned_acc", "Q4_K", "Q2_K", "finetune.learning_rate"):
        assert column in header, table  # every changed metric and the param, none collapsed into `…`
    assert "0.9775" in baseline and "0.002" in table
    assert width(table) <= 120 - DATE_WIDTH, table
    changed = dvc(experiment, "metrics", "diff", COLUMNS="120").stdout
    assert "heldout_acc" in changed and width(changed) <= 120
    # The README's command, which keeps the changed params in view once several experiments exist: the same
    # columns without the creation time and the dependencies' md5s (column names that are paths).
    readme = dvc(experiment, "exp", "show", "--only-changed", "--drop", "Created|.*/", "--no-pager",
                 COLUMNS="120").stdout
    header = next(line for line in readme.splitlines() if "Experiment" in line)
    assert header.split() == ["Experiment", "heldout_acc", "tuned_acc", "Q2_K", "Q4_K", "finetune.learning_rate"], readme
    assert "…" not in readme and width(readme) <= 120


def test_pipeline_runs_compare_like_for_like_in_mlflow(experiment):
    client, runs = mlflow_runs(experiment)
    pipelines = [r for r in runs if r.data.tags.get("llmpipe.kind") == "pipeline"]
    [baseline] = [r for r in pipelines if "dvc.experiment" not in r.data.tags]
    [changed] = [r for r in pipelines if "dvc.experiment" in r.data.tags]
    assert set(changed.data.metrics) == set(baseline.data.metrics) == {
        "train_tokenizer.chars_per_token", "pretrain.val_bpb", "finetune.heldout_acc", "finetune.tuned_acc",
        "evaluate.Q4_K", "evaluate.Q2_K"}
    assert changed.data.metrics["pretrain.val_bpb"] == baseline.data.metrics["pretrain.val_bpb"]  # not rerun
    assert (baseline.data.params["finetune.learning_rate"], changed.data.params["finetune.learning_rate"]) == (
        "0.003", "0.002")
    # null in params.yaml: logged as the value fine-tuning used, lora's floor scaled with the peak that was set
    floors = {"0.003": "0.0001", "0.002": str(0.002 * 1e-4 / 3e-3)}
    for pipeline in (baseline, changed):
        params = pipeline.data.params
        assert params["finetune.min_learning_rate"] == floors[params["finetune.learning_rate"]]
        assert "finetune.min_learning_rate" in pipeline.data.tags["llmpipe.params_defaulted"]
        assert "None" not in pipeline.data.params.values()
        assert len(pipeline.data.tags["mlflow.source.git.commit"]) == 40
    head = run(["git", "rev-parse", "HEAD"], experiment).stdout.strip()
    assert changed.data.tags["mlflow.source.git.commit"] == head != baseline.data.tags["mlflow.source.git.commit"]
    assert baseline.data.tags["llmpipe.stages_ran"] == ",".join(STAGES)
    assert changed.data.tags["llmpipe.stages_ran"] == "finetune,quantize,evaluate"
    assert changed.data.tags["llmpipe.stages_cached"] == "prepare,train_tokenizer,tokenize,pretrain"


def test_plots_diff_labels_every_axis_and_tells_revisions_apart(experiment):
    import yaml

    page = dvc(experiment, "plots", "diff", "HEAD", "--json")
    plots = json.loads(page.stdout)["data"]
    pipeline = yaml.safe_load((experiment / "dvc.yaml").read_text())
    defined = {name: props for entry in pipeline["plots"] for name, props in entry.items()}
    defined |= {path: props for stage in pipeline["stages"].values() for entry in stage.get("plots") or []
                for path, props in entry.items()}
    assert set(plots) == set(defined)
    for name, props in defined.items():
        spec = plots[name][0]["content"]
        assert spec["title"]["text"] == props["title"], name
        assert (spec["encoding"]["x"]["title"], spec["encoding"]["y"]["title"]) == (props["x_label"], props["y_label"])
        assert "smooth" not in json.dumps(spec.get("params", [])), name  # no meaningless smoothing slider
        assert {point["rev"] for point in spec["data"]["values"]} == {"HEAD", "workspace"}, name
        if props["template"] == "scatter_variants":
            assert spec["encoding"]["color"]["field"] == "rev" and spec["encoding"]["shape"]["field"] == "variant"
            assert spec["encoding"]["x"]["scale"]["padding"] > 0  # no point half cut off at an axis' edge
    dvc(experiment, "plots", "show")
    assert "<script src=" not in (experiment / "dvc_plots" / "index.html").read_text()  # vega inlined: offline
