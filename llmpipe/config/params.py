"""A stage's view of params.yaml: only the keys dvc.yaml declares for it, read into settings dataclasses.

Each params section is declared once, on a frozen dataclass whose fields are `setting(default, doc, checks)`
(litgpt's args.py style) and which `@params_section` registers under its section name:

    @params_section("tokenize")
    @dataclass(frozen=True)
    class TokenizeSettings:
        num_proc: int = setting(2, "encoding threads", min=1)

    settings = params.read(TokenizeSettings)       # in the stage: checked, complete, frozen

conf/, params.yaml, dvc.yaml's code deps and docs/params.md are generated from these declarations by
`llmpipe compose` (llmpipe.generate). Reading a key dvc.yaml does not declare for the stage raises: DVC would
not know the stage depends on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmpipe.errors import (
    ParamError,
    PipelineError,
    SettingError,
    UndeclaredParamError,
)

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
# Mappings whose keys the user chooses (quantize variants), so any key below them is allowed.
OPEN_MAPPINGS = ("quantize.embeddings", "quantize.output")
_MISSING = object()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
Settings = TypeVar("Settings")


def setting(default: Any = dataclasses.MISSING, doc: str = "", used_when: tuple[str, Any] | None = None,
            **checks: Any) -> Any:
    """A params key declared on its settings dataclass: the default conf/ gives it, the one-line comment conf/
    carries, and the checks its value must pass: min / max / above (numbers), choices (strings, or each item
    of a list), name (a plain name), values (each value of a mapping), non_empty and unique (lists).
    `used_when=(field, value)`: the key matters only when that field of the section has that value (else a
    changed value is accepted with a warning)."""
    metadata = {"doc": doc, "checks": checks, "used_when": used_when}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# Where each params section is declared (filled by @params_section as the declaring modules are imported):
SECTIONS: dict[str, type] = {}                  # a section of conf/config.yaml ("" = top-level keys) → its dataclass
GROUP_OPTIONS: dict[str, dict[str, type]] = {}  # a Hydra group → option → the dataclass whose defaults it is
PRESET_GROUPS: dict[str, type] = {}             # a Hydra group whose options are presets (values written in
#                                                 conf/<group>/<option>.yaml by hand) → the dataclass declaring keys


def params_section(name: str, option: str | None = None, presets: bool = False) -> Any:
    """Class decorator: the settings dataclass declares params section `name` ("" for top-level keys).
    `option`: the section is a Hydra group (conf/<name>/) and the class's defaults are its option `option`
    (other options of the group are presets of the same keys); `presets`: every option of group `name` is a
    preset whose values are written in conf/ by hand."""
    def register(cls: type) -> type:
        cls.params_section = name
        if option is not None:
            GROUP_OPTIONS.setdefault(name, {})[option] = cls
            PRESET_GROUPS.setdefault(name, cls)
        elif presets:
            PRESET_GROUPS[name] = cls
        else:
            SECTIONS[name] = cls
        return cls
    return register


@params_section("")
@dataclasses.dataclass(frozen=True)
class SeedSettings:
    seed: int = setting(1337, "one seed for data generation, initialization and sampling order", min=0, max=2**32 - 1)


def param_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are params keys (declared with `setting`)."""
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def check_settings(instance: Any) -> None:
    """Check the `setting` fields of a settings dataclass as params.yaml's values are checked (type, range, finite),
    whatever built it (params.yaml, a model's config.json, a checkpoint's config, a GGUF file's metadata): call it
    first thing in `__post_init__`. A SettingError names the first field that fails."""
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    fields = [f for f in param_fields(cls) if not dataclasses.is_dataclass(getattr(instance, f.name))]  # checked
    values = {f.name: list(value) if isinstance(value := getattr(instance, f.name), tuple) else value for f in fields}
    reader = StageParams("settings", values, list(values), source="")
    for f in fields:
        try:
            reader.value(f.name, hints[f.name], **f.metadata["checks"])
        except ParamError as error:
            raise SettingError(f.name, str(error).split(f"{f.name}: ", 1)[-1]) from None


