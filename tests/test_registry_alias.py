"""The registry alias `champion` (llmpipe.serve.alias): the best held-out accuracy among versions registered from
the workspace; a version from a --temp / queued experiment's temporary copy never takes it, however good."""

import pytest

from llmpipe.serve.alias import ALIAS, record_and_elect


@pytest.fixture
def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("chat")
    return client


def register(client, accuracy: float) -> str:
    version = client.create_model_version("chat", source="file:///nowhere", tags={
        "metric.qa_accuracy_heldout_people": f"{accuracy:.4g}"})
    return version.version


def evaluate_in(monkeypatch, repository, workdir) -> None:
    """Where the evaluate stage runs: DVC points DVC_ROOT at the repository; --temp runs in a copy elsewhere."""
    monkeypatch.setenv("DVC_ROOT", str(repository))
    monkeypatch.chdir(workdir)


def test_champion_is_the_best_workspace_version_and_a_temp_experiment_never_takes_it(registry, tmp_path, monkeypatch):
    repository, temporary = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmp1"
    temporary.mkdir(parents=True)
    evaluate_in(monkeypatch, repository, repository)
    first = register(registry, 0.9775)
    assert record_and_elect(registry, "chat", first) == first
    worse = register(registry, 0.96)  # ran last, with lower held-out accuracy: the champion stays
    assert record_and_elect(registry, "chat", worse) == first

    evaluate_in(monkeypatch, repository, temporary)  # `dvc exp run --temp`, never applied
    better_but_temporary = register(registry, 0.99)
    assert record_and_elect(registry, "chat", better_but_temporary) == first
    assert registry.get_model_version_by_alias("chat", ALIAS).version == first
    tags = {v.version: v.tags for v in registry.search_model_versions("name = 'chat'")}
    assert tags[better_but_temporary]["source"] == "temporary copy" and tags[worse]["source"] == "workspace"
    assert [v for v, t in tags.items() if t.get("alias") == ALIAS] == [first]  # search_model_versions shows it

    evaluate_in(monkeypatch, repository, repository)  # applied, and evaluated in the workspace: eligible
    assert record_and_elect(registry, "chat", better_but_temporary) == better_but_temporary
    tags = {v.version: v.tags for v in registry.search_model_versions("name = 'chat'")}
    assert [v for v, t in tags.items() if t.get("alias") == ALIAS] == [better_but_temporary]
    tie = register(registry, 0.99)  # a tie: the earlier version keeps it
    assert record_and_elect(registry, "chat", tie) == better_but_temporary


class TeammateElectsMeanwhile:
    """A client on the shared registry through which, just before this clone's first alias write, a teammate's
    evaluate registers a better version and elects it: the interleaving two clones on one server can meet."""

    def __init__(self, client, teammate):
        self._client, self._teammate = client, teammate

    def __getattr__(self, name):
        return getattr(self._client, name)

    def set_registered_model_alias(self, *args):
        teammate, self._teammate = self._teammate, None
        if teammate:
            teammate()
        return self._client.set_registered_model_alias(*args)


def test_champion_is_one_answer_for_a_team_electing_at_the_same_time_on_one_registry(registry, tmp_path, monkeypatch):
    evaluate_in(monkeypatch, tmp_path, tmp_path)  # both clones evaluate in their workspace
    mine = register(registry, 0.95)
    theirs = []

    def teammate_evaluates():
        theirs.append(register(registry, 0.98))
        assert record_and_elect(registry, "chat", theirs[0]) == theirs[0]

    # This clone read the registry (its version the best) before the teammate's version existed, and writes last.
    assert record_and_elect(TeammateElectsMeanwhile(registry, teammate_evaluates), "chat", mine) == theirs[0]
    assert registry.get_model_version_by_alias("chat", ALIAS).version == theirs[0]
    tags = {v.version: v.tags for v in registry.search_model_versions("name = 'chat'")}
    assert [v for v, t in tags.items() if t.get("alias") == ALIAS] == [theirs[0]]


def test_an_election_that_meets_another_at_once_repeats_until_it_agrees_with_the_registry(registry, tmp_path,
                                                                                            monkeypatch):
    """Two teammates' evaluate stages elect at once on one server: one of them may collide on the same tag
    (MLflow: "UNIQUE constraint failed"), or elect from a read made before the other's version was tagged."""
    from mlflow.exceptions import MlflowException

    evaluate_in(monkeypatch, tmp_path, tmp_path)
    first, second = register(registry, 0.95), register(registry, 0.99)
    registry.set_model_version_tag("chat", second, "source", "workspace")  # the other teammate's, tagged already
    collide, search = [True], registry.search_model_versions
    stale = [v for v in search("name = 'chat'") if v.version == first]  # a read that missed the other version

    def set_tag(name, version, key, value, original=registry.set_model_version_tag):
        if key == "alias" and collide:
            collide.pop()
            raise MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags")
        return original(name, version, key, value)

    reads = iter([stale])
    monkeypatch.setattr(registry, "set_model_version_tag", set_tag)
    monkeypatch.setattr(registry, "search_model_versions", lambda query: next(reads, None) or search(query))
    assert record_and_elect(registry, "chat", first) == second
    assert registry.get_model_version_by_alias("chat", ALIAS).version == second
    tags = {v.version: v.tags for v in search("name = 'chat'")}
    assert [v for v, t in tags.items() if t.get("alias") == ALIAS] == [second]
