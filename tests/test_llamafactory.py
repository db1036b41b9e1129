"""LLaMA-Factory pt YAMLs as they are: mapping, defaults, ignored and rejected keys, convert-lf, end-to-end runs.

The YAMLs are written here in LLaMA-Factory's documented format (its examples/train_lora/llama3_lora_pretrain.yaml
and train_full / freeze examples with `stage: pt`), pointed at the tiny test assets, and run through the plain
stage functions in seconds; the output tree is checked against LLaMA-Factory's file names and log fields.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ptflow.config import lfrules
from ptflow.config import llamafactory as lf
from ptflow.config.loading import load_config
from ptflow.config.schema import SECTIONS, TOP_LEVEL, validate_config
from ptflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# LLaMA-Factory's LogCallback writes these on every trainer_log.jsonl line (train/callbacks.py, on_log)
LOG_FIELDS = {"current_steps", "total_steps", "epoch", "percentage", "elapsed_time", "remaining_time"}
TRAIN_LOG_FIELDS = LOG_FIELDS | {"loss", "lr", "throughput", "total_tokens"}
# transformers' Trainer.save_metrics("train" / "eval") keys, plus run_pt's perplexity
TRAIN_RESULTS = {"epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
                 "train_steps_per_second"}
EVAL_RESULTS = {"epoch", "eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                "perplexity"}


def write(tmp_path: Path, text: str, name: str = "lf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(tiny_model_dir, tiny_data_dir, **extra) -> str:
    """A short LLaMA-Factory pt YAML on the tiny assets; `extra` keys are appended as YAML."""
    text = textwrap.dedent(f"""\
        ### model
        model_name_or_path: {tiny_model_dir}
        train_from_scratch: true

        ### method
        stage: pt
        do_train: true
        finetuning_type: full

        ### dataset
        dataset: stdlib_docs
        dataset_dir: {tiny_data_dir}
        cutoff_len: 64
        """)
    if extra:
        text += yaml.safe_dump(extra, sort_keys=False)
    return text


def notes(result: lf.Conversion, kind: str) -> dict[str, str]:
    return {n.key: n.text for n in result.notes if n.kind == kind}


def converted(text: str) -> lf.Conversion:
    return lf.convert(yaml.safe_load(text), yaml.compose(text))


# -- the schema stays mappable by name ---------------------------------------------------------------------------

def test_schema_keys_are_unique_across_sections_and_top_level():
    names = collections.Counter([*TOP_LEVEL, *(f for cls in SECTIONS.values() for f in cls.model_fields)])
    twice = sorted(name for name, n in names.items() if n > 1)
    assert not twice, f"{twice} are in more than one section: a flat LLaMA-Factory key must name one ptflow key"


def test_the_rule_file_fits_the_schema():
    """What the loader cannot check alone: the rule file against ptflow's schema as it is now."""
    names = lf.owners()
    shadowed = sorted(set(lf.RULES) & set(names))
    assert not shadowed, (f"ptflow's schema has {shadowed} now: remove them from ptflow/config/llamafactory.yaml rules "
                          "(schema keys are routed by name) and regenerate docs/llamafactory.md")
    missing = [k for group in lf.SAME_NAMES.values() for k in group if k not in names]
    assert not missing, f"{missing} left the schema: give them a rule in ptflow/config/llamafactory.yaml"
    same = {k for group in lf.SAME_NAMES.values() for k in group}
    assert sorted(set(lf.DIFFERENCES) - same) == [], "differences are for same-named keys only"
    assert sorted(set(lf.LF_DEFAULTS) - same - set(lf.RULES)) == [], "a default for a key the mapping does not know"
    shadowing_prefixes = sorted(p for p in lf.PREFIXES if any(name.startswith(p) for name in names))
    assert not shadowing_prefixes, f"{shadowing_prefixes} would swallow ptflow keys: schema keys win, narrow the prefix"


RULE_TEXT = lfrules.RULE_FILE.read_text()
DELETE = object()
FIRST_MAPPED = next(i for i, e in enumerate(yaml.safe_load(RULE_TEXT)["rules"]) if e["action"] == "mapped")


