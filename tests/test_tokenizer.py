"""Stage load_tokenizer: saved as an artifact keyed by file content, EOS/pad fixes, offline Hub cache."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_assets import copy_tokenizer

from ptflow.config.schema import ModelSection
from ptflow.data.tokenizer import load_tokenizer, open_tokenizer, resolve_model_dir
from ptflow.errors import ModelError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def section(path, **kw) -> ModelSection:
    return ModelSection(model_name_or_path=str(path), **kw)


def edit_tokenizer_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def test_load_tokenizer_saves_files_and_stats(tiny_model_dir, layout):
    artifact = load_tokenizer(section(tiny_model_dir), layout)
    assert not artifact.hit
    assert artifact.stage == "load_tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json", "manifest.json"} <= {p.name for p in artifact.dir.iterdir()}
    stats = artifact.stats
    assert (stats["vocab_size"], stats["eos_token"], stats["eos_token_id"], stats["pad_token"], stats["bos_token"]) \
        == (4096, "</s>", 1, "<pad>", "<s>")
    assert stats["fixes"] == []
    assert stats["source"] == str(tiny_model_dir)
    saved = open_tokenizer(artifact.dir)
    assert (len(saved), saved.eos_token_id, saved.pad_token_id) == (4096, 1, 2)
    assert saved("def f(x): return x", add_special_tokens=False)["input_ids"] == [1912, 275, 10, 90, 778, 395, 1027]


def test_second_call_hits(tiny_model_dir, layout):
    first = load_tokenizer(section(tiny_model_dir), layout)
    second = load_tokenizer(section(tiny_model_dir), layout)
    assert (second.hit, second.reason) == (True, "all key components unchanged")
    assert (second.key, second.digest, second.path) == (first.key, first.digest, first.path)


def test_moved_model_folder_still_hits(tiny_model_dir, layout, tmp_path):
    first = load_tokenizer(section(tiny_model_dir), layout)
    moved = shutil.copytree(tiny_model_dir, tmp_path / "somewhere" / "else")
    second = load_tokenizer(section(moved), layout)
    assert second.hit and second.key == first.key


def test_edited_tokenizer_config_misses(tiny_model_dir, layout, tmp_path):
    first = load_tokenizer(section(tiny_model_dir), layout)
    edited = shutil.copytree(tiny_model_dir, tmp_path / "edited")
    edit_tokenizer_config(edited, padding_side="left")
    second = load_tokenizer(section(edited), layout)
    assert not second.hit and second.key != first.key
    assert second.reason.startswith("changed inputs.tokenizer_config.json: ")
    assert "tokenizer.json:" not in second.reason
    assert second.digest != first.digest  # downstream keys (dataset, train) change with it


def test_edited_tokenizer_json_misses(tiny_model_dir, layout, tmp_path):
    load_tokenizer(section(tiny_model_dir), layout)
    edited = shutil.copytree(tiny_model_dir, tmp_path / "edited")
    tok = json.loads((edited / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (edited / "tokenizer.json").write_text(json.dumps(tok))
    second = load_tokenizer(section(edited), layout)
    assert not second.hit
    assert second.reason.startswith("changed inputs.tokenizer.json: ")


def test_tokenizer_options_are_part_of_the_key(tiny_model_dir, layout):
    load_tokenizer(section(tiny_model_dir), layout)
    other = load_tokenizer(section(tiny_model_dir, model_revision="v2"), layout)
    assert not other.hit
    assert other.reason == 'changed config.model_revision: "main" -> "v2"'


def test_missing_pad_token_becomes_eos(tmp_path, layout):
    folder = copy_tokenizer(tmp_path / "nopad")
    edit_tokenizer_config(folder, pad_token=None)
    assert open_tokenizer(folder).pad_token is None
    artifact = load_tokenizer(section(folder), layout)
    assert artifact.stats["fixes"] == ["pad_token set to eos_token </s>"]
    assert (artifact.stats["pad_token"], artifact.stats["vocab_size"]) == ("</s>", 4096)
    saved = open_tokenizer(artifact.dir)
    assert (saved.pad_token, saved.pad_token_id, saved.eos_token_id) == ("</s>", 1, 1)


def test_missing_eos_and_pad_are_added(tmp_path, layout):
    folder = copy_tokenizer(tmp_path / "noeos")
    edit_tokenizer_config(folder, pad_token=None, eos_token=None)
    artifact = load_tokenizer(section(folder), layout)
    assert artifact.stats["fixes"] == ["added eos_token <|endoftext|>", "pad_token set to eos_token <|endoftext|>"]
    assert (artifact.stats["eos_token"], artifact.stats["eos_token_id"], artifact.stats["vocab_size"]) \
        == ("<|endoftext|>", 4096, 4097)
    saved = open_tokenizer(artifact.dir)
    assert (saved.eos_token_id, saved.pad_token_id, len(saved)) == (4096, 4096, 4097)


def test_folder_without_tokenizer_files(tmp_path, layout):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"has no tokenizer files \(looked for tokenizer\.json, "
                                         r"tokenizer_config\.json, special_tokens_map\.json, \.\.\.\)"):
        load_tokenizer(section(empty), layout)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "a/b/c"])
def test_missing_local_path_is_not_mistaken_for_a_hub_id(name, layout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=rf"model\.model_name_or_path: '{name}' is not a directory"):
        load_tokenizer(section(name), layout)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A Hugging Face cache holding org/tiny at COMMIT (refs/main -> COMMIT), offline mode on.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into `constants` at import time,
    so the module attributes are patched as well as the environment.
    """
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny_model_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for var, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named org/tiny
    return snapshot


def test_hub_id_resolves_from_the_offline_cache(hub_cache, tiny_model_dir, layout):
    assert resolve_model_dir(section("org/tiny")) == hub_cache
    assert resolve_model_dir(section("org/tiny", model_revision=COMMIT)) == hub_cache
    artifact = load_tokenizer(section("org/tiny"), layout)
    assert artifact.stats["vocab_size"] == 4096 and artifact.stats["source"] == "org/tiny"
    # Same files as the local folder: the key is the same (content, not location).
    assert load_tokenizer(section(tiny_model_dir), layout).hit


def test_unknown_hub_id_offline_gives_a_clear_error(hub_cache, layout):
    with pytest.raises(ModelError, match=r"model\.model_name_or_path: 'org/unknown' \(revision 'main'\) is not a local "
                                         r"directory and is not in the Hugging Face cache while offline\. "
                                         r"Download it first"):
        load_tokenizer(section("org/unknown"), layout)


def test_unknown_revision_offline_gives_a_clear_error(hub_cache, layout):
    with pytest.raises(ModelError, match=r"'org/tiny' \(revision 'v9'\) is not a local directory"):
        load_tokenizer(section("org/tiny", model_revision="v9"), layout)
