"""Every generated file of the repository, from the facts written once by hand:

    settings dataclasses (defaults, docs, checks) ──→ conf/*.yaml ──(Hydra)──→ params.yaml
                                                  └─→ docs/params.md
    the stage table + each stage's imports ───────→ dvc.yaml

`llmpipe compose` writes them; `llmpipe compose --check` writes nothing and names the stale ones (CI runs it
through tests/test_generated.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from llmpipe import atomic
from llmpipe.config.compose import compose
from llmpipe.config.params import PARAMS_FILE
from llmpipe.generate.conf_files import conf_texts, params_reference
from llmpipe.generate.dvc_pipeline import dvc_yaml, section_order

CONF_DIR, DVC_YAML, REFERENCE = Path("conf"), Path("dvc.yaml"), Path("docs/params.md")
COMMAND = "llmpipe compose"


def params_text(params: dict) -> str:
    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)


def derived_files(root: Path, overrides: list[str] | None = None) -> dict[Path, str]:
    """Each generated file (relative to `root`) and what it should hold; params.yaml with `overrides`."""
    conf_dir = root / CONF_DIR
    sections = section_order()
    texts = {path.relative_to(root): text for path, text in conf_texts(sections, conf_dir).items()}
    with tempfile.TemporaryDirectory() as scratch:  # compose the conf/ about to be written, not the one on disk
        for path, text in texts.items():
            target = Path(scratch) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        params = compose(list(overrides or []), Path(scratch) / CONF_DIR)
        defaults = params if not overrides else compose([], Path(scratch) / CONF_DIR)
    texts[Path(PARAMS_FILE)] = params_text(params)
    texts[DVC_YAML] = dvc_yaml(root, defaults)
    texts[REFERENCE] = params_reference(sections, conf_dir)
    return texts


def stale_files(root: Path) -> list[Path]:
    """The generated files whose content differs from what `llmpipe compose` writes (params.yaml: the default
    composition)."""
    return [path for path, text in derived_files(root).items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]


def write_derived_files(root: Path, overrides: list[str] | None = None) -> list[Path]:
    """Write every generated file that changed; returns them."""
    changed = []
    for path, text in derived_files(root, overrides).items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(target, text)
            changed.append(path)
    return changed