def corrupt(path: str, value):
    """The shipped rule file with one field replaced (`rules.3.action`), or removed when value is DELETE."""
    data = yaml.safe_load(RULE_TEXT)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("rules.1.action", "rejectd", r"rules\[1\] \(\w+\): action 'rejectd': use one of mapped, ignored, rejected"),
    ("rules.1.group", "tokenizer", r"rules\[1\] \(\w+\): group 'tokenizer': use one of model, data"),
    ("rules.1.why", DELETE, r"rules\[1\] \(\w+\): why: give the reason"),
    (f"rules.{FIRST_MAPPED}.convert", "sdpa", r"convert 'sdpa': use one of copy, negate"),
    (f"rules.{FIRST_MAPPED}.to", ["model.flash"], r"to \['model.flash'\]: a mapped key names the ptflow keys"),
    ("rules.2.keys", {"stage": []}, r"rules\[2\] \(stage\): stage is already in an earlier entry"),
    ("prefixes.0.because", "x", r"prefixes\[0\] \(.*\): unknown field 'because'"),
    ("defaults.logging_steps.target", "train.log_steps", r"defaults.logging_steps: target 'train.log_steps'"),
    ("differences", DELETE, r"expected the top-level keys groups, rules"),
])
def test_a_malformed_rule_file_fails_naming_the_entry(path, value, message):
    with pytest.raises(lfrules.RuleFileError, match=message):
        lfrules.parse(corrupt(path, value), "llamafactory.yaml")


def test_an_unreadable_rule_file_fails_at_load(tmp_path):
    path = tmp_path / "llamafactory.yaml"
    path.write_text("rules: [\n")
    with pytest.raises(lfrules.RuleFileError, match="(?s)cannot read the LLaMA-Factory rule file .*reinstall ptflow"):
        lfrules.load(path)


@pytest.mark.parametrize("raw, expected", [
    ({"stage": "pt", "model": {"model_name_or_path": "x"}}, True),
    ({"model_name_or_path": "x", "dataset": "d"}, True),
    ({"model": {"model_name_or_path": "x"}, "data": {"dataset": "d"}}, False),
    ({"run_name": "r", "seed": 1}, False),
    ({}, False),
])
def test_detection(raw, expected):
    assert lf.is_llamafactory(raw) is expected


# -- mapping ---------------------------------------------------------------------------------------------------

LORA_PRETRAIN = """\
    ### model
    model_name_or_path: {model}
    trust_remote_code: true

    ### method
    stage: pt
    do_train: true
    finetuning_type: lora
    lora_rank: 8
    lora_target: all

    ### dataset
    dataset: stdlib_docs
    dataset_dir: {data}
    cutoff_len: 64
    max_samples: 1000
    overwrite_cache: true
    preprocessing_num_workers: 2

    ### output
    output_dir: {out}
    logging_steps: 2
    save_steps: 4
    plot_loss: true
    overwrite_output_dir: true

    ### train
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 2
    learning_rate: 1.0e-2
    max_steps: 6
    lr_scheduler_type: cosine
    warmup_ratio: 0.1
    bf16: false
    ddp_timeout: 180000000

    ### eval
    val_size: 0.1
    per_device_eval_batch_size: 2
    eval_strategy: steps
    eval_steps: 3
    """


def test_llama3_lora_pretrain_example_maps_onto_the_sections(tmp_path, tiny_weights_dir, tiny_data_dir):
    path = write(tmp_path, LORA_PRETRAIN.format(model=tiny_weights_dir, data=tiny_data_dir, out="saves/llama3/lora/pt"))
    cfg = load_config(path)
    assert (cfg.model.model_name_or_path, cfg.model.trust_remote_code) == (str(tiny_weights_dir), True)
    assert (cfg.train.finetuning_type, cfg.train.lora_rank, cfg.train.lora_target) == ("lora", 8, ["all"])
    assert (cfg.data.dataset, cfg.data.cutoff_len, cfg.data.val_size, cfg.data.max_samples) == (
        ["stdlib_docs"], 64, 0.1, 1000)
    assert (cfg.train.learning_rate, cfg.train.lr_scheduler_type, cfg.train.warmup_ratio) == (1e-2, "cosine", 0.1)
    assert (cfg.train.logging_steps, cfg.train.save_steps, cfg.train.eval_steps) == (2, 4, 3)
    assert cfg.eval.do_eval is True and cfg.eval.per_device_eval_batch_size == 2
    assert cfg.output.output_dir == "saves/llama3/lora/pt" and cfg.output.plot_loss is True
    # LLaMA-Factory's defaults for what the file leaves out
    assert cfg.train.gradient_checkpointing is True
    assert cfg.run_name == "saves-llama3-lora-pt"
    result = lf.read(str(path))[0]
    assert set(notes(result, "warning")) == {"overwrite_cache", "overwrite_output_dir", "ddp_timeout"}
    assert set(notes(result, "default")) == {"disable_gradient_checkpointing", "run_name", "do_eval"}


