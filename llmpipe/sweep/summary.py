"""A metric as a distribution over seeds: gather the DVC experiments of one seed sweep, summarise each
headline metric as mean / min / max, and record the summary where users look (a JSON and Markdown file,
and one MLflow run tagged with the experiments it covers).

A sweep is a set of DVC experiments named `<sweep>-seed<N>` (llmpipe.sweep.queue queues them). Their DVC
metrics come from `dvc exp show --json`, under the full names their stages' details use (`heldout_acc` is
`finetune.qa_accuracy_heldout_people`); the per-attribute accuracies and every variant's, which are not DVC
metrics (they would crowd `dvc exp show`), from reports/finetune/details.json and reports/evaluate/variants.csv
as the experiment wrote them, read through DVC (its cache, or the remote). So experiments run by a teammate
and pulled (`dvc exp pull`) count the same as local ones.

Only numbers an experiment's own stages wrote count. An experiment that failed or was killed (`dvc queue kill`)
is listed by `dvc exp show` with the files of the commit it started from, the baseline's: it is a failed seed,
with no numbers. Within an experiment, a stage's numbers count when its dvc.lock entry is the experiment's own:
its params are the experiment's params and its inputs the outputs its upstream stages recorded in the same
dvc.lock (`own_stages`); a stage the experiment did not run (`--target`, or a failure) keeps the baseline's
entry, and its numbers are left out.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llmpipe import atomic
from llmpipe.config import layout
from llmpipe.config.params import flatten
from llmpipe.data.world import ATTRIBUTES
from llmpipe.report.tables import (
    EVALUATE_VARIANTS,
    FINETUNE_METRICS,
    HELDOUT_ACCURACY,
    PRETRAIN_METRICS,
)
from llmpipe.runner.restore import lock_stages

# Headline metrics, as `<stage>.<full name>` (the names of details.json and of the stages' MLflow runs).
HEADLINE_PATTERNS = (
    r"pretrain\.val_bpb",
    r"finetune\.qa_accuracy_(finetuned|validation|heldout)_people(_(" + "|".join(ATTRIBUTES) + "))?",
    r"finetune\.best_step",
    r"evaluate\.\w+\.qa_accuracy_heldout_people",
    r"evaluate\.F16\.val_bpb",
)
_HEADLINE = re.compile("|".join(f"(?:{pattern})" for pattern in HEADLINE_PATTERNS))
_STAGE_FILE = re.compile(r"reports/(\w+)/(metrics\.json|details\.json|variants\.csv)")
# Read from each experiment's outputs: the headline patterns above match some of their numbers.
DETAIL_FILES = (layout.FINETUNE_REPORTS / layout.DETAILS, layout.VARIANTS_TABLE)


def experiment_name(sweep: str, seed: int) -> str:
    return f"{sweep}-seed{seed}"


def full_names(stage: str, kind: str, data) -> dict:
    """A stage file's numbers under the full names details.json uses: metrics.json's short DVC names translated,
    variants.csv's rows as `<variant>.<column>`."""
    if kind == "variants.csv":
        return {f"{row['variant']}.{column}": value for row in data for column, value in row.items() if column != "variant"}
    if kind == "metrics.json" and stage == "evaluate":
        return {f"{variant}.{HELDOUT_ACCURACY}": value for variant, value in data.items() if variant in EVALUATE_VARIANTS}
    names = {"pretrain": PRETRAIN_METRICS, "finetune": FINETUNE_METRICS}.get(stage, {}) if kind == "metrics.json" else {}
    return {names.get(key, key): value for key, value in data.items()}


