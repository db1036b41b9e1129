"""The `ptflow` command as users run it: readable errors, exit codes, no tracebacks for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from flows import cli

ROOT = Path(__file__).resolve().parents[1]


def ptflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_validate_quickstart_ok():
    result = ptflow("validate", "configs/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "configs/quickstart.yaml: OK" in result.stdout


def test_unknown_and_mistyped_keys_are_all_reported_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "configs/quickstart.yaml").read_text().replace("learning_rate: 1.0e-3", "learnig_rate: 1.0e-3")
    text = text.replace("max_steps: 300", "max_steps: lots")
    bad.write_text(text)
    line_of = {key: n for n, line in enumerate(text.splitlines(), 1) for key in ("learnig_rate", "max_steps")
               if line.strip().startswith(key)}
    result = ptflow("validate", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "2 problem(s)" in result.stderr
    assert (f"train.learnig_rate (line {line_of['learnig_rate']}): unknown key. Did you mean train.learning_rate?"
            in result.stderr)
    assert f"train.max_steps (line {line_of['max_steps']}): got 'lots'; expected a valid integer" in result.stderr


def test_missing_inputs_fail_in_preflight_before_prefect_starts(tmp_path):
    result = ptflow("run", "configs/quickstart.yaml", "data.dataset=nope", f"model.model_name_or_path={tmp_path}/none",
                    f"store={tmp_path}/store")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "prefect" not in result.stderr.lower()
    assert "'nope' is not in configs/quickstart/data/dataset_info.json (it has: stdlib_docs)" in result.stderr
    assert f"'{tmp_path}/none' is not a directory" in result.stderr
    assert not (tmp_path / "store" / "cache").exists()


def test_override_syntax_error():
    result = ptflow("validate", "configs/quickstart.yaml", "train.learning_rate")
    assert result.returncode == 2
    assert "expected section.key=value" in result.stderr


def test_config_reference_lists_every_section():
    result = ptflow("config-reference")
    assert result.returncode == 0
    for key in ("`data.cutoff_len`", "`train.learning_rate`", "`model.model_name_or_path`", "`eval.do_eval`"):
        assert key in result.stdout


def test_prefect_home_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch, capsys):
    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for key, value in cli.QUIET_PREFECT.items():
        monkeypatch.setenv(key, value)
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=3, f_frsize=4096)
                        if str(path) == str(home) else real(path))
    assert cli.main(["run", "configs/quickstart.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ptflow: error: PREFECT_HOME {home}: the disk is full (0 MiB free; Prefect's database "
                          "needs at least 64 MiB)") and "Traceback" not in err


def _model_without_eos(folder: Path) -> Path:
    """The quickstart model folder (4096-token vocab) whose tokenizer has no EOS: load_tokenizer adds one."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(ROOT / "configs/quickstart/model", folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    return folder


def test_validate_counts_the_eos_token_load_tokenizer_adds(tmp_path):
    model = _model_without_eos(tmp_path / "model")
    args = ("validate", "configs/quickstart.yaml", f"model.model_name_or_path={model}", f"store={tmp_path}/store",
            f"output.output_dir={tmp_path}/out")
    result = ptflow(*args)
    assert result.returncode == 2, result.stdout
    assert (f"the tokenizer in {model} has 4097 tokens after load_tokenizer added eos_token <|endoftext|> but "
            "config.json's vocab_size is 4096; set model.resize_vocab: true") in result.stderr
    assert ptflow(*args, "model.resize_vocab=true").returncode == 0