def test_absent_keys_take_llamafactory_defaults_and_say_so(tmp_path, tiny_weights_dir, tiny_data_dir):
    path = write(tmp_path, f"""\
        model_name_or_path: {tiny_weights_dir}
        stage: pt
        do_train: true
        dataset: stdlib_docs
        dataset_dir: {tiny_data_dir}
        """)
    cfg = load_config(path)
    assert cfg.train.finetuning_type == "lora"  # LLaMA-Factory's default; ptflow's own is full
    assert cfg.train.gradient_checkpointing is True
    assert (cfg.train.logging_steps, cfg.train.lr_scheduler_type) == (500, "linear")
    assert cfg.output.plot_loss is False and cfg.eval.do_eval is False
    defaults = notes(lf.read(str(path))[0], "default")
    assert set(defaults) == {"finetuning_type", "disable_gradient_checkpointing", "logging_steps", "lr_scheduler_type",
                             "plot_loss", "do_eval", "output_dir"}
    assert defaults["finetuning_type"] == ("absent -> train.finetuning_type = 'lora' (LLaMA-Factory's default; "
                                           "ptflow's own is full)")
    assert "transformers' default; ptflow's own is 10" in defaults["logging_steps"]


def test_nothing_to_run_is_refused(tmp_path, tiny_weights_dir, tiny_data_dir):
    path = write(tmp_path, f"stage: pt\nmodel_name_or_path: {tiny_weights_dir}\ndataset: stdlib_docs\n")
    with pytest.raises(ConfigError, match=r"do_train: do_train and do_eval are both false .*add do_train: true"):
        load_config(path)


def test_train_from_scratch_with_absent_finetuning_type_is_explained(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir).replace("finetuning_type: full\n", "")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == ["finetuning_type: absent, so LLaMA-Factory's default lora applies, but "
                                   "train_from_scratch: true needs full training (adapters on a frozen random model); "
                                   "add finetuning_type: full"]


def test_problems_name_the_llamafactory_key_its_line_and_the_ptflow_key(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, learning_rate="lots", lora_rnk=8, fp16=True, quantization_bit=4)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert sorted(info.value.problems) == [
        "fp16 (line 16): got true; fp16 mixed precision is not supported: use bf16: true (GPU), or neither for fp32",
        "learning_rate (line 14) -> train.learning_rate: got 'lots'; expected a valid number, unable to parse string "
        "as a number",
        "lora_rnk (line 15): unknown key: not a LLaMA-Factory pt key, nor a ptflow key. did you mean lora_rank? See "
        "docs/llamafactory.md for every key ptflow reads",
        "quantization_bit (line 17): got 4; quantized (QLoRA) training is not supported: train lora on the bf16 model "
        "(finetuning_type: lora, bf16: true)",
    ]


def test_two_keys_for_one_ptflow_key_must_agree(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, gradient_checkpointing=True, disable_gradient_checkpointing=True,
                   use_liger_kernel=False, enable_liger_kernel=False)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == ["disable_gradient_checkpointing (line 15): sets train.gradient_checkpointing to "
                                   "False, but gradient_checkpointing (line 14) sets it to True; keep one of them"]


def test_flat_and_dotted_overrides(tmp_path, tiny_model_dir, tiny_data_dir):
    path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir))
    cfg = load_config(path, ["learning_rate=3e-4", "flash_attn=disabled", "train.max_steps=7", "store=/tmp/s"])
    assert (cfg.train.learning_rate, cfg.model.attn_implementation, cfg.train.max_steps, cfg.store) == (
        3e-4, "eager", 7, "/tmp/s")
    with pytest.raises(ConfigError, match="override hf_hub_token: a token on the command line"):
        load_config(path, ["hf_hub_token=hf_secret"])


def test_a_ptflow_section_inside_a_llamafactory_file_is_taken_as_it_is(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir) + "orchestration:\n  force: [prepare_dataset]\n"
    assert load_config(write(tmp_path, text)).orchestration.force == ["prepare_dataset"]


def test_warmup_steps_fraction_and_nulls(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, warmup_steps=0.05, resume_from_checkpoint=None, max_samples=None)
    cfg = load_config(write(tmp_path, text))
    assert (cfg.train.warmup_ratio, cfg.train.warmup_steps) == (0.05, 0)
    assert cfg.train.resume_from_checkpoint == "auto" and cfg.data.max_samples is None


# -- the engine: one rule of each kind, made up here so the engine is tested apart from the shipped rules ---------

RULE_KINDS = {
    "ignored": lfrules.Rule("ignored", "training", "a reason to ignore it", quiet=(7,)),
    "rejected": lfrules.Rule("rejected", "training", "a reason to refuse it: do this instead", quiet=("ok",)),
    "mapped": lfrules.Rule("mapped", "training", "a renamed switch", to=("train.use_cpu",), convert="negate"),
}


