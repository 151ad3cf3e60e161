"""Put a stage's previous outputs back when it fails under DVC.

DVC deletes a stage's outputs before it runs the stage's command (only `persist: true` prevents that,
and it would switch off the run-cache a team shares results through). When the stage then fails, whatever
ends it (llmpipe.runner.guard), the outputs of its last successful run are copied back from DVC's cache,
exactly as dvc.lock records them: the workspace is as it was, and `dvc status` shows only the changed input.
An output whose cache objects are missing (a cache cleaned by `dvc gc`, a clone that never pulled) cannot come
back: the stage says which, and which object it lacks.

Outputs declared `cache: false` (metrics, curves: they live in git) never reach DVC's cache, so a
successful stage files a copy of each there itself (`stash_uncached_outputs`), under the md5 DVC
records for it in dvc.lock; restoring then treats them like any other output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from llmpipe import atomic
from llmpipe.config.compose import compose, write_params
from llmpipe.config.params import stage_definition
from llmpipe.tracking.provenance import file_md5

NOT_A_STAGE_DEPENDENCY = "puts the previous outputs back when a stage fails"  # see llmpipe.generate.code_deps


def _cache_path(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def _dvc_cache(root: Path) -> Path:
    """The local cache directory of the DVC repository at `root` (it may be configured elsewhere)."""
    from dvc.repo import (
        Repo,  # deferred: dvc takes ~0.2 s to import; only putting outputs back needs it
    )

    return Path(Repo(str(root.resolve())).cache.local.path)


def _uncached_output_paths(stage: str, dvc_yaml: Path) -> list[Path]:
    definition = stage_definition(stage, dvc_yaml)
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in definition.get(kind) or []:
            if isinstance(entry, dict):
                paths += [Path(path) for path, options in entry.items() if (options or {}).get("cache") is False]
    return paths


def stash_uncached_outputs(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> None:
    """Copy each `cache: false` output file of `stage` into DVC's cache (content-addressed, read-only, as
    DVC stores files), so `restore_outputs` can put it back after a later refused run."""
    dvc_yaml = Path(dvc_yaml)
    try:
        paths = [path for path in _uncached_output_paths(stage, dvc_yaml) if path.is_file()]
        if not paths:
            return
        cache = _dvc_cache(dvc_yaml.parent)
    except Exception:  # not a DVC repository, or no such stage: nothing to keep
        return
    for path in paths:
        target = _cache_path(cache, file_md5(path))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(target) as temp:
                shutil.copyfile(path, temp)
            target.chmod(0o444)


def _matches(path: Path, md5: str, cache: Path) -> bool:
    """Whether `path` holds exactly what dvc.lock records (a directory: the same files, each the same md5)."""
    if not md5.endswith(".dir"):
        return path.is_file() and file_md5(path) == md5
    if not path.is_dir() or not _cache_path(cache, md5).is_file():
        return False  # (without the listing, it cannot be told)
    entries = {entry["relpath"]: entry["md5"] for entry in json.loads(_cache_path(cache, md5).read_text("utf-8"))}
    files = {file.relative_to(path).as_posix(): file for file in path.rglob("*") if file.is_file()}
    return files.keys() == entries.keys() and all(file_md5(files[name]) == entries[name] for name in files)


def _copy_from_cache(path: Path, md5: str, cache: Path) -> None:
    """Put dvc.lock's version of an output at `path` (replacing whatever is there) from a cache that holds all of
    it (`_missing_cache_objects`)."""
    if not md5.endswith(".dir"):
        with atomic.atomic_path(path) as temp:
            _copy_file(_cache_path(cache, md5), temp)
        return
    entries = json.loads(_cache_path(cache, md5).read_text("utf-8"))
    with atomic.atomic_path(path, directory=True) as temp:
        for entry in entries:
            target = temp / entry["relpath"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(_cache_path(cache, entry["md5"]), target)


def _copy_file(source: Path, target: Path) -> None:
    """A copy of a cache file; where the disk is full (or a file-size limit is reached), a hard link to it instead,
    read-only as DVC's own `hardlink` cache type leaves files (every pipeline write replaces a file, never edits it)."""
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        target.unlink(missing_ok=True)
        os.link(source, target)


def lock_stages(text: str) -> dict:
    """The `stages` of a dvc.lock text, read as YAML 1.2 as DVC writes it (PyYAML would read `1e-05` as a string);
    {} for a text that is not a lock file."""
    from ruamel.yaml import (  # deferred: only the put-back path reads dvc.lock
        YAML,
        YAMLError,
    )

    try:
        lock = YAML(typ="safe", pure=True).load(text) if text else None
    except YAMLError:
        return {}
    return (lock.get("stages") or {}) if isinstance(lock, dict) else {}


def put_output_back(stage: str, path: Path, md5: str, cache: Path, what: str) -> bool:
    """Copy the output `path` recorded as `md5` back from DVC's cache; when the cache lacks some of its objects,
    say which (`what`: the state it would have been put back to) and leave it."""
    missing = _missing_cache_objects(md5, cache)
    if missing:
        print(f"{stage}: could not put back {path}{what}: DVC's cache lacks {len(missing)} of its objects "
              f"({os.path.relpath(missing[0])}{', ...' if len(missing) > 1 else ''}; `dvc pull {stage}` "
              "fetches them from the remote, or the stage's next run writes it again)", file=sys.stderr, flush=True)
        return False
    _copy_from_cache(path, md5, cache)
    return True


