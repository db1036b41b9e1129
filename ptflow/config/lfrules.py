"""The LLaMA-Factory rule tables, read from llamafactory.yaml beside this module and checked once at import.

The tables are data so that a key's action, reason and target are read (and reviewed) in one place and the docs
table is generated from them; only value converters are code, named from the file through `CONVERTERS`. A
malformed file raises `RuleFileError` at import, naming every bad entry: the mapping never runs half-read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ptflow.config.schema import SECTIONS, TOP_LEVEL
from ptflow.errors import PtflowError

RULE_FILE = Path(__file__).with_name("llamafactory.yaml")
ACTIONS = ("mapped", "ignored", "rejected")
EVAL_STRATEGIES = ("no", "steps", "epoch")


class RuleFileError(PtflowError):
    """llamafactory.yaml is malformed; the message names each bad entry and what it should hold."""


class Unsupported(ValueError):
    """A value a mapping cannot express in ptflow; the message says why and what to do."""


# -- value converters: (value, the rule's `to` keys) -> ({ptflow key: value}, warning or None) --------------------

Converter = Callable[[Any, tuple[str, ...]], tuple[dict[str, Any], "str | None"]]


def _copy(value: Any, to: tuple[str, ...]) -> tuple[dict, None]:
    return {to[0]: value}, None


def _negate(value: Any, to: tuple[str, ...]) -> tuple[dict, None]:
    if not isinstance(value, bool):
        raise Unsupported("expected true or false")
    return {to[0]: not value}, None


def _flash_attn(value: Any, to: tuple[str, ...]) -> tuple[dict, str | None]:
    if value in ("auto", "sdpa"):
        return {to[0]: "sdpa"}, None
    if value in ("disabled", "off"):
        return {to[0]: "eager"}, None
    if value in ("fa2", "fa3"):
        return {to[0]: "sdpa"}, (
            f"{value}: the flash-attn package is not used; ptflow trains with PyTorch SDPA, whose own FlashAttention "
            "kernel runs on GPU (train.sdpa_backend: flash insists on it)")
    raise Unsupported("expected auto, disabled, sdpa, fa2 or fa3")


def _eval_strategy(value: Any, to: tuple[str, ...]) -> tuple[dict, None]:
    if value not in EVAL_STRATEGIES:
        raise Unsupported(f"expected one of {', '.join(EVAL_STRATEGIES)}")
    return {}, None  # llamafactory._evaluation writes `to` once every key is read (it needs eval_steps, do_eval)


CONVERTERS: dict[str, Converter] = {
    "copy": _copy, "negate": _negate, "flash_attn": _flash_attn, "eval_strategy": _eval_strategy}
"""Every converter the rule file may name (`convert:`); a name not here fails the file at import."""


# -- the tables ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """What happens to one LLaMA-Factory key that ptflow's schema does not have by that name."""

    action: str  # "mapped" | "ignored" | "rejected"
    group: str
    why: str
    quiet: tuple = ()  # values that need no warning (ignored) or are accepted (rejected)
    to: tuple[str, ...] = ()  # mapped: the ptflow keys it writes
    convert: str = ""  # mapped: a name in CONVERTERS

    def apply(self, value: Any) -> tuple[dict[str, Any], str | None]:
        """Mapped: ({ptflow key: value}, warning or None); raises Unsupported for a value it cannot map."""
        return CONVERTERS[self.convert](value, self.to)


@dataclass(frozen=True)
class Default:
    """A key whose LLaMA-Factory default differs from ptflow's, applied when an LF file leaves it out."""

    target: str  # ptflow key
    value: Any
    why: str


@dataclass(frozen=True)
class Tables:
    groups: tuple[str, ...]
    rules: dict[str, Rule]
    prefixes: dict[str, Rule]
    same_names: dict[str, tuple[str, ...]]
    differences: dict[str, str]
    defaults: dict[str, Default]


def schema_keys() -> set[str]:
    """Every ptflow key a rule may target, dotted (`train.learning_rate`, `store`)."""
    return set(TOP_LEVEL) | {f"{s}.{name}" for s, cls in SECTIONS.items() for name in cls.model_fields}


_SECTIONS = ("groups", "rules", "prefixes", "same_names", "differences", "defaults")
_ENTRY_FIELDS = {"action", "group", "why", "keys", "to", "convert"}


