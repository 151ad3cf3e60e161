"""The registry alias a team can rely on: `champion` (`models:/llmpipe-chat@champion`).

Rule: among the versions registered by an evaluate stage that ran in the repository itself (`dvc repro`, or a
`dvc exp run` without `--temp` / `--queue`: results in your workspace, which you can commit), the one with the
best held-out people's QA accuracy (its `metric.qa_accuracy_heldout_people` tag); on a tie, the earlier version
keeps it. A version from a `--temp` or queued experiment, which runs in a temporary copy and is never applied
by itself, does not take it; once applied, `dvc repro -f evaluate` in the workspace makes it eligible. The rule
compares accuracies on the held-out people: give another data setup its own `evaluate.registered_model_name`.

Every evaluate run records where its version came from (tag `source`: workspace | temporary copy) and then
applies the rule; the version holding the alias carries the tag `alias: champion`, so `search_model_versions`
shows it.

The rule reads the registry, not a clone: on a team's shared tracking server every teammate's evaluate elects
among every version registered there, so `champion` is one answer for the team (with each clone's own local
store, each clone has its own). Two evaluate stages may elect at once against one tracking server (two teammates, or `dvc queue
start -j 2`): MLflow writes a tag as read-then-insert, so two writers of the same tag can collide (one gets
the database's unique-constraint error), and either may have read the versions before the other's tag. So each
election repeats, after a collision or when a read made after its own writes picks another version, until it
agrees with what it wrote.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llmpipe.config.layout import repository_root

ALIAS = "champion"
SOURCE_TAG, ALIAS_TAG, RULE_METRIC_TAG = "source", "alias", "metric.qa_accuracy_heldout_people"
WORKSPACE, TEMPORARY = "workspace", "temporary copy"


def registered_from() -> str:
    """workspace when the stage runs in the repository itself; a temporary copy under `dvc exp run --temp` or
    `--queue` (DVC points DVC_ROOT at the repository and runs the stage elsewhere)."""
    return WORKSPACE if Path(os.getcwd()).resolve() == repository_root() else TEMPORARY


def champion(versions) -> str | None:
    """The version (number, as a string) the rule picks among `versions` (MLflow ModelVersion objects)."""
    eligible = [(float(v.tags[RULE_METRIC_TAG]), -int(v.version), v.version) for v in versions
                if v.tags.get(SOURCE_TAG) == WORKSPACE and RULE_METRIC_TAG in v.tags]
    return max(eligible)[2] if eligible else None


ELECTION_ATTEMPTS = 5


def elect(client, name: str) -> str | None:
    """Point the alias (and the `alias` tag) at the rule's pick among the versions now registered; returns it."""
    versions = client.search_model_versions(f"name = '{name}'")
    elected = champion(versions)
    for other in versions:
        if other.tags.get(ALIAS_TAG) == ALIAS and other.version != elected:
            client.delete_model_version_tag(name, other.version, ALIAS_TAG)
    if elected is not None:
        client.set_registered_model_alias(name, ALIAS, elected)
        client.set_model_version_tag(name, elected, ALIAS_TAG, ALIAS)
    return elected


def record_and_elect(client, name: str, version: str) -> str | None:
    """Tag `version` with where it was registered from (a version registered from a temporary copy and later
    evaluated in the workspace becomes eligible), then point the alias at the rule's pick; returns it."""
    from mlflow.exceptions import MlflowException

    if registered_from() == WORKSPACE or not client.get_model_version(name, version).tags.get(SOURCE_TAG):
        client.set_model_version_tag(name, version, SOURCE_TAG, registered_from())
    for attempt in range(1, ELECTION_ATTEMPTS + 1):
        try:
            elected = elect(client, name)
        except MlflowException:  # another evaluate wrote the same tag at the same moment
            if attempt == ELECTION_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
            continue
        if champion(client.search_model_versions(f"name = '{name}'")) == elected:
            break
    if elected is not None:
        print(f"evaluate: {name}@{ALIAS} is version {elected} (the best held-out accuracy registered from the "
              f"workspace; version {version} came from the {registered_from()})", flush=True)
    return elected
