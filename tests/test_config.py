"""Config validation: closest-key hints, typed problems with key path, value and line, all reported at once."""

from __future__ import annotations

import re
import textwrap

import pytest

from ptflow.config.loading import load_config
from ptflow.config.schema import DataSection, TrainSection, validate_config
from ptflow.errors import ConfigError

MINIMAL = {"model": {"model_name_or_path": "org/tiny"}, "data": {"dataset": "stdlib_docs"}}

GOOD_YAML = """\
run_name: demo
model:
  model_name_or_path: org/tiny
data:
  dataset: stdlib_docs
  cutoff_len: 128
train:
  learning_rate: 1.0e-3
  max_steps: 10
"""


def with_(**sections) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values) if isinstance(values, dict) else raw.__setitem__(name, values)
    return raw


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_minimal_config_gets_documented_defaults():
    cfg = validate_config(MINIMAL, "test")
    assert cfg.data.dataset == ["stdlib_docs"]
    assert (cfg.data.cutoff_len, cfg.train.learning_rate, cfg.train.finetuning_type) == (2048, 5e-5, "full")
    assert cfg.train.resume_from_checkpoint == "auto"


def test_unknown_key_suggests_the_closest_key_in_its_section():
    with pytest.raises(ConfigError, match=r"train\.learnig_rate: unknown key\. Did you mean train\.learning_rate\?"):
        validate_config(with_(train={"learnig_rate": 1e-3}), "test")


def test_key_in_the_wrong_section_names_its_home():
    with pytest.raises(ConfigError, match=r"data\.learning_rate: unknown key\. Did you mean train\.learning_rate\? "
                                          r"\(it belongs in the train section\)"):
        validate_config(with_(data={"learning_rate": 1e-3}), "test")


def test_section_key_at_top_level_names_its_section():
    with pytest.raises(ConfigError, match=r"cutoff_len: unknown key\. It belongs in a section: did you mean "
                                          r"data\.cutoff_len\?"):
        validate_config({**MINIMAL, "cutoff_len": 128}, "test")


def test_misspelt_section_name_is_suggested():
    with pytest.raises(ConfigError, match=r"trian: unknown key\. Did you mean train\?"):
        validate_config({**MINIMAL, "trian": {"max_steps": 3}}, "test")


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError, match=r"train\.max_steps: got 'lots'; .*valid integer"):
        validate_config(with_(train={"max_steps": "lots"}), "test")
    with pytest.raises(ConfigError, match=r"train\.finetuning_type: got 'qlora'; expected 'full', 'freeze' or 'lora'"):
        validate_config(with_(train={"finetuning_type": "qlora"}), "test")
    with pytest.raises(ConfigError, match=r"train\.lora_rank: got 0; .*greater than or equal to 1"):
        validate_config(with_(train={"lora_rank": 0}), "test")


def test_missing_required_key_is_described():
    with pytest.raises(ConfigError, match=r"model\.model_name_or_path: required key is missing \(Local directory"):
        validate_config(with_(model={"model_name_or_path": None}) | {"model": {}}, "test")


def test_every_problem_is_reported_at_once():
    raw = with_(train={"learnig_rate": 1e-3, "max_steps": "lots", "warmup_ratio": 1.5},
                data={"cutoff_len": "long", "learning_rate": 1.0})
    with pytest.raises(ConfigError) as info:
        validate_config(raw, "multi.yaml")
    problems = info.value.problems
    assert len(problems) == 5, problems
    assert str(info.value).startswith("multi.yaml: 5 problem(s) in the config:")
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["data.cutoff_len", "data.learning_rate", "train.learnig_rate", "train.max_steps",
                    "train.warmup_ratio"]


