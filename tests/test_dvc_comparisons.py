"""Everyday DVC comparisons on the tiny pipeline, once its outputs are committed: `dvc metrics diff` in a
fresh clone (the metrics are in git, not only in a DVC cache nobody else has) and `dvc exp show
--only-changed` after a one-param experiment, narrow enough for a terminal and free of timing noise."""

import re

from conftest import ROOT, dvc, run

# DVC adds a column per changed dependency (an md5, 32-36 characters wide): for a fine-tuning param, the
# models and reports the later stages read; and it drops the columns a terminal has no room for, params
# last. README.md's pattern keeps the held-out accuracy, val_bpb and the params; the test uses the README's own.
FOCUS = re.search(r"dvc exp show --only-changed --drop '([^']+)'", (ROOT / "README.md").read_text()).group(1)
TIMINGS = ("tokens_per_second", "model_flops_utilization", "peak_flops_per_second")


def width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_fresh_clone_diffs_metrics_and_a_one_param_experiment_fits_120_columns(copy_built, tmp_path):
    repo = copy_built()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline outputs"], repo)
    tracked = set(run(["git", "ls-files", "reports", "dvc.lock"], repo).stdout.split())
    assert {"dvc.lock", "reports/tokenizer.json", "reports/pretrain/metrics.json", "reports/pretrain/timings.json",
            "reports/finetune/metrics.json", "reports/evaluate/metrics.json", "reports/evaluate/variants.csv"} <= tracked
    assert "reports/report.md" not in tracked and not any(name.startswith("reports/figures") for name in tracked)

    clone = tmp_path / "clone"  # no DVC cache at all
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    diff = dvc(clone, "metrics", "diff", "HEAD")
    assert "failed to load" not in diff.stdout + diff.stderr
    shown = dvc(clone, "metrics", "show", COLUMNS="120").stdout
    assert "val_bpb" in shown and "!" not in shown and not any(name in shown for name in TIMINGS)
    assert len(shown.splitlines()[0].split()) <= 25  # Path and the headline metrics, not ~170 columns

    dvc(repo, "exp", "run", "-S", "finetune.learning_rate=0.002")
    changed = dvc(repo, "metrics", "diff", COLUMNS="120").stdout
    assert "val_answer_loss" in changed and width(changed) <= 120
    table = dvc(repo, "exp", "show", "--only-changed", "--drop", FOCUS, COLUMNS="120").stdout
    assert width(table) <= 120, table
    # The param is shown (the tiny model's held-out accuracy does not move; on the default config it does).
    assert "finetune.learning_rate" in table and "0.002" in table and "0.003" in table
    everything = dvc(repo, "exp", "show", "--only-changed", COLUMNS="120").stdout  # dependencies too: wider
    assert "finetune.learning_rate" in everything and not any(name in everything for name in TIMINGS)


def test_plots_show_renders_offline_with_every_axis_labelled(copy_built):
    import yaml

    repo = copy_built()
    dvc(repo, "plots", "show")
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "<script src=" not in page and "vegaEmbed(" in page  # vega inlined: nothing to fetch
    plots = [next(iter(p.values())) for p in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]]
    for plot in plots:
        assert plot["title"] in page and f'"{plot["y_label"]}"' in page and f'"{plot["x_label"]}"' in page
    assert page.count('"field": "variant"') >= 2  # the scatter plots say which point is which variant
