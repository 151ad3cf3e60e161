"""The seed-sweep summary (llmpipe.sweep.summary) on `dvc exp show --json`-shaped input: which experiments
belong to a sweep, which metrics are headline metrics, and their mean / min / max."""

import json
import subprocess
from dataclasses import replace

import pytest
from harness import BIN, environment

from llmpipe.sweep.queue import QueueTask, queue_progress, queue_states
from llmpipe.sweep.summary import (
    headline_metrics,
    revision_text,
    summarise,
    summary_markdown,
    sweep_experiments,
    up_to_stage,
)

DETAILS = "reports/finetune/details.json"  # not a DVC metric: read from the experiment's outputs


def details(heldout):
    return {"qa_accuracy_heldout_people_major": heldout / 2, "qa_accuracy_heldout_people_questions_cut_to_fit": 3,
            "base_qa_accuracy_heldout_people_major": 0.0, "train_examples": 500}


def revision(name, seed, heldout, bpb=None, metrics=True):
    files = {"reports/finetune/metrics.json": {"data": {"heldout_acc": heldout}},  # DVC's short names
             "reports/evaluate/metrics.json": {"data": {"Q4_K": heldout - 0.1}},
             "reports/tokenizer.json": {"data": {"chars_per_token": 3.2}}}
    if bpb is not None:
        files["reports/pretrain/metrics.json"] = {"data": {"val_bpb": bpb}}
    return {"rev": f"r{seed}", "name": name, "data": {"params": {"params.yaml": {"data": {"seed": seed}}},
                                                     "metrics": files if metrics else {}}}


def committed_details(commits: dict):
    """A stand-in for DVC: `{commit: heldout}` → read_text(commit, path)."""
    return lambda commit, path: json.dumps(details(commits[commit])) if path == DETAILS and commit in commits else None


def exp_show(*revisions):
    return [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc", "name": "main", "data": {}, "experiments": [{"revs": [r]} for r in revisions]}]


def test_only_the_sweeps_experiments_with_metrics_count_ordered_by_seed():
    shown = exp_show(revision("default-seed3", 3, 0.9), revision("default-seed1", 1, 0.7),
                     revision("default-seed2", 2, 0.0, metrics=False),  # failed: no metrics
                     revision("other-seed1", 1, 0.1), revision("default-seed1-old", 1, 0.1))
    for seed, state in ((4, "running"), (5, "queued"), (6, "success")):  # as `dvc exp show` marks queue tasks
        shown[1]["experiments"].append({"executor": {"name": "dvc-task", "state": state},
                                        "revs": [revision(f"default-seed{seed}", seed, 0.5)]})
    experiments = sweep_experiments(shown, "default", read_text=committed_details({}))
    assert [(e.name, e.seed) for e in experiments] == [("default-seed1", 1), ("default-seed3", 3), ("default-seed6", 6)]


def test_headline_metrics_are_named_by_stage_and_leave_out_counts():
    files = {**revision("x-seed1", 1, 0.8, bpb=0.2)["data"]["metrics"], DETAILS: {"data": details(0.8)},
             "reports/evaluate/variants.csv": {"data": [{"variant": "Q4_0", "qa_accuracy_heldout_people": 0.6,
                                                         "file_bytes": 100.0}]}}
    metrics = headline_metrics(files)
    assert metrics == {"finetune.qa_accuracy_heldout_people": 0.8, "finetune.qa_accuracy_heldout_people_major": 0.4,
                       "evaluate.Q4_K.qa_accuracy_heldout_people": pytest.approx(0.7),
                       "evaluate.Q4_0.qa_accuracy_heldout_people": 0.6, "pretrain.val_bpb": 0.2}


def test_per_attribute_accuracies_come_from_each_experiments_committed_details():
    [first, second] = sweep_experiments(exp_show(revision("s-seed1", 1, 0.6), revision("s-seed2", 2, 0.9)), "s",
                                        read_text=committed_details({"r1": 0.6}))
    assert first.metrics["finetune.qa_accuracy_heldout_people_major"] == 0.3
    assert "finetune.qa_accuracy_heldout_people_major" not in second.metrics  # no details.json in its commit
    assert "finetune.base_qa_accuracy_heldout_people_major" not in first.metrics


@pytest.mark.slow  # runs dvc init and dvc add
def test_revision_text_reads_git_and_dvc_files_as_the_revision_holds_them(tmp_path, monkeypatch):
    def run(*args):
        return subprocess.run(list(args), cwd=tmp_path, env=environment(), capture_output=True, text=True,
                              check=True).stdout.strip()

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text('{"y": 1}')
    run(str(BIN / "dvc"), "add", "-q", "b.json")  # in DVC's cache, as the stages' outputs are
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "a")
    (tmp_path / "a.json").write_text('{"x": 2}')  # the workspace is not what was committed
    monkeypatch.chdir(tmp_path)
    head = run("git", "rev-parse", "HEAD")
    assert json.loads(revision_text(head, "a.json")) == {"x": 1} and json.loads(revision_text(head, "b.json")) == {"y": 1}
    assert revision_text(head, "missing.json") is None and revision_text("0" * 40, "a.json") is None