@pytest.fixture
def rule(monkeypatch):
    """Install a made-up rule of one kind under the key `lf_test_key`."""
    def install(kind: str) -> None:
        monkeypatch.setitem(lf.RULES, "lf_test_key", RULE_KINDS[kind])
    return install


def test_an_ignored_key_warns_with_its_reason_and_reaches_no_section(rule, tiny_model_dir, tiny_data_dir):
    rule("ignored")
    result = converted(minimal(tiny_model_dir, tiny_data_dir, lf_test_key=8))
    assert not result.problems
    assert notes(result, "warning")["lf_test_key"] == "ignored: a reason to ignore it"
    assert "lf_test_key" not in json.dumps(result.raw)
    validate_config(result.raw, "test")


def test_a_quiet_value_passes_without_a_warning(rule, tiny_model_dir, tiny_data_dir):
    for kind, quiet in (("ignored", 7), ("rejected", "ok")):
        rule(kind)
        result = converted(minimal(tiny_model_dir, tiny_data_dir, lf_test_key=quiet))
        assert not result.problems and "lf_test_key" not in notes(result, "warning"), kind
        assert notes(result, "mapped")["lf_test_key"].endswith(": nothing to do"), kind


def test_a_rejected_key_fails_with_its_reason_line_and_value(rule, tiny_model_dir, tiny_data_dir):
    rule("rejected")
    result = converted(minimal(tiny_model_dir, tiny_data_dir, lf_test_key="nope"))
    assert result.problems == ["lf_test_key (line 14): got nope; a reason to refuse it: do this instead"]


def test_a_mapped_key_runs_its_converter_and_names_the_target(rule, tiny_model_dir, tiny_data_dir):
    rule("mapped")
    result = converted(minimal(tiny_model_dir, tiny_data_dir, lf_test_key=False))
    assert result.raw["train"]["use_cpu"] is True and result.origin["train.use_cpu"] == "lf_test_key"
    assert notes(result, "mapped")["lf_test_key"] == "-> train.use_cpu = True"
    bad = converted(minimal(tiny_model_dir, tiny_data_dir, lf_test_key="maybe"))
    assert bad.problems == ["lf_test_key (line 14): got 'maybe'; expected true or false"]  # the converter's Unsupported


def test_a_prefix_family_key_takes_the_family_rule(tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setitem(lf.PREFIXES, "lftest_", RULE_KINDS["ignored"])
    result = converted(minimal(tiny_model_dir, tiny_data_dir, lftest_anything=1))
    assert notes(result, "warning")["lftest_anything"] == "ignored: a reason to ignore it" and not result.problems


def test_a_default_applies_only_when_the_key_is_absent(tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setitem(lf.LF_DEFAULTS, "save_steps", lfrules.Default("train.save_steps", 123, "a test default"))
    absent = converted(minimal(tiny_model_dir, tiny_data_dir))
    assert absent.raw["train"]["save_steps"] == 123 and absent.defaulted["train.save_steps"] == "a test default"
    assert notes(absent, "default")["save_steps"] == "absent -> train.save_steps = 123 (a test default)"
    given = converted(minimal(tiny_model_dir, tiny_data_dir, save_steps=9))
    assert given.raw["train"]["save_steps"] == 9 and "save_steps" not in notes(given, "default")


def test_a_difference_is_noted_when_a_same_named_key_is_set(tiny_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.setitem(lf.DIFFERENCES, "save_steps", "a test difference")
    result = converted(minimal(tiny_model_dir, tiny_data_dir, save_steps=9))
    assert notes(result, "differs")["save_steps"] == "a test difference"
    assert "save_steps" not in notes(converted(minimal(tiny_model_dir, tiny_data_dir)), "differs")


@pytest.mark.parametrize("key, value, message", [
    ("stage", "sft", "ptflow runs only the pt stage"),
    ("deepspeed", "examples/deepspeed/ds_z3_config.json",
     "no DeepSpeed: multi-GPU training is torchrun DDP, one process per GPU (train.num_processes"),
    ("quantization_bit", 4, "quantized (QLoRA) training is not supported"),
    ("fp16", True, "use bf16: true"),
    ("optim", "adamw_8bit", "ptflow trains with torch AdamW"),
    ("neat_packing", True, "LLaMA-Factory itself refuses it outside sft"),
])
def test_named_rejections(key, value, message, tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError, match=rf"{key} \(line 14\): got .*{message.replace('(', '.').replace(')', '.')}"):
        load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, **{key: value})))