def restore_outputs(stage: str, lock_file: str | Path = "dvc.lock") -> list[str]:
    """Put back the outputs of `stage` as dvc.lock records them, from DVC's cache; returns their paths.

    Under DVC (DVC_STAGE is this stage), which deleted them before running it, every output that is missing or
    differs (written by the failed run) is replaced. Run by hand, only the missing ones are put back: the others
    are the workspace's own."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return []
    try:
        outs = lock_stages(lock_file.read_text("utf-8"))[stage].get("outs") or []
        cache = _dvc_cache(lock_file.parent)
    except Exception:  # no lock entry for the stage yet, or not a DVC repository: nothing to restore
        return []
    under_dvc = os.environ.get("DVC_STAGE") == stage
    restored = []
    for out in outs:
        path, md5 = Path(out["path"]), out.get("md5", "")
        try:
            if not md5 or (path.exists() and (not under_dvc or _matches(path, md5, cache))):
                continue  # nothing recorded, or nothing to put back
            if put_output_back(stage, path, md5, cache, ""):
                restored.append(str(path))
        except (OSError, ValueError) as exc:  # the rest may still come back
            print(f"{stage}: could not put back {path} ({exc})".splitlines()[0], file=sys.stderr, flush=True)
    return restored


def _missing_cache_objects(md5: str, cache: Path) -> list[Path]:
    """The cache files an output recorded as `md5` needs that are not there (for a directory: its listing, or the
    files the listing names)."""
    listing = _cache_path(cache, md5)
    if not listing.is_file():
        return [listing]
    if not md5.endswith(".dir"):
        return []
    return [_cache_path(cache, entry["md5"]) for entry in json.loads(listing.read_text("utf-8"))
            if not _cache_path(cache, entry["md5"]).is_file()]


EXPERIMENT_START = "refs/exps/exec/EXEC_MERGE"  # while `dvc exp run` runs: the commit of the workspace it started from


def experiment_start_lock(lock_file: Path) -> str | None:
    """dvc.lock as it was when the running `dvc exp run` started (its stash commit, which DVC keeps under
    EXPERIMENT_START while the experiment runs); None outside an experiment, or if git cannot tell."""
    import subprocess

    try:
        shown = subprocess.run(["git", "show", f"{EXPERIMENT_START}:{lock_file.name}"], cwd=lock_file.parent or ".",
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 and shown.stdout else None


def restore_experiment_start(stage: str, lock_file: str | Path = "dvc.lock") -> list[str]:
    """Under `dvc exp run`, a failed stage leaves the earlier stages' new outputs and dvc.lock entries in the
    workspace. Put back dvc.lock as the experiment found it, and every output whose recorded md5 the experiment
    changed, from DVC's cache; returns the outputs put back."""
    lock_file = Path(lock_file)
    start_text = experiment_start_lock(lock_file)
    if start_text is None or not lock_file.is_file() or lock_file.read_text("utf-8") == start_text:
        return []
    start = lock_stages(start_text)
    now = lock_stages(lock_file.read_text("utf-8"))
    cache = _dvc_cache(lock_file.parent)
    restored = []
    for name, entry in start.items():
        recorded_now = {out["path"]: out.get("md5") for out in (now.get(name) or {}).get("outs") or []}
        for out in entry.get("outs") or []:
            path, md5 = Path(out["path"]), out.get("md5", "")
            if not md5 or recorded_now.get(out["path"]) == md5:
                continue
            if put_output_back(stage, path, md5, cache, " as the experiment found it"):
                restored.append(str(path))
    atomic.write_text(lock_file, start_text)
    return restored


def _recorded_params(lock_file: Path) -> dict[str, object]:
    """The params.yaml values dvc.lock records, by dotted key, where every stage that records a key agrees."""
    try:
        stages = lock_stages(lock_file.read_text("utf-8"))
    except OSError:
        return {}
    values: dict[str, object] = {}
    disagree = set()
    for entry in stages.values():
        for key, value in ((entry or {}).get("params") or {}).get("params.yaml", {}).items():
            if key in values and values[key] != value:
                disagree.add(key)
            values.setdefault(key, value)
    return {key: value for key, value in values.items() if key not in disagree}


def _set_dotted(params: dict, key: str, value) -> None:
    *sections, last = key.split(".")
    for section in sections:
        params = params.setdefault(section, {})
    params[last] = value


def restore_params_file(params_file: str | Path = "params.yaml", config_dir: str | Path = "conf",
                        lock_file: str | Path = "dvc.lock") -> bool:
    """Under `dvc exp run`, DVC writes the experiment's `-S` values into params.yaml before the stages run and
    leaves them there when a stage fails. Put back params.yaml as conf/ composes it without them, with the values
    dvc.lock records for its stages (those of an experiment applied before: `dvc exp apply`), so params.yaml and
    dvc.lock agree as they did; returns whether it changed."""
    # deferred: Hydra takes ~0.2 s to import; the multi-process launcher imports this module and needs it only
    # when an experiment's stage fails
    from hydra.core.global_hydra import GlobalHydra

    params_file, config_dir = Path(params_file), Path(config_dir)
    if not (config_dir / "config.yaml").is_file() or not params_file.is_file():
        return False
    GlobalHydra.instance().clear()  # a stage is a Hydra app: composing again needs Hydra's global state free
    try:
        composed = compose(config_dir=config_dir)
        current = yaml.safe_load(params_file.read_text("utf-8"))
    except Exception:  # conf/ itself is broken: leave everything as it is
        return False
    for key, value in _recorded_params(Path(lock_file)).items():
        _set_dotted(composed, key, value)
    if current == composed:
        return False
    write_params(composed, params_file)
    return True