def headline_metrics(metrics_by_file: dict) -> dict[str, float]:
    """`{file: {"data": ...}}` as `dvc exp show --json` gives it (plus the DETAIL_FILES, parsed) → the headline
    metrics, flat, under their full names."""
    flat: dict[str, float] = {}
    for path, content in metrics_by_file.items():
        stage = _STAGE_FILE.fullmatch(path)
        if stage and isinstance(content, dict) and content.get("data"):
            flat.update(flatten(full_names(stage.group(1), stage.group(2), content["data"]), stage.group(1)))
    return {name: float(value) for name, value in flat.items() if _HEADLINE.fullmatch(name)
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


@dataclass(frozen=True)
class SweepExperiment:
    name: str
    seed: int
    metrics: dict[str, float]
    params: dict  # params.yaml as the experiment ran it
    failed: bool = False  # the experiment failed or was killed: no numbers of its own

    def param(self, dotted_key: str):
        value = self.params
        for part in dotted_key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value


def revision_text(revision: str, path: str) -> str | None:
    """A file as `revision` of the DVC repository here holds it (git, DVC's cache or its remote), or None."""
    import dvc.api  # deferred: dvc takes ~0.3 s to import; `llmpipe --help` starts without it

    try:
        return dvc.api.read(path, repo=".", rev=revision)
    except Exception:  # not in that revision, or its data is in no cache or remote we reach
        return None


def parse_file(path: str, text: str | None):
    """A DETAIL_FILES file's content: a JSON object, or a CSV's rows with numbers as floats; None if unreadable."""
    try:
        if path.endswith(".csv"):
            return [{k: v if k == "variant" else float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(io.StringIO(text))]
        return json.loads(text)
    except (TypeError, ValueError, KeyError):
        return None


def cache_listing(md5: str) -> list[dict] | None:
    """The file listing of a directory output recorded as `md5` (`<hash>.dir`), from DVC's local cache; None if
    it is not there."""
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            path = Path(repo.cache.local.path) / md5[:2] / md5[2:]
        return json.loads(path.read_text("utf-8"))
    except Exception:  # not in the cache (a teammate's experiment not pulled): cannot be told
        return None


def _dotted(values: dict, key: str):
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return _MISSING
        values = values[part]
    return values


_MISSING = object()


def own_stages(lock: dict, params: dict, listing=cache_listing) -> set[str]:
    """The stages of an experiment's dvc.lock whose entry is the experiment's own: the params.yaml values it
    records are `params` (the experiment's), and every input another stage produces has the md5 that stage's
    entry records for it (a file inside a directory output: through the directory's `listing`, when available),
    that stage being the experiment's own too. A stage the experiment did not run keeps the baseline's entry,
    which fails one of these."""
    stages = (lock or {}).get("stages") or {}
    outputs = {str(out["path"]): (name, out.get("md5")) for name, entry in stages.items()
               for out in (entry or {}).get("outs") or [] if isinstance(out, dict) and "path" in out}
    verdicts: dict[str, bool] = {}

    def input_matches(path: str, md5) -> bool | None:
        """Whether input `path` (recorded as `md5`) is what its producer's entry records; None: no producer."""
        if path in outputs:
            producer, recorded = outputs[path]
            return is_own(producer) and recorded == md5
        for out_path, (producer, recorded) in outputs.items():
            if path.startswith(out_path.rstrip("/") + "/"):
                entries = listing(recorded) if str(recorded).endswith(".dir") else None
                relative = path[len(out_path.rstrip("/")) + 1:]
                same = entries is None or any(entry.get("relpath") == relative and entry.get("md5") == md5
                                              for entry in entries)
                return is_own(producer) and same
        return None

    def is_own(name: str) -> bool:
        if name not in verdicts:
            verdicts[name] = True  # (a cycle is no evidence against it)
            entry = stages[name] or {}
            recorded_params = ((entry.get("params") or {}).get("params.yaml") or {})
            verdicts[name] = all(_dotted(params, key) == value for key, value in recorded_params.items()) and all(
                input_matches(str(dep.get("path")), dep.get("md5")) is not False
                for dep in entry.get("deps") or [] if isinstance(dep, dict))
        return verdicts[name]

    return {name for name in stages if is_own(name)}


def _experiment(revision: dict, seed: int, read_text, listing, failed: bool) -> SweepExperiment:
    """One revision of `dvc exp show --json` as a SweepExperiment: its headline metrics, but those of stages its
    dvc.lock shows it did not run (none at all when it failed)."""
    data = revision.get("data") or {}
    params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
    if failed:
        return SweepExperiment(revision["name"], seed, {}, params, failed=True)
    files = dict(data["metrics"])
    for path in map(str, DETAIL_FILES):
        details = parse_file(path, read_text(revision["rev"], path)) if revision.get("rev") else None
        if details:
            files[path] = {"data": details}
    metrics = headline_metrics(files)
    recorded = lock_stages(read_text(revision["rev"], "dvc.lock") or "") if revision.get("rev") else {}
    if recorded:
        stages, own = set(recorded), own_stages({"stages": recorded}, params, listing)
        metrics = {name: value for name, value in metrics.items()
                   if name.split(".", 1)[0] not in stages or name.split(".", 1)[0] in own}
    return SweepExperiment(revision["name"], seed, metrics, params)


def sweep_experiments(exp_show: list, sweep: str, read_text=revision_text,
                      listing=cache_listing) -> list[SweepExperiment]:
    """The experiments named `<sweep>-seed<N>` in `dvc exp show --json` output, ordered by seed, each with the
    numbers of its own outputs; the DETAIL_FILES and dvc.lock of each are `read_text(commit, path)`. One that
    failed or was killed is there with `failed` set (and no numbers), unless the same name also succeeded."""
    pattern = re.compile(re.escape(sweep) + r"-seed(\d+)")
    found: dict[str, SweepExperiment] = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            executor = experiment.get("executor") or {}  # a queued task keeps one after it ran: state "success"
            if executor.get("state") in ("queued", "running"):  # no results of its own yet
                continue
            for revision in experiment.get("revs") or []:
                match = pattern.fullmatch(revision.get("name") or "")
                if not match:
                    continue
                data = revision.get("data") or {}
                failed = executor.get("state") == "failed" or bool(revision.get("error"))
                if not failed and not data.get("metrics"):
                    continue
                params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
                seed = int(params.get("seed", match.group(1))) if not failed else int(match.group(1))
                if failed and revision["name"] in found:
                    continue  # a later run of the same name succeeded
                found[revision["name"]] = _experiment(revision, seed, read_text, listing, failed)
    return sorted(found.values(), key=lambda experiment: experiment.seed)


@dataclass(frozen=True)
class Spread:
    mean: float
    min: float
    max: float
    count: int


def up_to_stage(experiments: list[SweepExperiment], last_stage: str | None,
                stage_order: list[str]) -> list[SweepExperiment]:
    """Leave out the metrics of stages after `last_stage` (experiments run with `--target`): their files
    are the baseline's, not the experiment's. `stage_order` is dvc.yaml's stage order."""
    if last_stage is None:
        return experiments
    later = set(stage_order[stage_order.index(last_stage) + 1:])
    return [replace(experiment, metrics={name: value for name, value in experiment.metrics.items()
                                         if name.split(".", 1)[0] not in later})
            for experiment in experiments]


def succeeded(experiments: list[SweepExperiment]) -> list[SweepExperiment]:
    return [experiment for experiment in experiments if not experiment.failed]


def failed_seeds(experiments: list[SweepExperiment]) -> list[int]:
    return [experiment.seed for experiment in experiments if experiment.failed]


def summarise(experiments: list[SweepExperiment]) -> dict[str, Spread]:
    """Per metric, its spread over the experiments that report it (failed ones report nothing)."""
    names = sorted({name for experiment in succeeded(experiments) for name in experiment.metrics})
    summary = {}
    for name in names:
        values = [experiment.metrics[name] for experiment in experiments if name in experiment.metrics]
        summary[name] = Spread(statistics.fmean(values), min(values), max(values), len(values))
    return summary


def failures_line(sweep: str, experiments: list[SweepExperiment]) -> str:
    """What failed, said where the numbers are: `Failed: seed 3 (1 of 5 experiments, excluded ...)`; empty if none."""
    failed = failed_seeds(experiments)
    if not failed:
        return ""
    return (f"Failed: seed {', '.join(map(str, failed))} ({len(failed)} of {len(experiments)} experiments, excluded "
            f"from the statistics; `dvc queue logs {experiment_name(sweep, failed[0])}` says why, and the next "
            "`llmpipe sweep run` runs them again)")


def summary_markdown(sweep: str, experiments: list[SweepExperiment], summary: dict[str, Spread]) -> str:
    done = succeeded(experiments)
    seeds = ", ".join(str(experiment.seed) for experiment in done)
    lines = [f"# Seed sweep `{sweep}`", "", f"Seeds: {seeds} ({len(done)} experiments)", ""]
    if failures_line(sweep, experiments):
        lines += [failures_line(sweep, experiments), ""]
    lines += ["| metric | mean | min | max | " + " | ".join(f"seed {e.seed}" for e in done) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(done)]
    for name, spread in summary.items():
        per_seed = " | ".join(f"{e.metrics[name]:.4g}" if name in e.metrics else "" for e in done)
        lines.append(f"| {name} | {spread.mean:.4g} | {spread.min:.4g} | {spread.max:.4g} | {per_seed} |")
    return "\n".join(lines) + "\n"


def write_summary(directory: Path, sweep: str, experiments: list[SweepExperiment], summary: dict[str, Spread],
                  overrides: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    record = {"sweep": sweep, "overrides": overrides,
              "experiments": [{"name": e.name, "seed": e.seed} for e in succeeded(experiments)],
              "failed": [{"name": e.name, "seed": e.seed} for e in experiments if e.failed],
              "metrics": {name: asdict(spread) for name, spread in summary.items()}}
    json_path, markdown_path = directory / f"{sweep}.json", directory / f"{sweep}.md"
    atomic.write_json(json_path, record)
    atomic.write_text(markdown_path, summary_markdown(sweep, experiments, summary))
    return json_path, markdown_path


def log_summary_run(sweep: str, experiments: list[SweepExperiment], summary: dict[str, Spread],
                    overrides: list[str], markdown_path: Path) -> str:
    """One MLflow run holding the aggregate (`<metric>.mean/.min/.max`), tagged with the experiments it
    covers; a rerun of the same sweep replaces its metrics in a new run. Returns the run id."""
    # deferred: mlflow takes ~1.2 s to import and the store (sqlite3, urllib) ~30 ms; `llmpipe --help` starts
    # without them
    from mlflow.entities import Metric, Param

    from llmpipe.tracking import store

    client, experiment_id = store.connect()
    done, failed = succeeded(experiments), failed_seeds(experiments)
    names = ",".join(experiment.name for experiment in done)
    run = client.create_run(experiment_id, run_name=f"seeds {sweep}", tags={
        "llmpipe.kind": "seed_sweep", "llmpipe.sweep": sweep, "dvc.experiments": names[:5000],
        **({"llmpipe.failed_seeds": ",".join(map(str, failed))} if failed else {})})
    params = [Param("seeds", ",".join(str(e.seed) for e in done)), Param("seed_count", str(len(done))),
              Param("failed_seed_count", str(len(failed)))]
    params += [Param(f"override.{item.split('=', 1)[0]}", item.split("=", 1)[-1]) for item in overrides]
    metrics = [Metric(f"{name}.{statistic}", getattr(spread, statistic), 0, 0)
               for name, spread in summary.items() for statistic in ("mean", "min", "max")]
    for start in range(0, max(len(metrics), 1), 500):
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 500], params=params if start == 0 else [])
    client.log_artifact(run.info.run_id, str(markdown_path))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