@pytest.mark.parametrize("key, value, message", [
    ("template", "llama3", "pt trains on raw text + EOS without a chat template"),
    ("overwrite_cache", True, "content-addressed store re-tokenizes exactly when"),
    ("overwrite_output_dir", True, "set resume_from_checkpoint: false to start over"),
    ("report_to", "wandb", "metrics go to the Prefect UI and trainer_log.jsonl"),
    ("ddp_timeout", 180000000, "torchrun DDP"),
    ("save_only_model", True, "checkpoints always hold the optimizer"),
])
def test_named_warnings(key, value, message, tiny_model_dir, tiny_data_dir):
    result = converted(minimal(tiny_model_dir, tiny_data_dir, **{key: value}))
    assert message in notes(result, "warning")[key] and not result.problems


def test_save_strategy_no_is_read_and_epoch_is_refused(tmp_path, tiny_model_dir, tiny_data_dir):
    assert load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, save_strategy="no"))).train.save_strategy == "no"
    with pytest.raises(ConfigError, match=r"save_strategy.*'steps' or 'no'"):
        load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, save_strategy="epoch")))


@pytest.mark.parametrize("value, attn, warned", [("auto", "sdpa", False), ("sdpa", "sdpa", False),
                                                 ("disabled", "eager", False), ("fa2", "sdpa", True)])
def test_flash_attn(value, attn, warned, tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, flash_attn=value)
    assert load_config(write(tmp_path, text)).model.attn_implementation == attn
    warning = notes(converted(text), "warning").get("flash_attn", "")
    assert ("the flash-attn package is not used" in warning) is warned


@pytest.mark.parametrize("disable, expected", [(True, False), (False, True)])
def test_disable_gradient_checkpointing(disable, expected, tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, disable_gradient_checkpointing=disable)
    assert load_config(write(tmp_path, text)).train.gradient_checkpointing is expected


def test_eval_strategy_as_transformers_reads_it(tmp_path, tiny_model_dir, tiny_data_dir):
    base = minimal(tiny_model_dir, tiny_data_dir, val_size=0.1, logging_steps=5)
    steps = load_config(write(tmp_path, base + "eval_strategy: steps\n"))
    assert (steps.train.eval_steps, steps.eval.do_eval) == (5, True)  # eval_steps defaults to logging_steps
    result = converted(base + "eval_steps: 7\n")  # no eval_strategy: transformers never evaluates during training
    assert "train" not in result.raw or "eval_steps" not in result.raw["train"]
    assert result.raw["eval"]["do_eval"] is False
    assert "used only with eval_strategy: steps" in notes(result, "warning")["eval_steps"]
    epoch = converted(base + "eval_strategy: epoch\n")
    assert epoch.raw["eval"]["do_eval"] is True and "not per epoch" in notes(epoch, "warning")["eval_strategy"]
    with pytest.raises(ConfigError, match=r"eval_strategy \(line 16\): got 'sometimes'; expected one of no, steps"):
        load_config(write(tmp_path, base + "eval_strategy: sometimes\n"))


def test_hub_token_is_mapped_and_never_shown(tmp_path, tiny_model_dir, tiny_data_dir):
    text = minimal(tiny_model_dir, tiny_data_dir, hf_hub_token="hf_secret123", hub_token="hf_other456")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "hf_secret123" not in str(info.value) and "hf_other456" not in str(info.value)
    assert "sets output.hub_token to <hidden>" in str(info.value)
    cfg = load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, hf_hub_token="hf_secret123")))
    assert cfg.output.hub_token.get_secret_value() == "hf_secret123"
    result = converted(text)
    assert "hf_secret123" not in lf.describe(result, "x") + lf.to_ptflow_yaml(result, "x")


@pytest.mark.parametrize("key", ["ms_hub_token", "om_hub_token", "wandb_token"])
def test_every_token_key_is_hidden_in_messages(tmp_path, tiny_model_dir, tiny_data_dir, key):
    text = minimal(tiny_model_dir, tiny_data_dir, **{key: "tok_s3cret789"})
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert key in message and "tok_s3cret789" not in message
    assert key == "wandb_token" or re.search(rf"{key} \(line \d+\): got <hidden>", message)  # wandb_token: an unknown key
    result = converted(text)
    assert "tok_s3cret789" not in lf.describe(result, "x") + lf.to_ptflow_yaml(result, "x")


def test_streaming_true_maps_to_a_streamed_run(tmp_path, tiny_model_dir, tiny_data_dir):
    cfg = load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, streaming=True, max_steps=4,
                                              buffer_size=128)))
    assert cfg.data.streaming and cfg.train.max_steps == 4