def test_summary_is_mean_min_max_over_the_experiments_that_report_each_metric():
    experiments = sweep_experiments(exp_show(revision("s-seed1", 1, 0.6, bpb=0.3), revision("s-seed2", 2, 0.9),
                                             revision("s-seed3", 3, 0.9, bpb=0.1)), "s",
                                     read_text=committed_details({}))
    summary = summarise(experiments)
    heldout = summary["finetune.qa_accuracy_heldout_people"]
    assert (heldout.mean, heldout.min, heldout.max, heldout.count) == (pytest.approx(0.8), 0.6, 0.9, 3)
    bpb = summary["pretrain.val_bpb"]
    assert (bpb.mean, bpb.min, bpb.max, bpb.count) == (pytest.approx(0.2), 0.1, 0.3, 2)
    table = summary_markdown("s", experiments, summary)
    assert "| finetune.qa_accuracy_heldout_people | 0.8 | 0.6 | 0.9 | 0.6 | 0.9 | 0.9 |" in table


def test_a_sweep_run_up_to_finetune_leaves_out_the_later_stages_metrics():
    experiments = sweep_experiments(exp_show(revision("s-seed1", 1, 0.6, bpb=0.3)), "s", read_text=committed_details({}))
    experiments = [replace(experiments[0], metrics={**experiments[0].metrics, "evaluate.F16.val_bpb": 0.5})]
    stages = ["prepare", "train_tokenizer", "tokenize", "pretrain", "finetune", "quantize", "evaluate"]
    kept = up_to_stage(experiments, "finetune", stages)[0].metrics
    assert "finetune.qa_accuracy_heldout_people" in kept and "pretrain.val_bpb" in kept
    assert "evaluate.F16.val_bpb" not in kept  # the baseline's file, not this experiment's
    assert up_to_stage(experiments, None, stages) == experiments


def tasks(*rows):
    return [QueueTask(rev, name, status) for rev, name, status in rows]


QUEUE = tasks(("cd37f8e", "para1-seed2", "Running"), ("ef0cc83", "para1-seed3", "Queued"),
              ("7c1e71c", "nomix-seed1", "Queued"), ("a94944d", "b16-seed2", "Success"), ("32b9a07", "b16-seed5", "Failed"))


def test_a_sweep_waits_for_its_own_experiments_only_and_notices_when_the_queue_stalls():
    mine = ["para1-seed1", "para1-seed2", "para1-seed3"]
    pending, stalled = queue_progress(QUEUE, mine)
    assert pending == ["para1-seed2", "para1-seed3"] and not stalled  # seed 1 is done; nomix is another sweep's
    assert queue_progress(QUEUE, ["b16-seed2", "b16-seed5"]) == ([], False)
    after_a_kill = [QueueTask(t.rev, t.name, "Failed" if t.status == "Running" else t.status) for t in QUEUE]
    assert queue_progress(after_a_kill, mine) == (["para1-seed3"], True)


def test_a_task_of_the_same_name_from_an_earlier_sweep_is_not_taken_for_ours():
    # Seen: default-seed5 ran again while an older default-seed5's Success, listed after it, ended the wait.
    earlier = {"c6490e8"}  # the revs queued before this sweep
    running = tasks(("311b682", "s-seed5", "Running"), ("c6490e8", "s-seed5", "Success"))
    assert queue_progress(running, ["s-seed5"], earlier) == (["s-seed5"], False)
    # DVC lists failed tasks before succeeded ones, whatever their age: ours failed, the earlier one succeeded.
    failed = tasks(("311b682", "s-seed5", "Failed"), ("c6490e8", "s-seed5", "Success"))
    assert queue_states(failed, earlier) == {"s-seed5": "Failed"}
    assert queue_progress(failed, ["s-seed5"], earlier) == ([], False)


def failed_run(name, seed, heldout):
    """A queued experiment that failed or was killed, as `dvc exp show --json` lists it: the files of the commit it
    started from (the baseline's numbers), an error, executor state "failed"."""
    failed = revision(name, seed, heldout)
    failed["error"] = {"type": "", "msg": "Experiment run failed"}
    return {"executor": {"name": "dvc-task", "state": "failed"}, "revs": [failed]}


