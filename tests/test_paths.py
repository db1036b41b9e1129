"""Paths from configs and dataset_info.json cannot make ptflow write outside the store and the output folder.

run_name names folders and files in the store, so it is one safe path component; the output
folder and the store may not lie inside the model or data folders (exporting would replace the
model's own files); dataset file names may point anywhere, but are only read.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from tiny_assets import write_dataset_info

from ptflow.errors import ConfigError, PreflightError
from ptflow.preflight import preflight
from ptflow.store.layout import Layout


def snapshot(folder) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: any write shows up as a difference."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} | {".": (0, folder.stat().st_mtime_ns)}


@pytest.mark.parametrize("run_name", ["../../x", "..", "a/b", "/etc/cron.d/x", ".hidden", "x\\..\\y", "two words",
                                      "", "run\x00name"])
def test_run_name_must_be_one_safe_path_component(make_config, run_name):
    with pytest.raises(ConfigError, match=r"run_name.*String should match pattern"):
        make_config(run_name=run_name)


def test_valid_run_names_stay_under_the_store(make_config, tmp_path):
    layout = Layout(tmp_path / "store")
    for name in ("a..b", "v1.2", "x-", "Run_3"):
        config = make_config(run_name=name)
        for path in (layout.run_dir(config.run_name), layout.lineage_file(config.run_name)):
            assert layout.root in path.resolve().parents


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, tiny_data_dir):
    return {"model": shutil.copytree(tiny_model_dir, tmp_path / "model"),
            "data": shutil.copytree(tiny_data_dir, tmp_path / "data"), "tmp": tmp_path}


PLACES = {  # where a config points output_dir / store -> the problem preflight must name
    "output_dir is the model folder": ({"output": {"output_dir": "{model}"}},
                                       r"output\.output_dir: .*/model is inside model\.model_name_or_path"),
    "output_dir under the model folder": ({"output": {"output_dir": "{model}/run"}},
                                          r"output\.output_dir: .*/model/run is inside model\.model_name_or_path"),
    "output_dir escapes back into the model": ({"output": {"output_dir": "{tmp}/out/../model/./x"}},
                                               r"output\.output_dir: .*/model/x is inside model\.model_name_or_path"),
    "output_dir under the data folder": ({"output": {"output_dir": "{data}/out"}},
                                         r"output\.output_dir: .*/data/out is inside data\.dataset_dir"),
    "store under the data folder": ({"store": "{data}/.cache"}, r"store: .*/data/\.cache is inside data\.dataset_dir"),
    "store is the model folder": ({"store": "{model}"}, r"store: .*/model is inside model\.model_name_or_path"),
    "output_dir in the store's cache": ({"output": {"output_dir": "{tmp}/store/cache/train/k"}},
                                        r"output\.output_dir: .*/store/cache/train/k is inside the store's cache"),
}


@pytest.mark.parametrize("case", sorted(PLACES))
def test_outputs_inside_inputs_are_refused_before_anything_is_written(make_config, inputs, case):
    change, pattern = PLACES[case]
    fill = lambda v: v.format(**inputs) if isinstance(v, str) else {k: fill(x) for k, x in v.items()}  # noqa: E731
    sections = {"store": str(inputs["tmp"] / "store"),
                "model": {"model_name_or_path": str(inputs["model"])}, "data": {"dataset_dir": str(inputs["data"])}}
    sections.update({k: fill(v) for k, v in change.items()})
    before = {name: snapshot(inputs[name]) for name in ("model", "data")}
    with pytest.raises(PreflightError) as info:
        preflight(make_config(**sections))
    assert any(re.search(pattern, p) for p in info.value.problems), info.value.problems
    assert "ptflow never writes into its inputs" in str(info.value) or "store's cache" in str(info.value)
    assert {name: snapshot(inputs[name]) for name in ("model", "data")} == before
    assert not (inputs["tmp"] / "store").exists()


def test_dataset_file_names_outside_the_data_folder_are_only_read(make_config, inputs, tokenizer_artifact):
    from ptflow.data.dataset import prepare_dataset

    elsewhere = inputs["tmp"] / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(inputs["data"] / "corpus.jsonl", elsewhere / "corpus.jsonl")
    write_dataset_info(inputs["data"], {"escape": {"file_name": "../elsewhere/corpus.jsonl"}})
    config = make_config(store=str(inputs["tmp"] / "store"),
                         data={"dataset": "escape", "dataset_dir": str(inputs["data"])})
    before = {"data": snapshot(inputs["data"]), "elsewhere": snapshot(elsewhere)}
    preflight(config)
    dataset = prepare_dataset(config.data, tokenizer_artifact, Layout(config.store), config.seed)
    assert dataset.stats["train_blocks"] > 0
    assert {"data": snapshot(inputs["data"]), "elsewhere": snapshot(elsewhere)} == before
    entry = json.loads((inputs["data"] / "dataset_info.json").read_text())["escape"]
    assert entry == {"file_name": "../elsewhere/corpus.jsonl"}


def test_code_shipped_in_a_model_folder_is_not_run_by_default(tmp_path, tiny_model_dir):
    """trust_remote_code defaults to false: a folder's auto_map module is never imported."""
    from ptflow.config.schema import ModelSection
    from ptflow.data.tokenizer import open_tokenizer
    from ptflow.errors import ModelError
    from ptflow.train.model import build_model

    assert ModelSection(model_name_or_path="m").trust_remote_code is False
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    for name, auto_map in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]})):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    section = ModelSection(model_name_or_path=str(folder), train_from_scratch=True)
    for load in (lambda: open_tokenizer(folder), lambda: build_model(section, folder, 4096, seed=0)):
        try:
            load()
        except (ModelError, ValueError):
            pass  # refusing is fine too; running the folder's code is not
    assert not marker.exists()
