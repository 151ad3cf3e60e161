"""The seed-sweep summary (llmpipe.eval.seeds) on `dvc exp show --json`-shaped input: which experiments
belong to a sweep, which metrics are headline metrics, and their mean / min / max."""

import pytest

from llmpipe.eval.seeds import headline_metrics, summarise, summary_markdown, sweep_experiments


def revision(name, seed, heldout, bpb=None, metrics=True):
    files = {"reports/finetune/metrics.json": {"data": {"qa_accuracy_heldout_people": heldout,
                                                        "qa_accuracy_heldout_people_major": heldout / 2,
                                                        "qa_accuracy_heldout_people_questions_cut_to_fit": 3,
                                                        "train_examples": 500}},
             "reports/evaluate/metrics.json": {"data": {"Q4_0": {"qa_accuracy_heldout_people": heldout - 0.1,
                                                                  "file_bytes": 100}}},
             "reports/tokenizer.json": {"data": {"vocab_size": 1024}}}
    if bpb is not None:
        files["reports/pretrain/metrics.json"] = {"data": {"val_bpb": bpb, "steps": 800}}
    return {"rev": f"r{seed}", "name": name, "data": {"params": {"params.yaml": {"data": {"seed": seed}}},
                                                     "metrics": files if metrics else {}}}


def exp_show(*revisions):
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc", "name": "main", "data": {}, "experiments": [{"revs": [r]} for r in revisions]}]


def test_only_the_sweeps_experiments_with_metrics_count_ordered_by_seed():
    shown = exp_show(revision("default-seed3", 3, 0.9), revision("default-seed1", 1, 0.7),
                     revision("default-seed2", 2, 0.0, metrics=False),  # failed: no metrics
                     revision("other-seed1", 1, 0.1), revision("default-seed1-old", 1, 0.1))
    experiments = sweep_experiments(shown, "default")
    assert [(e.name, e.seed) for e in experiments] == [("default-seed1", 1), ("default-seed3", 3)]


def test_headline_metrics_are_named_by_stage_and_leave_out_counts():
    metrics = headline_metrics(revision("x-seed1", 1, 0.8, bpb=0.2)["data"]["metrics"])
    assert metrics == {"finetune.qa_accuracy_heldout_people": 0.8, "finetune.qa_accuracy_heldout_people_major": 0.4,
                       "evaluate.Q4_0.qa_accuracy_heldout_people": pytest.approx(0.7), "pretrain.val_bpb": 0.2}


def test_summary_is_mean_min_max_over_the_experiments_that_report_each_metric():
    experiments = sweep_experiments(exp_show(revision("s-seed1", 1, 0.6, bpb=0.3), revision("s-seed2", 2, 0.9),
                                             revision("s-seed3", 3, 0.9, bpb=0.1)), "s")
    summary = summarise(experiments)
    heldout = summary["finetune.qa_accuracy_heldout_people"]
    assert (heldout.mean, heldout.min, heldout.max, heldout.count) == (pytest.approx(0.8), 0.6, 0.9, 3)
    bpb = summary["pretrain.val_bpb"]
    assert (bpb.mean, bpb.min, bpb.max, bpb.count) == (pytest.approx(0.2), 0.1, 0.3, 2)
    table = summary_markdown("s", experiments, summary)
    assert "| finetune.qa_accuracy_heldout_people | 0.8 | 0.6 | 0.9 | 0.6 | 0.9 | 0.9 |" in table