def test_streaming_without_max_steps_names_the_key(tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError, match="train.max_steps: a stream's length is unknown"):
        load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, streaming=True)))


# -- convert-lf ------------------------------------------------------------------------------------------------

def test_converted_yaml_loads_to_the_same_run_config(tmp_path, tiny_weights_dir, tiny_data_dir):
    text = textwrap.dedent(LORA_PRETRAIN.format(model=tiny_weights_dir, data=tiny_data_dir, out="out"))
    lf_path = write(tmp_path, text + "flash_attn: fa2\ndisable_gradient_checkpointing: true\n")
    text, _ = lf.convert_file(str(lf_path))
    pt_path = write(tmp_path, text, "pt.yaml")
    assert not lf.is_llamafactory(yaml.safe_load(text))
    assert load_config(pt_path).model_dump() == load_config(lf_path).model_dump()
    lines = text.splitlines()
    assert "  attn_implementation: sdpa  # from flash_attn" in lines
    assert "  gradient_checkpointing: false  # from disable_gradient_checkpointing" in lines
    assert "  learning_rate: 0.01" in lines
    assert any(line.startswith("#   - flash_attn (line ") and "flash-attn package is not used" in line
               for line in lines)
    assert any(line.startswith("#   - ddp_timeout (line 35): ignored: ") for line in lines)


def test_convert_lf_refuses_a_ptflow_config_and_reports_every_problem(tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError, match="already a ptflow config"):
        lf.convert_file(str(ROOT / "configs" / "quickstart.yaml"))
    path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, deepspeed="ds.json", fp16=True))
    with pytest.raises(ConfigError) as info:
        lf.convert_file(str(path))
    assert [p.split(" ")[0] for p in info.value.problems] == ["deepspeed", "fp16"]


def ptflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_validate_prints_what_each_key_became(tmp_path, tiny_model_dir, tiny_data_dir):
    path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, template="default", max_steps=3))
    result = ptflow("validate", str(path), "learning_rate=1e-3")
    assert result.returncode == 0, result.stderr
    assert f"{path}: LLaMA-Factory pt config, mapped onto ptflow's sections" in result.stdout
    assert "  mapped   cutoff_len (line 13): -> data.cutoff_len" in result.stdout
    assert "  default  logging_steps: absent -> train.logging_steps = 500" in result.stdout
    assert "  warning  template (line 14): ignored: pt trains on raw text" in result.stdout
    assert f"{path}: OK (stdlib_docs -> {tiny_model_dir}" in result.stdout
    assert "Traceback" not in result.stderr and "template" not in result.stderr  # printed once, not logged again


def test_cli_convert_lf(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    from flows.cli import main

    path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, max_steps=3))
    out = tmp_path / "converted.yaml"
    assert main(["convert-lf", str(path), "-o", str(out)]) == 0
    assert f"ptflow: wrote {out}" in capsys.readouterr().err
    assert load_config(out).train.max_steps == 3
    assert main(["convert-lf", str(path)]) == 0
    printed = capsys.readouterr()
    assert printed.out == out.read_text()  # `ptflow convert-lf lf.yaml > run.yaml` works
    assert "  mapped   cutoff_len (line 13): -> data.cutoff_len" in printed.err
    assert main(["convert-lf", str(path), "-o", str(path)]) == 2
    assert "-o names the LLaMA-Factory file itself" in capsys.readouterr().err


def test_use_cpu_and_no_cuda_pick_the_cpu_and_convert_lf_says_what_bf16_means(tmp_path, tiny_model_dir,
                                                                            tiny_data_dir, capsys):
    from flows.cli import main

    for key in ("use_cpu", "no_cuda"):
        path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, **{key: True}), f"{key}.yaml")
        assert load_config(path).train.use_cpu is True, key
    path = write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, use_cpu=True, bf16=True))
    assert main(["convert-lf", str(path)]) == 0
    printed = capsys.readouterr()
    assert "  use_cpu: true" in printed.out.splitlines()
    assert "  differs  bf16 (line" in printed.err and "PyTorch's CPU bf16 autocast" in printed.err
    assert "  differs  use_cpu (line" in printed.err


# -- end to end on tiny data ----------------------------------------------------------------------------------------

