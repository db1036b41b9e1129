"""LLaMA-Factory `stage: pt` YAML files: recognise them, map every key onto ptflow's sections, say what changed.

A LLaMA-Factory config is flat (`model_name_or_path`, `cutoff_len`, `learning_rate`, ... at the top
level). ptflow's keys are LLaMA-Factory's names already and unique across sections, so a key the schema
has is routed to its section by name, from the pydantic fields themselves: a field added to a section is
picked up without touching this module. The other LLaMA-Factory keys are data, in llamafactory.yaml (read by
lfrules): `RULES` maps a key onto a differently named ptflow key, ignores it with a warning (and why), or rejects
it (why, and what to do); `LF_DEFAULTS` are the keys whose LLaMA-Factory default differs from ptflow's: when an
LLaMA-Factory file leaves one out, LLaMA-Factory's default is applied (drop-in fidelity) and a note says so. This
module is the engine that applies them.

    from ptflow.config.llamafactory import convert, is_llamafactory, to_ptflow_yaml
    result = convert(flat_dict, yaml_root)         # result.raw: sectioned config; result.notes: what each key became
    print(to_ptflow_yaml(result, "lf.yaml"))        # `ptflow convert-lf lf.yaml`: the same run as a ptflow YAML

`ptflow run lf.yaml` and `ptflow validate lf.yaml` accept such a file directly (`config.load_config` calls
`load`). docs/llamafactory.md holds the table of every key (`ptflow config-reference --llamafactory`).
"""

from __future__ import annotations

import difflib
import logging
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ptflow.config.lfrules import EVAL_STRATEGIES, TABLES, Default, Rule, Unsupported
from ptflow.config.schema import (
    SECRET_KEYS,
    SECTIONS,
    TOP_LEVEL,
    RunConfig,
    apply_overrides,
    is_secret,
    validate_config,
)
from ptflow.errors import ConfigError

log = logging.getLogger("ptflow.llamafactory")

GROUPS = TABLES.groups
"""LLaMA-Factory's argument classes (hparams/*_args.py; training = transformers' TrainingArguments + LF's)."""
RULES: dict[str, Rule] = TABLES.rules
"""LLaMA-Factory keys the schema lacks: mapped onto another ptflow key, ignored with a warning, or rejected."""
PREFIXES: dict[str, Rule] = TABLES.prefixes
"""Families of keys (name prefix) with one rule; their switch (use_galore, fsdp, ...) is in RULES."""
SAME_NAMES: dict[str, tuple[str, ...]] = TABLES.same_names
"""LLaMA-Factory keys ptflow's schema has by the same name (routed dynamically; listed for the docs)."""
DIFFERENCES: dict[str, str] = TABLES.differences
"""Same-named keys whose behaviour differs from LLaMA-Factory's in a way a user should know."""
LF_DEFAULTS: dict[str, Default] = TABLES.defaults
"""LLaMA-Factory (or transformers) defaults that differ from ptflow's, applied when a file leaves the key out."""


# -- conversion ------------------------------------------------------------------------------------------------

@dataclass
class Note:
    key: str
    line: int | None
    kind: str  # "mapped" | "default" | "differs" | "warning"
    text: str

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.key}{where}: {self.text}"


@dataclass
class Conversion:
    """A flat LLaMA-Factory config mapped onto ptflow's sections."""

    raw: dict
    notes: list[Note] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # ptflow key -> the LF key it came from
    lines: dict[str, int] = field(default_factory=dict)  # LF key -> line in the file
    defaulted: dict[str, str] = field(default_factory=dict)  # ptflow key set for an absent LF key -> why


def owners() -> dict[str, str]:
    """Every key of ptflow's schema -> its dotted path (`learning_rate` -> `train.learning_rate`), from the fields."""
    out = {name: name for name in TOP_LEVEL}
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            out[name] = f"{section}.{name}"
    return out


def rule_for(key: str) -> Rule | None:
    if key in RULES:
        return RULES[key]
    return next((rule for prefix, rule in PREFIXES.items() if key.startswith(prefix)), None)


def is_llamafactory(raw: dict) -> bool:
    """A `stage` key, or flat keys with no ptflow section mapping, mark an LLaMA-Factory-style file."""
    if "stage" in raw:
        return True
    if any(key in SECTIONS and isinstance(value, dict) for key, value in raw.items()):
        return False
    return any(key not in TOP_LEVEL for key in raw)


