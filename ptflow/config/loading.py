"""Reading a config file: YAML (ptflow's sections or a flat LLaMA-Factory pt file), overrides, validation.

    from ptflow.config.loading import load_config
    cfg = load_config("configs/quickstart.yaml", ["train.learning_rate=3e-4"])
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ptflow.config import llamafactory
from ptflow.config.schema import RunConfig, apply_overrides, validate_config
from ptflow.errors import ConfigError


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config; raise one ConfigError naming every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found (looked in {path.resolve().parent})"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), [f"YAML syntax error at {where}: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"expected a mapping of sections at the top level, got {type(raw).__name__}"])
    if llamafactory.is_llamafactory(raw):  # a flat LLaMA-Factory pt file: mapped onto the sections
        return llamafactory.load(raw, str(path), root, overrides)
    problems = apply_overrides(raw, overrides)
    return validate_config(raw, str(path), root, problems)