def test_yaml_syntax_error_reports_line_and_column(tmp_path):
    path = write(tmp_path, """\
        model:
          model_name_or_path: org/tiny
        data:
          dataset: [stdlib_docs
        train:
          max_steps: 3
        """)
    with pytest.raises(ConfigError, match=r"YAML syntax error at line 5, column 6") as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.source == str(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)nope\.yaml: 1 problem.*config file not found \(looked in "
                                          + re.escape(str(tmp_path)) + r"\)"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(write(tmp_path, "- model\n- data\n"))


def test_messages_carry_yaml_line_numbers(tmp_path):
    path = write(tmp_path, GOOD_YAML.replace("learning_rate: 1.0e-3", "learnig_rate: 1.0e-3")
                 .replace("max_steps: 10", "max_steps: lots"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    unknown, wrong_type = sorted(info.value.problems, key=lambda p: "max_steps" in p)
    assert unknown == "train.learnig_rate (line 8): unknown key. Did you mean train.learning_rate?"
    assert wrong_type.startswith("train.max_steps (line 9): got 'lots'; ")


def test_dotted_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, GOOD_YAML), ["train.learning_rate=3e-4", "train.max_steps=7",
                                                   "data.dataset=a, b", "output.tags=[x, y]", "seed=1",
                                                   "train.bf16=true"])
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 3e-4
    assert cfg.train.max_steps == 7 and cfg.seed == 1 and cfg.train.bf16 is True
    assert cfg.data.dataset == ["a", "b"]
    assert cfg.output.tags == ["x", "y"]
    assert cfg.data.cutoff_len == 128  # untouched keys keep the file's value


def test_override_can_fix_a_bad_file_value(tmp_path):
    path = write(tmp_path, GOOD_YAML.replace("max_steps: 10", "max_steps: lots"))
    assert load_config(path, ["train.max_steps=5"]).train.max_steps == 5


def test_malformed_overrides_are_reported_with_other_problems(tmp_path):
    path = write(tmp_path, GOOD_YAML.replace("learning_rate:", "learnig_rate:"))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.learning_rate", "=3", "train.max_steps=9"])
    assert info.value.problems[:2] == [
        "override 'train.learning_rate': expected section.key=value, e.g. train.learning_rate=3e-4",
        "override '=3': expected section.key=value, e.g. train.learning_rate=3e-4",
    ]
    assert len(info.value.problems) == 3
    assert info.value.problems[2].startswith("train.learnig_rate (line 8): unknown key")


def test_override_of_unknown_key_gets_a_suggestion(tmp_path):
    # The key is not in the file, so at most its section's line can be named.
    with pytest.raises(ConfigError, match=r"train\.learnig_rate( \(line 7\))?: unknown key\. "
                                          r"Did you mean train\.learning_rate\?"):
        load_config(write(tmp_path, GOOD_YAML), ["train.learnig_rate=1e-3"])


@pytest.mark.parametrize("value, expected", [
    ("stdlib_docs,notes", ["stdlib_docs", "notes"]),
    (" stdlib_docs , notes ,", ["stdlib_docs", "notes"]),
    (["stdlib_docs", "notes"], ["stdlib_docs", "notes"]),
])
def test_dataset_accepts_comma_separated_names(value, expected):
    assert DataSection(dataset=value).dataset == expected


def test_empty_dataset_list_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.dataset: got ''; .*name at least one dataset"):
        validate_config(with_(data={"dataset": ""}), "test")


def test_module_lists_accept_comma_separated_names():
    section = TrainSection(lora_target="q_proj, v_proj", freeze_trainable_modules="mlp,self_attn")
    assert section.lora_target == ["q_proj", "v_proj"]
    assert section.freeze_trainable_modules == ["mlp", "self_attn"]


@pytest.mark.parametrize("val_size", [0.0, 0.05, 0.5, 3, 100.0])
def test_val_size_fraction_or_whole_count_is_accepted(val_size):
    assert DataSection(dataset="a", val_size=val_size).val_size == val_size


def test_val_size_above_one_must_be_whole():
    with pytest.raises(ConfigError, match=r"data\.val_size: got 1\.5; .*fraction below 1 .*whole number of blocks"):
        validate_config(with_(data={"val_size": 1.5}), "test")
    with pytest.raises(ConfigError, match=r"data\.val_size: got -0\.1"):
        validate_config(with_(data={"val_size": -0.1}), "test")


@pytest.mark.parametrize("kind", ["lora", "freeze"])
def test_partial_finetuning_of_random_weights_is_rejected(kind):
    raw = with_(model={"train_from_scratch": True}, train={"finetuning_type": kind})
    with pytest.raises(ConfigError, match=rf"train\.finetuning_type: '{kind}' on random weights "
                                          r"\(model\.train_from_scratch: true\).*use full") as info:
        validate_config(raw, "test")
    assert len(info.value.problems) == 1
    assert "org/tiny" not in info.value.problems[0]  # names the keys, does not echo the whole config


def test_eval_steps_need_held_out_data():
    with pytest.raises(ConfigError, match=r"train\.eval_steps needs held-out data: set data\.val_size"):
        validate_config(with_(train={"eval_steps": 10}), "test")


@pytest.mark.parametrize("max_steps", [0, -2])
def test_max_steps_must_be_positive_or_minus_one(max_steps):
    with pytest.raises(ConfigError, match="max_steps must be a positive number of steps, or -1"):
        validate_config(with_(train={"max_steps": max_steps}), "test")


def test_run_name_must_be_a_safe_folder_name():
    with pytest.raises(ConfigError, match=r"run_name: got '\.\./escape'"):
        validate_config({**MINIMAL, "run_name": "../escape"}, "test")


def test_train_digest_ignores_logging_and_checkpoint_cadence():
    a = TrainSection(logging_steps=1, save_steps=5, save_total_limit=2, resume_from_checkpoint=False)
    b = TrainSection(logging_steps=50, save_steps=500)
    assert a.digest_fields() == b.digest_fields()
    assert TrainSection(learning_rate=1e-3).digest_fields() != b.digest_fields()


def test_preflight_accepts_the_tiny_assets(make_config, tmp_path):
    from ptflow.preflight import preflight

    preflight(make_config(store=str(tmp_path / "store")))
    assert not (tmp_path / "store").exists()  # checking writes nothing


def test_preflight_reports_every_mismatch_at_once(make_config, tmp_path):
    from ptflow.errors import PreflightError
    from ptflow.preflight import preflight

    config = make_config(store=str(tmp_path / "store"), data={"cutoff_len": 256, "dataset": "stdlib_docs,nope"})
    with pytest.raises(PreflightError) as info:
        preflight(config, "tiny.yaml")
    assert len(info.value.problems) == 2
    assert "data.cutoff_len: 256 is beyond the model's max_position_embeddings 128" in info.value.problems[0]
    assert "data.dataset: 'nope' is not in" in info.value.problems[1]


def test_preflight_refuses_a_tokenizer_larger_than_the_model_vocabulary(make_config, tiny_model_dir, tmp_path):
    import json
    import shutil

    from ptflow.errors import PreflightError
    from ptflow.preflight import preflight

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir, small)
    config_json = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config_json, "vocab_size": 1000}))
    config = make_config(store=str(tmp_path / "store"), model={"model_name_or_path": str(small)})
    with pytest.raises(PreflightError, match=r"has 4096 tokens but config.json's vocab_size is 1000; set "
                                              r"model.resize_vocab: true"):
        preflight(config)
    preflight(make_config(store=str(tmp_path / "store"),
                          model={"model_name_or_path": str(small), "resize_vocab": True}))