def flatten(tree: Any, prefix: str = "", leaves: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested mappings → {dotted key: leaf value}; a mapping at a key in `leaves` is one leaf."""
    if not isinstance(tree, dict) or prefix in leaves:
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key), leaves))
    return flat


def flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Dotted keys of every leaf; an open mapping counts as one leaf."""
    return set(flatten(tree, prefix, OPEN_MAPPINGS))


def schema_keys(conf_dir: str | Path = CONF_DIR) -> set[str]:
    """Every key conf/ knows: those of config.yaml and, for each config group (conf/<group>/), the keys of
    every option, so `data.paths` is known even while `data: embedded` is selected."""
    conf_dir = Path(conf_dir)
    config = yaml.safe_load((conf_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    config.pop("defaults", None)
    keys = flat_keys(config)
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            keys |= flat_keys({group.name: yaml.safe_load(option.read_text(encoding="utf-8")) or {}})
    return keys


def stage_definition(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> dict:
    """The stage's entry in dvc.yaml."""
    path = Path(dvc_yaml)
    try:
        pipeline = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run stages from the repository root") from None
    stages = pipeline.get("stages") or {}
    if stage not in stages:
        raise PipelineError(f"{path}: no stage named '{stage}'")
    return stages[stage]


def declared_dependencies(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The paths dvc.yaml lists under `deps:` for `stage`."""
    return [str(dep) for dep in stage_definition(stage, dvc_yaml).get("deps") or []]


def declared_outputs(definition: dict) -> list[str]:
    """The paths a dvc.yaml stage entry declares under `outs:`, `metrics:` and `plots:`."""
    return [str(next(iter(entry)) if isinstance(entry, dict) else entry)
            for kind in ("outs", "metrics", "plots") for entry in definition.get(kind) or []]


def declared_param_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The params.yaml keys (dotted) that dvc.yaml lists under `params:` for `stage`."""
    keys: list[str] = []
    for entry in stage_definition(stage, dvc_yaml).get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, file_keys in entry.items():
                if Path(file).name == PARAMS_FILE:
                    keys.extend(file_keys or [])
    return keys


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


class StageParams:
    """Read-only access to the declared part of params.yaml, with type and range checks."""

    def __init__(self, stage: str, config: dict, declared: list[str], source: str = PARAMS_FILE):
        self.stage = stage
        self.source = source  # where the values came from, for messages: params.yaml, or the command line
        self._config = config
        self._declared = list(declared)

    @classmethod
    def for_stage(cls, stage: str, config: dict, dvc_yaml: str | Path = "dvc.yaml") -> "StageParams":
        return cls(stage, config, declared_param_keys(stage, dvc_yaml))

    def check_known_keys(self, known: set[str]) -> None:
        """Refuse a key under a declared section, or a top-level section, that conf/ does not know (a typo
        such as `pretrain.learning_rat`, or a `-S +pretrain.learning_rat=...`), naming the closest known key."""
        sections = {key.split(".")[0] for key in known}
        for section in self._config:
            if section not in sections:
                raise self._unknown(str(section), "section", sections)
        for section in self._declared:
            value = _lookup(self._config, section)
            for key in sorted(flat_keys(value, section)) if value is not _MISSING else []:
                if key not in known and not any(key.startswith(k + ".") for k in known):
                    raise self._unknown(key, "key", known)

    def _unknown(self, key: str, kind: str, known: set[str]) -> ParamError:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return ParamError(f"{self.source}: {key}: unknown {kind} (conf/ declares no such key){hint}")

    def is_declared(self, key: str) -> bool:
        return any(key == d or key.startswith(d + ".") for d in self._declared)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The raw value at a dotted key; raises if the key is undeclared or (without default) absent."""
        if not self.is_declared(key):
            raise UndeclaredParamError(
                f"stage '{self.stage}' read params key '{key}', which dvc.yaml does not declare "
                f"under its params (declared: {', '.join(self._declared) or 'none'})"
            )
        value = _lookup(self._config, key)
        if value is _MISSING:
            if default is not _MISSING:
                return default
            raise ParamError(f"{self.source}: missing key '{key}'")
        return value

    def _fail(self, key: str, expected: str, value: Any) -> ParamError:
        return ParamError(f"{self.source}: {key}: expected {expected}, got {_describe(value)}")

    def int(self, key: str, *, min: int | None = None, max: int | None = None,
            choices: list[int] | None = None) -> int:
        value = self.get(key)
        expected = (f"one of {', '.join(map(str, choices))}" if choices else "an integer" + _range_words(min, max))
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, expected, value)
        if (min is not None and value < min) or (max is not None and value > max) or (choices and value not in choices):
            raise self._fail(key, expected, value)
        return value

    def float(self, key: str, *, min: float | None = None, max: float | None = None,
              above: float | None = None) -> float:
        value = self.get(key)
        expected = "a number" + _range_words(min, max, above)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, expected, value)
        value = float(value)
        if not math.isfinite(value) or (min is not None and value < min) or (max is not None and value > max) \
                or (above is not None and value <= above):  # no key means infinity (or NaN)
            raise self._fail(key, expected, value)
        return value

    def bool(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def str(self, key: str, *, choices: list[str] | None = None, optional: bool = False) -> str | None:
        value = self.get(key)
        if value is None and optional:
            return None
        if choices is not None and value not in choices:
            raise self._fail(key, "one of " + ", ".join(choices), value)
        if not isinstance(value, str) or not value:
            raise self._fail(key, "a non-empty string", value)
        return value

    def seed(self) -> int:
        """The pipeline's seed: an integer from 0 to 2**32 - 1 (what numpy and torch accept)."""
        return self.read(SeedSettings).seed

    def name(self, key: str) -> str:
        """A name that is safe as a file name and as an MLflow model name: letters, digits, '.', '_', '-'."""
        value = self.get(key)
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise self._fail(key, "a name of letters, digits, '.', '_' or '-' (no '/', no '..')", value)
        return value

    def str_list(self, key: str, *, choices: list[str] | None = None, non_empty: bool = True,
                 unique: bool = False) -> list[str]:
        """A YAML list of non-empty strings (a lone string is refused: `[q_proj]`, not `q_proj`), with at least one
        item when `non_empty`, each among `choices`, none twice when `unique`."""
        value = self.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, "a list of strings, such as [" + ", ".join((choices or ["a", "b"])[:2]) + "]",
                             value)
        if non_empty and not value:
            raise self._fail(key, "a list of at least one string", value)
        if choices is not None:
            unknown = [v for v in value if v not in choices]
            if unknown:
                raise self._fail(key, "values among " + ", ".join(choices), unknown)
        repeated = sorted({v for v in value if value.count(v) > 1})
        if unique and repeated:
            raise self._fail(key, "each value once", repeated)
        return list(value)

    def str_map(self, key: str, *, keys: list[str] | None, values: list[str]) -> dict[str, str]:
        """A mapping from some of `keys` (any name when None) to one of `values` each; null (the whole mapping or
        one value) means not set."""
        mapping = self.get(key)
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            example = keys[-1] if keys else "NAME"
            raise self._fail(key, "a mapping such as {" + f"{example}: {values[0]}" + "}", mapping)
        unknown = [k for k in mapping if not isinstance(k, str) or (keys is not None and k not in keys)]
        if unknown:
            raise self._fail(key, "keys among " + ", ".join(keys) if keys else "names as keys", unknown)
        for name, value in mapping.items():
            if value is not None and value not in values:
                raise self._fail(f"{key}.{name}", "one of " + ", ".join(values), value)
        return {name: value for name, value in mapping.items() if value is not None}

    def read(self, cls: type[Settings], **given: Any) -> Settings:
        """The section that settings dataclass `cls` declares (`@params_section`), read and checked."""
        return self.section(cls.params_section, cls, **given)

    def section(self, prefix: str, cls: type[Settings], **given: Any) -> Settings:
        """The settings dataclass `cls` filled from the keys under `prefix` ("" for top-level keys), each read
        and checked as its field declares; `given` fields are not read (the caller computed them)."""
        hints = typing.get_type_hints(cls)
        values = dict(given)
        for f in param_fields(cls):
            if f.name not in given:
                values[f.name] = self.value(f"{prefix}.{f.name}" if prefix else f.name, hints[f.name],
                                            **f.metadata["checks"])
        try:
            settings = cls(**values)
        except SettingError as error:
            raise ParamError(f"{self.source}: {prefix}.{error.field}: {error}") from None
        except ValueError as error:
            raise ParamError(f"{self.source}: {prefix}: {error}") from None
        self.warn_unused(prefix, settings)
        return settings

    def warn_unused(self, prefix: str, settings: Any) -> None:
        """One warning line for each key set away from its default that the chosen option does not use (a field
        declared with `used_when=(other_field, value)`): accepted, but it changes nothing."""
        for f in param_fields(type(settings)):
            condition = f.metadata.get("used_when")
            if condition is None or getattr(settings, condition[0]) == condition[1]:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(settings, f.name) != default:
                key = f"{prefix}.{f.name}" if prefix else f.name
                print(f"warning: {self.source}: {key} is set, but {prefix}.{condition[0]} is "
                      f"{getattr(settings, condition[0])}, which does not use it", file=sys.stderr, flush=True)

    def value(self, key: str, kind: Any, **checks: Any) -> Any:
        """The value at `key`, checked as type `kind` (int, float, bool, str, a list / tuple of str, a dict of
        str to str, a settings dataclass, or any of these `| None`) and `checks` (see `setting`)."""
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
            else ()
        if type(None) in options:
            if self.get(key) is None:
                return None
            kind = next(option for option in options if option is not type(None))
        origin = typing.get_origin(kind) or kind
        if dataclasses.is_dataclass(kind):
            return self.section(key, kind)
        if origin is bool:
            return self.bool(key)
        if origin is int:
            return self.int(key, **checks)
        if origin is float:
            return self.float(key, **checks)
        if origin is str:
            return self.name(key) if checks.get("name") else self.str(key, choices=checks.get("choices"))
        if origin in (list, tuple):
            items = self.str_list(key, choices=checks.get("choices"), non_empty=checks.get("non_empty", True),
                                  unique=checks.get("unique", False))
            return tuple(items) if origin is tuple else items
        if origin is dict:
            return self.str_map(key, keys=None, values=checks.get("values"))
        raise TypeError(f"{key}: no reader for settings of type {kind}")

    def declared_values(self) -> dict[str, Any]:
        """Every declared key and its value, flattened to dotted keys (for MLflow params)."""
        flat: dict[str, Any] = {}
        for key in self._declared:
            value = _lookup(self._config, key)
            if value is not _MISSING:
                flat.update(flatten(value, key))
        return flat


def _range_words(min=None, max=None, above=None) -> str:
    words = []
    if min is not None:
        words.append(f">= {min}")
    if above is not None:
        words.append(f"> {above}")
    if max is not None:
        words.append(f"<= {max}")
    return (" " + " and ".join(words)) if words else ""
