"""Bad input, table-driven, through the CLI as a user meets it (`ptflow validate`, in process).

Each case breaks one thing in an otherwise valid config or its inputs and checks that the
command exits 2 without a traceback, with a message naming the key/file/line and the fix,
before any stage runs (the store stays empty).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_weights_dir, tiny_data_dir):
    """Private copies of the tiny model and data, and a valid config pointing at them."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = shutil.copytree(tiny_weights_dir, tmp_path / "weights")
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    config = {"run_name": "bad-input", "store": str(tmp_path / "store"),
              "model": {"model_name_or_path": str(model), "train_from_scratch": True},
              "data": {"dataset": "stdlib_docs", "dataset_dir": str(data), "cutoff_len": 64, "val_size": 0.1},
              "train": {"max_steps": 2}}
    return {"tmp": tmp_path, "model": model, "weights": weights, "data": data, "config": config}


def _set(config: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(key, None)
    else:
        node[key] = value


DELETE = object()


def edit(**changes):
    def apply(w):
        for dotted, value in changes.items():
            _set(w["config"], dotted.replace("__", "."), value(w) if callable(value) else value)
    return apply


def write(relative: str, content: bytes | str, to: str = "data"):
    def apply(w):
        path = w[to] / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return apply


def register(name: str, entry: dict):
    def apply(w):
        info_path = w["data"] / "dataset_info.json"
        info = json.loads(info_path.read_text())
        info[name] = entry
        info_path.write_text(json.dumps(info))
        w["config"]["data"]["dataset"] = name
    return apply


def chain(*steps):
    def apply(w):
        for step in steps:
            step(w)
    return apply


def remove(relative: str, base: str = "model"):
    return lambda w: (w[base] / relative).unlink()


CASES = {
    # --- the YAML itself
    "yaml syntax": ("raw", "model:\n  model_name_or_path: [unclosed\n", r"YAML syntax error at line \d+, column \d+"),
    "top level not a mapping": ("raw", "- a\n- b\n", r"expected a mapping of sections at the top level"),
    "unknown top-level key": (edit(sead=1), r"sead \(line \d+\): unknown key\. Did you mean seed\?"),
    "unknown key in a section": (edit(train__learnig_rate=1e-3),
                                 r"train\.learnig_rate \(line \d+\): unknown key\. Did you mean train\.learning_rate\?"),
    "key in the wrong section": (edit(data__learning_rate=1e-3), r"data\.learning_rate.*train\.learning_rate"),
    "section key at top level": (edit(cutoff_len=128), r"cutoff_len \(line \d+\): unknown key\. It belongs in a "
                                                      r"section: did you mean data\.cutoff_len\?"),
    "wrong type": (edit(train__learning_rate="fast"), r"train\.learning_rate \(line \d+\): got 'fast'; expected a "
                                                      r"valid number"),
    "out of range": (edit(data__cutoff_len=1), r"data\.cutoff_len.*got 1; expected greater than or equal to 2"),
    "negative learning rate": (edit(train__learning_rate=-1), r"train\.learning_rate.*got -1; expected greater than 0"),
    "val_size neither fraction nor count": (edit(data__val_size=1.5), r"data\.val_size.*got 1\.5; use a fraction below 1"),
    "max_steps zero": (edit(train__max_steps=0), r"max_steps must be a positive number of steps, or -1"),
    "streaming without max_steps": (edit(data__streaming=True, data__val_size=0, train__max_steps=DELETE),
                                    r"train\.max_steps: a stream's length is unknown.*needs train\.max_steps"),
    "streaming with a fractional val_size": (edit(data__streaming=True),
                                             r"data\.val_size: 0\.1 is a fraction.*give a count of blocks"),
    "doc_mask with pinned flash": (edit(data__doc_mask=True, train__sdpa_backend="flash"),
                                   r"train\.sdpa_backend: flash takes no attention mask.*flex_attention"),
    "fsdp with one process": (edit(train__fsdp=True, train__num_processes=1),
                              r"train\.fsdp shards across processes, but num_processes is 1"),
    "unknown scheduler": (edit(train__lr_scheduler_type="cosinus"), r"train\.lr_scheduler_type.*got 'cosinus'; "
                                                                    r"expected 'linear', 'cosine'"),
    "unknown finetuning type": (edit(train__finetuning_type="qlora"), r"train\.finetuning_type.*got 'qlora'"),
    "lora on random weights": (edit(train__finetuning_type="lora"), r"'lora' on random weights.*use full"),
    "eval_steps without held-out data": (edit(data__val_size=0, train__eval_steps=5),
                                         r"train\.eval_steps needs held-out data: set data\.val_size"),
    "missing required key": (edit(model__model_name_or_path=DELETE),
                             r"model\.model_name_or_path.*required key is missing"),
    "missing data section": (edit(data=DELETE), r"data: required key is missing"),
    "bad run_name": (edit(run_name="../escape"), r"run_name.*got '\.\./escape'; String should match pattern"),
    # --- the model folder
    "model folder missing": (edit(model__model_name_or_path=lambda w: str(w["tmp"] / "nope")),
                             r"model\.model_name_or_path: '.*nope' is not a directory"),
    "no config.json": (remove("config.json"), r"has no config\.json"),
    "no tokenizer files": (chain(remove("tokenizer.json"), remove("tokenizer_config.json")),
                           r"has no tokenizer files.*tokenizer\.save_pretrained"),
    "no weights when not from scratch": (edit(model__train_from_scratch=False),
                                         r"has no \*\.safetensors weights\. Set model\.train_from_scratch: true"),
    "pickle weights only": (chain(edit(model__train_from_scratch=False),
                                  lambda w: (w["model"] / "pytorch_model.bin").write_bytes(b"pickle")),
                            r"It has pytorch_model\.bin: pickle weights are not loaded; convert them to safetensors"),
    "vocab mismatch": (lambda w: (w["model"] / "config.json").write_text(json.dumps(
        {**json.loads((w["model"] / "config.json").read_text()), "vocab_size": 100})),
        r"has 4096 tokens but config\.json's vocab_size is 100"),
    "cutoff beyond max positions": (edit(data__cutoff_len=4096), r"data\.cutoff_len: 4096 is beyond the model's "
                                                                 r"max_position_embeddings 128"),
    # --- the data
    "unknown dataset name": (edit(data__dataset="stdlib"), r"'stdlib' is not in .*dataset_info\.json.*stdlib_docs"),
    "no dataset_info.json": (remove("dataset_info.json", "data"), r"has no dataset_info\.json"),
    "dataset_info.json not JSON": (write("dataset_info.json", "{\n  \"a\": {,\n}"),
                                   r"dataset_info\.json: invalid JSON at line 2, column"),
    "missing data file": (register("gone", {"file_name": "gone.jsonl"}), r"gone\.jsonl does not exist"),
    "wrong column": (register("three_col", {"file_name": "three_docs.jsonl", "columns": {"prompt": "content"}}),
                     r"three_docs\.jsonl:1: dataset 'three_col' has no column 'content' \(found: \['text'\]\)"),
    "empty file": (chain(write("empty.jsonl", ""), register("empty", {"file_name": "empty.jsonl"})),
                   r"empty\.jsonl.*(empty|no documents)"),
    "malformed JSON line": (chain(write("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n'),
                                  register("bad", {"file_name": "bad.jsonl"})),
                            r"bad\.jsonl:2: malformed JSON", "prepare"),
    "non-UTF-8 bytes": (chain(write("latin.txt", b"fine\ncaf\xe9\n"), register("latin", {"file_name": "latin.txt"})),
                        r"latin\.txt:2: not valid UTF-8 \(byte 0xe9\); re-encode the file as UTF-8", "prepare"),
    "unsupported file type": (chain(write("corpus.xml", "<a/>"), register("xml", {"file_name": "corpus.xml"})),
                              r"corpus\.xml"),
    # --- where results go
    "output dir is a file": (chain(write("taken", "x", to="tmp"), edit(output__output_dir=lambda w: str(w["tmp"] / "taken"))),
                             r"output\.output_dir: .*taken is a file"),
    "unwritable store": (chain(write("taken", "x", to="tmp"), edit(store=lambda w: str(w["tmp"] / "taken" / "store"))),
                         r"store .*taken/store cannot be created or written"),
    "model config.json not JSON": (write("config.json", '{"model_type": "llama",', to="model"),
                                   r"config\.json is not valid JSON \(.*line 1.*\); restore the model's config\.json"),
    "model config.json a JSON array": (write("config.json", "[1, 2]", to="model"),
                                       r"config\.json holds a JSON list, not an object of model settings"),
    "override not YAML": ("override", "train.learning_rate=[unclosed",
                          r"override train\.learning_rate: value '\[unclosed' is not valid YAML"),
    "val_size infinite": (edit(data__val_size=float("inf")), r"data\.val_size.*got inf; expected a finite number"),
    "run_name too long": (edit(run_name="r" * 300), r"run_name.*got 'rrrr.*'; String should have at most 128 "
                                                     r"characters"),
    "negative seed": (edit(seed=-1), r"seed \(line \d+\): got -1; expected greater than or equal to 0"),
    "seed beyond 2**32": (edit(seed=2**70), r"seed \(line \d+\): got 1180591620717411303424; expected less than or "
                                           r"equal to 4294967295"),
    "infinite epochs": (edit(train__num_train_epochs=float("inf"), train__max_steps=-1),
                        r"train\.num_train_epochs.*got inf; expected a finite number"),
    "epochs beyond any real run": (edit(train__num_train_epochs=1e300, train__max_steps=-1),
                                   r"train\.num_train_epochs.*got 1e\+300; expected less than or equal to 10000"),
    "resume path missing": (edit(train__resume_from_checkpoint=lambda w: str(w["tmp"] / "checkpoint-9")),
                            r"train\.resume_from_checkpoint: .*checkpoint-9 is not a directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named_and_stops_before_any_stage(case, world, capsys):
    """'prepare' cases sit past a valid first record: validate passes, and the data stage names file:line."""
    spec = CASES[case]
    config_path = world["tmp"] / "config.yaml"
    overrides = []
    if spec[0] == "raw":
        config_path.write_text(spec[1])
        pattern, when = spec[2], "validate"
    elif spec[0] == "override":
        config_path.write_text(yaml.safe_dump(world["config"], sort_keys=False))
        overrides, pattern, when = [spec[1]], spec[2], "validate"
    else:
        mutate, pattern, *rest = spec
        when = rest[0] if rest else "validate"
        mutate(world)
        config_path.write_text(yaml.safe_dump(world["config"], sort_keys=False))
    code = main(["validate", str(config_path), *overrides])
    err = capsys.readouterr().err
    store = Path(world["config"].get("store") or world["tmp"] / "store")
    if when == "prepare":
        assert code == 0, err
        err = _prepare_error(config_path, store)
    else:
        assert code == 2, err
        assert "Traceback" not in err and err.startswith("ptflow: error: ")
        assert not (store / "cache").exists()
    assert re.search(pattern, err, re.S), err


def _prepare_error(config_path: Path, store: Path) -> str:
    from ptflow.config.loading import load_config
    from ptflow.data.dataset import prepare_dataset
    from ptflow.data.tokenizer import load_tokenizer
    from ptflow.errors import DataError
    from ptflow.store.layout import Layout

    cfg = load_config(config_path)
    layout = Layout(store)
    tokenizer = load_tokenizer(cfg.model, layout)
    with pytest.raises(DataError) as info:
        prepare_dataset(cfg.data, tokenizer, layout, cfg.seed)
    assert not [p for p in layout.stage_dir("prepare_dataset").glob("*") if not p.name.startswith(".")]
    return str(info.value)


def test_matrix_has_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_an_alias_bomb_under_a_typed_key_gives_a_short_message(world, capsys):
    """Nine levels of nine aliases expand to 9**9 strings; the error quotes a bounded excerpt of the value."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = yaml.safe_dump(world["config"], sort_keys=False)
    path = world["tmp"] / "bomb.yaml"
    path.write_text("\n".join(["x-anchors:"] + ["  " + line for line in levels]) + "\n" + config
                    + "output:\n  tags: *a8\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "output.tags" in err and "Traceback" not in err
    assert len(err) < 20_000, len(err)