def test_a_failed_or_killed_seed_is_failed_excluded_and_a_later_success_replaces_it():
    shown = exp_show(revision("s-seed1", 1, 0.4), revision("s-seed2", 2, 0.6))
    shown[1]["experiments"].append(failed_run("s-seed3", 3, 0.9775))  # the baseline's numbers: never counted
    experiments = sweep_experiments(shown, "s", read_text=committed_details({}))
    assert [(e.seed, e.failed, e.metrics) for e in experiments if e.failed] == [(3, True, {})]
    spread = summarise(experiments)["finetune.qa_accuracy_heldout_people"]
    assert (spread.mean, spread.count) == (pytest.approx(0.5), 2)
    markdown = summary_markdown("s", experiments, summarise(experiments))
    assert "Seeds: 1, 2 (2 experiments)" in markdown
    assert "Failed: seed 3 (1 of 3 experiments, excluded from the statistics; `dvc queue logs s-seed3`" in markdown
    assert "0.9775" not in markdown and "seed 3 |" not in markdown

    shown[1]["experiments"].append({"executor": {"name": "dvc-task", "state": "success"},
                                    "revs": [revision("s-seed3", 3, 0.5)]})  # rerun: it succeeded
    shown[1]["experiments"].append(failed_run("s-seed3", 3, 0.9775))  # the old failed task is still listed
    assert [(e.seed, e.failed) for e in sweep_experiments(shown, "s", read_text=committed_details({}))] == \
        [(1, False), (2, False), (3, False)]


def test_a_sweep_run_reruns_the_failed_seeds_only(monkeypatch, capsys):
    from argparse import Namespace

    from llmpipe.sweep import commands
    from llmpipe.sweep.summary import SweepExperiment

    listed = [SweepExperiment("s-seed1", 1, {"finetune.x": 1.0}, {}), SweepExperiment("s-seed2", 2, {}, {}, failed=True)]
    queued = []
    monkeypatch.setattr(commands, "experiments_of", lambda sweep, *args, **kwargs: listed)
    monkeypatch.setattr(commands, "queue_tasks", lambda: [])
    monkeypatch.setattr(commands, "queue_seeds", lambda sweep, seeds, *args: queued.extend(seeds) or [])
    monkeypatch.setattr(commands, "summary", lambda args: None)
    commands.run(Namespace(sweep="s", seeds=[1, 2, 3], set=[], targets=[], jobs=1, poll_seconds=0))
    assert queued == [2, 3]
    assert capsys.readouterr().out.splitlines() == ["s-seed1: already run, kept",
                                                    "s-seed2: failed or killed earlier; running it again"]


def test_only_the_stages_an_experiment_ran_itself_give_numbers():
    from llmpipe.sweep.summary import own_stages

    params = {"seed": 2, "finetune": {"max_steps": 4}, "evaluate": {"n": 1}}
    lock = {"stages": {
        "prepare": {"params": {"params.yaml": {"seed": 2}}, "outs": [{"path": "data/prepared", "md5": "p2.dir"}]},
        "pretrain": {"params": {"params.yaml": {"seed": 2}},
                     "deps": [{"path": "data/prepared/train.jsonl", "md5": "t2"}],
                     "outs": [{"path": "models/pretrained", "md5": "m2.dir"}]},
        "finetune": {"params": {"params.yaml": {"finetune": {"max_steps": 4}}},
                     "deps": [{"path": "models/pretrained", "md5": "m2.dir"}],
                     "outs": [{"path": "models/finetuned", "md5": "f2.dir"}]},
        # Not run by the experiment (--target finetune): the baseline's entry, its input the baseline's model.
        "evaluate": {"params": {"params.yaml": {"evaluate": {"n": 1}}},
                     "deps": [{"path": "models/finetuned", "md5": "f1.dir"}]}}}
    listing = {"p2.dir": [{"relpath": "train.jsonl", "md5": "t2"}]}.get
    assert own_stages(lock, params, listing) == {"prepare", "pretrain", "finetune"}
    # The baseline's seed in prepare's entry: no stage downstream of it is the experiment's own either.
    lock["stages"]["prepare"]["params"]["params.yaml"]["seed"] = 1
    assert own_stages(lock, params, listing) == set()
    # A file inside a directory output that is not the one its producer recorded.
    lock["stages"]["prepare"]["params"]["params.yaml"]["seed"] = 2
    assert own_stages(lock, params, {"p2.dir": [{"relpath": "train.jsonl", "md5": "t1"}]}.get) == {"prepare"}

    # Through sweep_experiments: the evaluate numbers of a --target finetune experiment are left out.
    shown = exp_show(revision("s-seed2", 2, 0.6))
    shown[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"] = params
    lock["stages"]["evaluate"]["deps"][0]["md5"] = "f1.dir"
    import yaml
    [experiment] = sweep_experiments(shown, "s", read_text=lambda rev, path: yaml.safe_dump(lock)
                                     if path == "dvc.lock" else None, listing=listing)
    assert set(experiment.metrics) == {"finetune.qa_accuracy_heldout_people"}


def test_dvc_lock_is_read_as_dvc_writes_it():
    # DVC writes YAML 1.2: `1e-05` is a number there (PyYAML would read a string and take the stage for not ours).
    lock = "stages:\n  pretrain:\n    params:\n      params.yaml:\n        model.rms_norm_eps: 1e-05\n"
    shown = exp_show(revision("s-seed1", 1, 0.6, bpb=0.2))
    shown[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["model"] = {"rms_norm_eps": 1e-05}
    [experiment] = sweep_experiments(shown, "s", read_text=lambda rev, path: lock if path == "dvc.lock" else None)
    assert experiment.metrics["pretrain.val_bpb"] == 0.2