def _nullable(target: str) -> bool:
    section, _, name = target.rpartition(".")
    info = (SECTIONS[section].model_fields if section else RunConfig.model_fields)[name]
    return info.annotation is type(None) or type(None) in typing.get_args(info.annotation)


def _secret(target: str) -> bool:
    return is_secret(target.rpartition(".")[2])


class _Builder:
    def __init__(self, lines: dict[str, int]):
        self.out = Conversion(raw={}, lines=lines)
        self.values: dict[str, Any] = {}

    def line(self, key: str) -> int | None:
        return self.out.lines.get(key)

    def where(self, key: str) -> str:
        line = self.line(key)
        return f"{key} (line {line})" if line else key

    def note(self, key: str, kind: str, text: str) -> None:
        self.out.notes.append(Note(key, self.line(key), kind, text))

    def problem(self, key: str, text: str) -> None:
        self.out.problems.append(f"{self.where(key)}: {text}")

    def put(self, target: str, value: Any, source: str) -> None:
        if target in self.values and self.values[target] != value:
            shown = ("<hidden>", "<hidden>") if _secret(target) else (repr(self.values[target]), repr(value))
            first = self.out.origin[target]
            self.problem(source, f"sets {target} to {shown[1]}, but {self.where(first)} sets it to {shown[0]}; "
                         "keep one of them")
            return
        self.values[target] = value
        self.out.origin[target] = source
        section, _, name = target.rpartition(".")
        (self.out.raw.setdefault(section, {}) if section else self.out.raw)[name] = value