def run_stages(cfg, layout) -> Path:
    """The flow's recipe as plain stage calls; returns the filled output folder."""
    from ptflow.data.dataset import prepare_dataset
    from ptflow.data.tokenizer import load_tokenizer
    from ptflow.publish.card import write_model_card
    from ptflow.publish.evaluate import evaluate
    from ptflow.publish.plot import plot_loss
    from ptflow.store.outputs import export, prepare_output_dir
    from ptflow.train.loop import train

    tokenizer = load_tokenizer(cfg.model, layout)
    dataset = prepare_dataset(cfg.data, tokenizer, layout, seed=cfg.seed)
    model = train(cfg.model, cfg.train, tokenizer, dataset, layout, seed=cfg.seed)
    evaluation = evaluate(cfg.eval, model, dataset, layout) if cfg.eval.do_eval else None
    plots = plot_loss(model, layout) if cfg.output.plot_loss else None
    card = write_model_card(cfg, tokenizer, dataset, model, evaluation, plots, layout)
    out = prepare_output_dir(layout.output_dir(cfg.output.output_dir, cfg.run_name))
    for artifact in (model, evaluation, plots, card):
        export(artifact, out)
    return out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def assert_llamafactory_tree(out: Path, steps: int, save_steps: int, evaluated: bool) -> None:
    assert (out / "README.md").read_text().startswith("---")
    found = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert found == sorted({*range(save_steps, steps, save_steps), steps})  # every save_steps and the last, as HF
    log = read_log(out)
    assert all(LOG_FIELDS <= set(r) for r in log), log
    assert [r["current_steps"] for r in log if "loss" in r][-1] == steps
    assert all(TRAIN_LOG_FIELDS <= set(r) for r in log if "loss" in r)
    assert TRAIN_RESULTS <= set(json.loads((out / "train_results.json").read_text()))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps
    all_results = set(json.loads((out / "all_results.json").read_text()))
    if evaluated:
        assert EVAL_RESULTS <= set(json.loads((out / "eval_results.json").read_text()))
        assert TRAIN_RESULTS | EVAL_RESULTS <= all_results
    else:
        assert TRAIN_RESULTS <= all_results and not (out / "eval_results.json").exists()


def test_full_pretrain_from_scratch_with_val_size_runs_end_to_end(tmp_path, tiny_model_dir, tiny_data_dir, layout):
    path = write(tmp_path, f"""\
        ### model
        model_name_or_path: {tiny_model_dir}
        train_from_scratch: true
        flash_attn: sdpa
        disable_gradient_checkpointing: true

        ### method
        stage: pt
        do_train: true
        finetuning_type: full

        ### dataset
        dataset: stdlib_docs
        dataset_dir: {tiny_data_dir}
        cutoff_len: 64
        overwrite_cache: true
        preprocessing_num_workers: 1

        ### output
        output_dir: {tmp_path / "saves" / "full"}
        logging_steps: 2
        save_steps: 4
        plot_loss: true
        overwrite_output_dir: true
        report_to: none

        ### train
        per_device_train_batch_size: 4
        gradient_accumulation_steps: 1
        learning_rate: 3.0e-3
        max_steps: 8
        lr_scheduler_type: cosine
        warmup_ratio: 0.1
        ddp_timeout: 180000000

        ### eval
        val_size: 4
        per_device_eval_batch_size: 2
        eval_strategy: steps
        eval_steps: 3
        """)
    cfg = load_config(path)
    out = run_stages(cfg, layout)
    assert out == tmp_path / "saves" / "full"
    assert_llamafactory_tree(out, steps=8, save_steps=4, evaluated=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_loss.png", "training_eval_loss.png"):
        assert (out / name).is_file(), name
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["current_steps"] for r in log if "eval_loss" in r] == [3, 6, 8]
    eval_only = next(r for r in log if r["current_steps"] == 3)  # step 3 logs no training loss
    assert "loss" not in eval_only and LOG_FIELDS <= set(eval_only)


def test_freeze_pretrain_runs_end_to_end(tmp_path, tiny_weights_dir, tiny_data_dir, layout):
    path = write(tmp_path, f"""\
        model_name_or_path: {tiny_weights_dir}
        stage: pt
        do_train: true
        finetuning_type: freeze
        freeze_trainable_layers: 1
        freeze_trainable_modules: all
        dataset: stdlib_docs,three
        dataset_dir: {tiny_data_dir}
        cutoff_len: 32
        output_dir: {tmp_path / "freeze"}
        logging_steps: 1
        save_steps: 2
        per_device_train_batch_size: 2
        learning_rate: 1.0e-3
        max_steps: 3
        """)
    cfg = load_config(path)
    assert cfg.train.gradient_checkpointing is True and cfg.output.plot_loss is False  # LLaMA-Factory's defaults
    out = run_stages(cfg, layout)
    assert_llamafactory_tree(out, steps=3, save_steps=2, evaluated=False)
    assert not (out / "training_loss.png").exists()  # plot_loss absent: LLaMA-Factory plots nothing


