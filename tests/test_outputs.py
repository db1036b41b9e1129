"""Exporting artifacts into output_dir: hard links, replaced atomically, safe when two runs export at once."""

from __future__ import annotations

import os
import shutil
import threading

from ptflow.store.entries import build_or_reuse
from ptflow.store.outputs import export


def many_files(folder):
    for i in range(300):
        (folder / f"f{i:03d}.txt").write_text(f"file {i}\n")
    return {}


def test_two_exports_into_one_folder_at_once_both_succeed(layout, tmp_path):
    artifact = build_or_reuse(layout, "demo", {"n": 300}, many_files)
    out = tmp_path / "out"
    for _ in range(5):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        start, errors = threading.Barrier(2), []

        def run():
            start.wait()
            try:
                export(artifact, out)
            except BaseException as exc:  # noqa: BLE001 - the test reports whatever a racing export raises
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in artifact.dir.glob("f*.txt"))
        assert all(os.path.samefile(out / name, artifact.dir / name) for name in ("f000.txt", "f299.txt"))


def test_export_replaces_a_stale_file_with_a_link(layout, tmp_path):
    artifact = build_or_reuse(layout, "demo", {"n": 300}, many_files)
    out = tmp_path / "out"
    out.mkdir()
    (out / "f001.txt").write_text("an older run's file\n")
    export(artifact, out)
    assert os.path.samefile(out / "f001.txt", artifact.dir / "f001.txt")
    assert (out / "f001.txt").read_text() == "file 1\n"


def test_output_dir_gets_the_tokenizers_chat_template_and_the_checkpoints(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                          layout):
    """A tokenizer with a chat template reaches output_dir as chat_template.jinja (transformers 5 saves it there),
    as LLaMA-Factory's output has it; checkpoints of the train entry are exported with the model."""
    from ptflow.config.schema import DataSection, ModelSection, TrainSection
    from ptflow.data.dataset import prepare_dataset
    from ptflow.data.tokenizer import load_tokenizer, open_tokenizer
    from ptflow.train.loop import train

    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = open_tokenizer(model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    section = ModelSection(model_name_or_path=str(model_dir), train_from_scratch=True)
    tok = load_tokenizer(section, layout)
    data = prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=32), tok,
                           layout)
    model = train(section, TrainSection(max_steps=2, save_steps=1, per_device_train_batch_size=2), tok, data, layout)
    out = tmp_path / "out"
    written = export(model, out)
    assert (out / "chat_template.jinja").read_text() == template
    assert "chat_template.jinja" in written and "checkpoint-1/trainer_state.json" in written