def convert(flat: dict, root: yaml.Node | None = None) -> Conversion:
    """Map a flat LLaMA-Factory config onto ptflow's sections; every key gets a note or a problem."""
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    b = _Builder(lines)
    names = owners()
    for key, value in flat.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):  # a ptflow section inside an LF file: taken as it is
            for name, item in value.items():
                b.put(f"{key}.{name}", item, key)
            b.note(key, "mapped", f"ptflow section, {len(value)} key(s) taken as they are")
            continue
        if key in names:
            _same_name(b, key, value, names[key])
        elif rule_for(key):
            _apply_rule(b, key, value, rule_for(key))
        else:
            close = difflib.get_close_matches(key, [*names, *RULES, *SECTIONS], n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            b.problem(key, f"unknown key: not a LLaMA-Factory pt key, nor a ptflow key. {hint}"
                      "See docs/llamafactory.md for every key ptflow reads")
    _evaluation(b, flat)
    _absent_defaults(b, flat)
    _names(b, flat)
    return b.out


def _same_name(b: _Builder, key: str, value: Any, target: str) -> None:
    if key == "eval_steps":
        return  # meaningful only with eval_strategy: steps (see _evaluation)
    if key == "finetuning_type" and value == "oft":
        b.problem(key, "'oft' is not supported: use lora (or full, freeze)")
        return
    if key == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
        b.put("train.warmup_ratio", value, key)
        b.note(key, "mapped", f"{value} is a fraction of the steps (transformers 5) -> train.warmup_ratio")
        return
    if value is None and not _nullable(target):
        b.note(key, "mapped", f"null -> ptflow's default for {target}")
        return
    b.put(target, value, key)
    b.note(key, "mapped", f"-> {target}")
    if key in DIFFERENCES and key not in LF_DEFAULTS and key != "do_eval":  # those differ only when absent
        b.note(key, "differs", DIFFERENCES[key])


def _apply_rule(b: _Builder, key: str, value: Any, rule: Rule) -> None:
    if rule.action == "mapped":
        try:
            updates, warning = rule.apply(value)
        except Unsupported as exc:
            shown = "<hidden>" if is_secret(key) else repr(value)
            b.problem(key, f"got {shown}; {exc}")
            return
        for target, mapped in updates.items():
            b.put(target, mapped, key)
        if updates:  # eval_strategy maps once every key is read (_evaluation)
            b.note(key, "mapped", "-> " + ", ".join(f"{t} = {'<hidden>' if _secret(t) else repr(v)}"
                                                    for t, v in updates.items()))
        if warning:
            b.note(key, "warning", warning)
        return
    if value in rule.quiet:
        b.note(key, "mapped", f"{'<hidden>' if is_secret(key) else _show(value)}: nothing to do")
        return
    if rule.action == "ignored":
        b.note(key, "warning", f"ignored: {rule.why}")
    else:
        b.problem(key, f"got {'<hidden>' if is_secret(key) else _show(value)}; {rule.why}")


def _evaluation(b: _Builder, flat: dict) -> None:
    """eval_strategy / eval_steps / do_eval as transformers reads them."""
    key = "eval_strategy" if "eval_strategy" in flat else "evaluation_strategy"
    strategy = flat.get(key, "no")
    if "evaluation_strategy" in flat and flat.get("evaluation_strategy") != strategy:
        b.problem("evaluation_strategy", f"is {flat['evaluation_strategy']!r} but eval_strategy is {strategy!r}; "
                  "keep eval_strategy (evaluation_strategy is its transformers 4.x name)")
    if flat.get("do_eval") is True and not flat.get("val_size") and not flat.get("eval_dataset"):
        b.problem("do_eval", "true needs held-out data: set val_size (e.g. 0.05) or eval_dataset (LLaMA-Factory "
                  "refuses it too)")
    if strategy not in EVAL_STRATEGIES:
        return  # reported by the rule
    if strategy == "steps":
        steps = flat.get("eval_steps") or flat.get("logging_steps") or LF_DEFAULTS["logging_steps"].value
        b.put("train.eval_steps", steps, "eval_steps" if flat.get("eval_steps") else key)
        b.note(key, "mapped", f"steps -> train.eval_steps = {steps}"
               + ("" if flat.get("eval_steps") else " (eval_steps absent: logging_steps, as transformers does)"))
    elif strategy == "no" and key in flat:
        b.note(key, "mapped", "no -> no evaluation during training (train.eval_steps unset)")
    elif strategy == "epoch":
        b.note(key, "warning", "epoch: ptflow evaluates every eval_steps, not per epoch; evaluating at the end only "
               "(use eval_strategy: steps with eval_steps)")
    elif "eval_steps" in flat:
        b.note("eval_steps", "warning", "ignored: used only with eval_strategy: steps (LLaMA-Factory would not "
               "evaluate during training either); add eval_strategy: steps")
    if "do_eval" not in flat:
        do_eval = strategy != "no"
        b.put("eval.do_eval", do_eval, "do_eval")
        b.out.defaulted["eval.do_eval"] = "transformers' default (true exactly when eval_strategy is not no)"
        b.note("do_eval", "default", f"absent -> eval.do_eval = {do_eval} (transformers: true exactly when "
               "eval_strategy is not no; ptflow's own default is true)")


def _absent_defaults(b: _Builder, flat: dict) -> None:
    for key, default in LF_DEFAULTS.items():
        if key in flat or key == "do_eval":
            continue
        if key == "disable_gradient_checkpointing" and "gradient_checkpointing" in flat:
            continue
        if key == "finetuning_type" and flat.get("train_from_scratch"):
            b.problem(key, "absent, so LLaMA-Factory's default lora applies, but train_from_scratch: true needs "
                      "full training (adapters on a frozen random model); add finetuning_type: full")
            continue
        b.put(default.target, default.value, key)
        b.out.defaulted[default.target] = default.why
        b.note(key, "default", f"absent -> {default.target} = {default.value!r} ({default.why})")
    if "stage" not in flat:
        b.note("stage", "default", "absent (LLaMA-Factory's default is sft); this file is run as pt")
    if b.values.get("train.do_train") is False and b.values.get("eval.do_eval") is False:
        b.problem("do_train", "do_train and do_eval are both false (absent keys take transformers' default, false): "
                  "nothing would run; add do_train: true")


def _names(b: _Builder, flat: dict) -> None:
    output_dir = flat.get("output_dir")
    if "output_dir" not in flat:
        b.note("output_dir", "default", "absent -> <store>/runs/<run_name> (transformers would use ./trainer_output)")
    if "run_name" not in flat and isinstance(output_dir, str):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", output_dir.strip()).strip("-._")
        if name:
            b.put("run_name", name, "run_name")
            b.out.defaulted["run_name"] = "derived from output_dir, as transformers' run_name"
            b.note("run_name", "default", f"absent -> {name!r}, from output_dir (transformers' run_name defaults to "
                   "output_dir); it names the store's run folder and lineage")


# -- loading (config.load_config hands LLaMA-Factory files here) ------------------------------------------------

def load(raw: dict, source: str, root: yaml.Node | None, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Validate an LLaMA-Factory file as a RunConfig. Overrides: `key=value` in LLaMA-Factory's names (as
    `llamafactory-cli train lf.yaml key=value`) apply before the mapping, `section.key=value` after it."""
    flat_overrides = [o for o in overrides if "." not in o.partition("=")[0]]
    dotted = [o for o in overrides if o not in flat_overrides]
    problems = []
    for item in flat_overrides:
        if item.partition("=")[0].strip() == "hf_hub_token":
            problems.append("override hf_hub_token: a token on the command line shows up in the process list and "
                            "shell history; export HF_TOKEN instead (or set it in the config file)")
    problems += apply_overrides(raw, [o for o in flat_overrides if o.partition("=")[0].strip() != "hf_hub_token"])
    result = convert(raw, root)
    problems += result.problems
    problems += apply_overrides(result.raw, dotted)
    _log(result, source)
    try:
        return validate_config(result.raw, source, None, problems)
    except ConfigError as exc:
        raise ConfigError(source, [_relabel(p, result) for p in exc.problems]) from None


_PROBLEM = re.compile(r"^(?:(?:\(top level\)|[a-z]+): (?=[a-z]+\.\w+: ))?(?P<key>[A-Za-z_][\w.]*): ")


def _relabel(problem: str, result: Conversion) -> str:
    """`train.learning_rate: got ...` -> `learning_rate (line 7) -> train.learning_rate: got ...`; a cross-key
    check's `data: data.streaming: ...` is named by the key it quotes."""
    match = _PROBLEM.match(problem)
    source = result.origin.get(match.group("key")) if match else None
    if not source:
        return problem
    line = result.lines.get(source)
    where = f"{source} (line {line})" if line else f"{source} (absent: LLaMA-Factory's default)"
    return f"{where} -> {match.group('key')}: {problem[match.end():]}"


def _log(result: Conversion, source: str) -> None:
    mapped = sum(n.kind == "mapped" for n in result.notes)
    log.info("%s: LLaMA-Factory pt config, %d key(s) mapped onto ptflow's sections (ptflow convert-lf %s shows "
             "the equivalent ptflow YAML)", source, mapped, source)
    for note in result.notes:
        if note.kind in ("default", "warning"):
            log.warning("%s: %s", source, note)


def describe(result: Conversion, source: str) -> str:
    """The notes as the CLI prints them: what each key became, defaults applied, differences, warnings."""
    out = [f"{source}: LLaMA-Factory pt config, mapped onto ptflow's sections "
           f"(`ptflow convert-lf {source}` writes the equivalent ptflow YAML):"]
    for kind in ("mapped", "default", "differs", "warning"):
        out += [f"  {kind:<8} {note}" for note in result.notes if note.kind == kind]
    return "\n".join(out)


def read(path: str) -> tuple[Conversion | None, dict, yaml.Node | None]:
    """(conversion or None if the file is ptflow-style, raw mapping, YAML node tree); YAML errors raise ConfigError."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    try:
        raw, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), [f"YAML syntax error at {where}: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict) or not is_llamafactory(raw):
        return None, raw if isinstance(raw, dict) else {}, root
    return convert(dict(raw), root), raw, root


# -- ptflow convert-lf ---------------------------------------------------------------------------------------------

def to_ptflow_yaml(result: Conversion, source: str) -> str:
    """The conversion as a ptflow YAML: each key commented with the LLaMA-Factory key it came from."""
    header = [f"# ptflow config converted from the LLaMA-Factory file {source} by `ptflow convert-lf`.",
              "# Each key says which LLaMA-Factory key it came from; `default` marks LLaMA-Factory's default for a "
              "key the file left out."]
    warnings = [n for n in result.notes if n.kind == "warning"]
    if warnings:
        header.append("# Warnings (keys not carried over, or carried over with a change):")
        header += [f"#   - {n}" for n in warnings]
    body = []
    for key, value in result.raw.items():
        if not isinstance(value, dict):
            body.append(_line(key, value, result))
    for section in SECTIONS:
        items = result.raw.get(section)
        if not items:
            continue
        body.append(f"{section}:")
        for name, value in items.items():
            body.append("  " + _line(f"{section}.{name}", value, result))
    return "\n".join(header + [""] + body) + "\n"


def _line(target: str, value: Any, result: Conversion) -> str:
    name, source = target.rpartition(".")[2], result.origin.get(target)
    if name in SECRET_KEYS:
        return f"# {name}: omitted (a secret): export HF_TOKEN instead"
    if target in result.defaulted:
        comment = f"  # absent from the LLaMA-Factory file: {result.defaulted[target]}"
    elif source in (None, name):
        comment = ""
    else:
        comment = f"  # from {source}"
    return f"{name}: {_show(value)}{comment}"


# -- the reference table (docs/llamafactory.md) --------------------------------------------------------------------

STATUSES = ("supported", "supported, differs", "mapped", "ignored", "rejected")


def known_keys() -> dict[str, str]:
    """Every LLaMA-Factory key this module knows -> its group (prefix families as `prefix*`)."""
    keys = {name: group for group, names in SAME_NAMES.items() for name in names}
    keys.update({name: rule.group for name, rule in RULES.items()})
    keys.update({f"{prefix}*": rule.group for prefix, rule in PREFIXES.items()})
    return keys


def status(key: str) -> tuple[str, str, str]:
    """(status, ptflow key or '', explanation) of an LLaMA-Factory key. The schema wins over RULES, so a key
    ptflow gains (say `streaming`) becomes supported without touching the rule."""
    names = owners()
    if key in names:
        note = DIFFERENCES.get(key, "")
        return ("supported, differs" if note else "supported"), names[key], note
    rule = RULES.get(key) or PREFIXES.get(key.rstrip("*"))
    if rule is None:
        raise KeyError(key)
    target = ", ".join(rule.to)
    why = rule.why
    if rule.action != "mapped" and rule.quiet != (None,):
        shown = " / ".join(_show(q) for q in rule.quiet)
        why += f" (accepted as: {shown})" if rule.action == "rejected" else f" (no warning for: {shown})"
    return rule.action, target, why


def _show(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, allow_unicode=True).strip()[1:-1]


def reference_table() -> str:
    """Markdown: one row per LLaMA-Factory key, grouped by its argument class; then ptflow's own keys."""
    rows = ["| LLaMA-Factory key | group | status | ptflow | notes |", "|---|---|---|---|---|"]
    keys = known_keys()
    for group in GROUPS:
        for key in sorted(k for k, g in keys.items() if g == group):
            state, target, why = status(key)
            cell = why.replace("|", "\\|")
            rows.append(f"| `{key}` | {group} | {state} | {f'`{target}`' if target else ''} | {cell} |")
    names = owners()
    extra = sorted(set(names) - set(keys))
    rows += ["", "ptflow's own keys (no LLaMA-Factory counterpart), accepted flat in a LLaMA-Factory file too: "
             + ", ".join(f"`{k}` (`{names[k]}`)" if names[k] != k else f"`{k}`" for k in extra) + "."]
    return "\n".join(rows)


def convert_file(source: str) -> tuple[str, Conversion]:
    """`ptflow convert-lf`: the ptflow YAML of an LLaMA-Factory file, after checking it as `ptflow run` would."""
    from pathlib import Path

    if not Path(source).is_file():
        raise ConfigError(source, [f"config file not found (looked in {Path(source).resolve().parent})"])
    result, raw, root = read(source)
    if result is None:
        raise ConfigError(source, ["already a ptflow config (it has sections and no `stage` key): nothing to convert"])
    load(dict(raw), source, root, [])  # every problem at once, as `ptflow run` reports them
    return to_ptflow_yaml(result, source), result


def explain_file(path: str, overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """For the CLI: what each key of an LLaMA-Factory file became (None for a ptflow file or a missing one).
    It silences this module's log for the process: the CLI prints the notes instead (a flow still logs them)."""
    from pathlib import Path

    if not Path(path).is_file():
        return None  # load_config reports it
    result, raw, root = read(path)
    if result is None:
        return None
    flat = [o for o in overrides if "." not in o.partition("=")[0] and not o.startswith("hf_hub_token=")]
    apply_overrides(raw, flat)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())  # no second copy through logging's last-resort handler
    return describe(convert(raw, root), path)