def test_lora_pretrain_example_runs_end_to_end(tmp_path, tiny_weights_dir, tiny_data_dir, layout):
    out_dir = tmp_path / "saves" / "lora"
    cfg = load_config(write(tmp_path, LORA_PRETRAIN.format(model=tiny_weights_dir, data=tiny_data_dir, out=out_dir)))
    out = run_stages(cfg, layout)
    assert out == out_dir
    assert_llamafactory_tree(out, steps=6, save_steps=4, evaluated=True)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert [r["current_steps"] for r in read_log(out) if "eval_loss" in r] == [3, 6]


def test_interleaved_datasets_with_probs_run_end_to_end(tmp_path, tiny_model_dir, tiny_data_dir, layout):
    text = minimal(tiny_model_dir, tiny_data_dir, max_steps=2, logging_steps=1, save_steps=10,
                   per_device_train_batch_size=2, streaming=False, mix_strategy="interleave_over",
                   interleave_probs="0.5,0.5", output_dir=str(tmp_path / "mix"))
    cfg = load_config(write(tmp_path, text.replace("dataset: stdlib_docs", "dataset: stdlib_docs,notes")))
    assert (cfg.data.dataset, cfg.data.interleave_probs) == (["stdlib_docs", "notes"], [0.5, 0.5])
    out = run_stages(cfg, layout)
    assert_llamafactory_tree(out, steps=2, save_steps=10, evaluated=False)
    from ptflow.data.dataset import prepare_dataset
    from ptflow.data.tokenizer import load_tokenizer

    stats = prepare_dataset(cfg.data, load_tokenizer(cfg.model, layout), layout, seed=cfg.seed).stats
    assert stats["sources"]["stdlib_docs"]["documents"] and stats["sources"]["notes"]["documents"]


# -- the doc table ---------------------------------------------------------------------------------------------------

def test_doc_table_lists_every_known_key_with_its_status():
    doc = (ROOT / "docs" / "llamafactory.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 5 and cells[0].startswith("`") and cells[1] in lf.GROUPS:
            rows[cells[0].strip("`")] = cells[2]
    known = lf.known_keys()
    regenerate = "regenerate docs/llamafactory.md's table: ptflow config-reference --llamafactory"
    assert sorted(set(known) - set(rows)) == [], regenerate
    assert sorted(set(rows) - set(known)) == [], "docs/llamafactory.md lists keys the mapping does not know"
    wrong = {k: (rows[k], lf.status(k)[0]) for k in known if rows[k] != lf.status(k)[0]}
    assert not wrong, f"stale status in docs/llamafactory.md: {wrong}"
    assert lf.reference_table() in doc, regenerate
    defaults = doc.split("### Defaults that differ")[1].split("\n\n|")[1].split("\n\n")[0]
    listed = {re.match(r"\|? ?`(\w+)`", row).group(1) for row in defaults.splitlines()[1:] if "`" in row[:4]}
    assert sorted(set(lf.LF_DEFAULTS) - listed) == [], "add these rule-file defaults to docs' Defaults that differ"


def test_the_llamafactory_example_config_is_the_quickstart():
    lf_example = load_config(ROOT / "configs" / "llamafactory_pt.yaml")
    assert lf_example.model_dump() == load_config(ROOT / "configs" / "quickstart.yaml").model_dump()


def test_do_eval_without_held_out_data_is_refused(tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, do_eval=True)))
    assert info.value.problems == ["do_eval (line 14): true needs held-out data: set val_size (e.g. 0.05) or "
                                   "eval_dataset (LLaMA-Factory refuses it too)"]


def test_eval_dataset_with_eval_strategy_steps(tmp_path, tiny_model_dir, tiny_data_dir):
    cfg = load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, eval_dataset="three",
                                              eval_strategy="steps", eval_steps=2)))
    assert (cfg.data.eval_dataset, cfg.train.eval_steps, cfg.eval.do_eval) == (["three"], 2, True)


@pytest.mark.parametrize("value, expected", [("full_shard auto_wrap", True), (["shard_grad_op"], True),
                                             ("", False), ("no_shard", False), (False, False)])
def test_transformers_fsdp_options_map_to_train_fsdp(tmp_path, tiny_model_dir, tiny_data_dir, value, expected):
    cfg = load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, fsdp=value, ddp_timeout=1800)))
    assert cfg.train.fsdp is expected


def test_unknown_fsdp_option_names_the_key(tmp_path, tiny_model_dir, tiny_data_dir):
    with pytest.raises(ConfigError, match=r"fsdp \(line \d+\) -> train.fsdp: .*full_shard auto_wrap"):
        load_config(write(tmp_path, minimal(tiny_model_dir, tiny_data_dir, fsdp="zero3")))