def parse(data: Any, source: str = RULE_FILE.name) -> Tables:
    """The tables of a loaded rule file; every malformed entry is reported at once as RuleFileError."""
    problems: list[str] = []
    if not isinstance(data, dict) or set(data) != set(_SECTIONS):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RuleFileError(f"{source}: expected the top-level keys {', '.join(_SECTIONS)}; found {have}")
    groups = data["groups"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        problems.append("groups: expected a list of LLaMA-Factory argument classes (model, data, ...)")
        groups = []
    targets = schema_keys()
    rules = _entries(data["rules"], "rules", groups, targets, problems)
    prefixes = _entries(data["prefixes"], "prefixes", groups, targets, problems)
    for key in set(rules) & set(prefixes):
        problems.append(f"prefixes: {key} is also in rules; keep one")
    same_names = {}
    if not isinstance(data["same_names"], dict):
        problems.append("same_names: expected {group: [key, ...]}")
    else:
        for group, names in data["same_names"].items():
            if group not in groups or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                problems.append(f"same_names.{group}: expected one of groups ({', '.join(groups)}) with a list of keys")
                continue
            same_names[group] = tuple(names)
    differences = data["differences"] if isinstance(data["differences"], dict) else {}
    for key, text in differences.items():
        if not isinstance(text, str) or not text.strip():
            problems.append(f"differences.{key}: expected the text users read; got {text!r}")
    defaults = {}
    for key, entry in (data["defaults"] if isinstance(data["defaults"], dict) else {}).items():
        if not isinstance(entry, dict) or set(entry) != {"target", "value", "why"}:
            problems.append(f"defaults.{key}: expected target, value and why")
        elif entry["target"] not in targets:
            problems.append(f"defaults.{key}: target {entry['target']!r} is not a ptflow key (section.name)")
        else:
            defaults[key] = Default(entry["target"], entry["value"], str(entry["why"]))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise RuleFileError(f"{source}: {len(problems)} problem(s) in the LLaMA-Factory rule file:\n{lines}")
    return Tables(tuple(groups), rules, prefixes, same_names, dict(differences), defaults)


def _entries(items: Any, name: str, groups: list, targets: set[str], problems: list[str]) -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    if not isinstance(items, list):
        problems.append(f"{name}: expected a list of entries")
        return out
    for i, entry in enumerate(items):
        keys = entry.get("keys") if isinstance(entry, dict) else None
        label = f"{name}[{i}]" + (f" ({', '.join(map(str, keys))})" if isinstance(keys, dict) else "")
        bad = _entry_problems(entry, groups, targets)
        problems += [f"{label}: {p}" for p in bad]
        if bad:
            continue
        for key, quiet in keys.items():
            if key in out:
                problems.append(f"{label}: {key} is already in an earlier entry; keep one")
            out[key] = Rule(entry["action"], entry["group"], entry["why"], tuple(quiet),
                            tuple(entry.get("to", ())), entry.get("convert", ""))
    return out


def _entry_problems(entry: Any, groups: list, targets: set[str]) -> list[str]:
    if not isinstance(entry, dict):
        return ["expected a mapping with action, group, why and keys"]
    out = [f"unknown field {f!r} (fields: {', '.join(sorted(_ENTRY_FIELDS))})" for f in set(entry) - _ENTRY_FIELDS]
    action = entry.get("action")
    if action not in ACTIONS:
        out.append(f"action {action!r}: use one of {', '.join(ACTIONS)}")
    if entry.get("group") not in groups:
        out.append(f"group {entry.get('group')!r}: use one of {', '.join(groups)}")
    if not isinstance(entry.get("why"), str) or not entry["why"].strip():
        out.append("why: give the reason users read in the warning, the error or the docs")
    keys = entry.get("keys")
    if not isinstance(keys, dict) or not keys or not all(isinstance(q, list) for q in keys.values()):
        out.append("keys: expected {key: [quiet values]} (an empty list: no quiet value)")
    if action == "mapped":
        to = entry.get("to")
        if not isinstance(to, list) or not to or any(t not in targets for t in to):
            out.append(f"to {to!r}: a mapped key names the ptflow keys it writes (section.name, from the schema)")
        if entry.get("convert") not in CONVERTERS:
            out.append(f"convert {entry.get('convert')!r}: use one of {', '.join(CONVERTERS)} (lfrules.CONVERTERS)")
        if isinstance(keys, dict) and any(keys.values()):
            out.append("keys: a mapped key maps every value; leave its quiet list empty")
    elif "to" in entry or "convert" in entry:
        out.append(f"to/convert: only a mapped entry writes ptflow keys (this one is {action})")
    return out


def load(path: Path = RULE_FILE) -> Tables:
    """Read and check the rule file (RuleFileError names what is wrong)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RuleFileError(f"{path}: cannot read the LLaMA-Factory rule file ({exc}); reinstall ptflow") from None
    return parse(data, str(path))


TABLES = load()
