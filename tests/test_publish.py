"""Stage publish and its preflight, against a local stand-in of the Hub API (no internet)."""

from __future__ import annotations

import traceback

import pytest
from hub_standin import serve_hub

from ptflow.config.schema import DataSection, ModelSection, OutputSection, TrainSection
from ptflow.errors import ConfigError, HubError, PreflightError, is_transient
from ptflow.publish.hub import check_access, publish
from ptflow.store.entries import Artifact
from ptflow.store.outputs import export

GOOD = "hf_goodTokenForAlice0123456789"
BAD = "hf_SENTINELbadToken0123456789"
DATA_DIGEST = "d" * 64
FLOW_RUN = "pretrain/brave-fox (1234)"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with serve_hub(monkeypatch, tmp_path) as server:
        server.add_user(GOOD, "alice", orgs={"lab": "write", "readers": "read"})
        yield server


def artifact(folder, stage: str, files: dict[str, bytes]) -> Artifact:
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return Artifact(stage=stage, key=stage[0] * 32, path=str(folder), digest=stage[0] * 64,
                    stats={"perplexity": 12.5, "eval_set_digest": "e" * 64} if stage == "evaluate" else {})


@pytest.fixture
def run(tmp_path):
    """Artifacts of a finished run, exported into an output folder that also holds a stale file."""
    weights = bytes(range(256)) * 64
    model = artifact(tmp_path / "store" / "train", "train", {
        "model.safetensors": weights, "config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
        "trainer_log.jsonl": b'{"current_steps": 1, "loss": 8.0}\n', "checkpoint-2/model.safetensors": weights})
    evaluation = artifact(tmp_path / "store" / "evaluate", "evaluate", {"eval_results.json": b'{"eval_loss": 2.5}'})
    plots = artifact(tmp_path / "store" / "plot_loss", "plot_loss", {"training_loss.png": b"\x89PNG\r\n\x1a\n\0fake"})
    card = artifact(tmp_path / "store" / "card", "write_model_card", {"README.md": b"---\nlicense: mit\n---\n# tiny\n"})
    out = tmp_path / "out"
    for a in (model, evaluation, plots, card):
        export(a, out)
    (out / "stale_from_another_run.bin").write_bytes(b"old")
    return out, [model, evaluation, plots, card]


def push(section: OutputSection, run, sleeps: list | None = None, **kwargs):
    out, artifacts = run
    recorder = sleeps if sleeps is not None else []
    return publish(section, out, artifacts, run_name="tiny", data_digest=DATA_DIGEST, flow_run=FLOW_RUN,
                   sleep=recorder.append, **kwargs)


def test_publish_creates_the_repo_and_uploads_the_run_in_one_commit(hub, run):
    out, _ = run
    result = push(OutputSection(push_to_hub=True, hub_token=GOOD, hub_private_repo=True), run)
    repo = hub.repos["alice/tiny"]  # no namespace given: the token's user
    assert repo.private
    assert len(repo.commits) == 1
    commit = repo.commits[0]
    assert commit["summary"] == f"ptflow run tiny, flow run {FLOW_RUN}: data manifest {DATA_DIGEST[:16]}"
    assert f"data manifest digest: {DATA_DIGEST}" in commit["description"]
    assert "perplexity: 12.5" in commit["description"]
    expected = ["README.md", "config.json", "eval_results.json", "model.safetensors", "tokenizer.json",
                "trainer_log.jsonl", "training_loss.png"]  # no checkpoint, no stale file
    assert sorted(repo.files) == expected
    assert all(repo.files[name] == (out / name).read_bytes() for name in expected)
    assert commit["lfs"] == ["model.safetensors", "training_loss.png"]  # binaries through LFS, sha256 checked
    assert hub.readmes == [(out / "README.md").read_text()]  # the card's metadata was validated first
    assert hub.routes() == ["whoami", "create_repo", "validate_yaml", "preupload", "lfs_batch", "lfs_upload",
                            "lfs_upload", "commit"]
    # The token goes to the Hub API only, never to the storage URL the LFS objects are PUT to.
    assert {r.route: r.authenticated for r in hub.api_requests()} == {
        "whoami": True, "create_repo": True, "validate_yaml": True, "preupload": True, "lfs_batch": True,
        "lfs_upload": False, "commit": True}
    assert (result.repo_id, result.files, result.hub_calls) == ("alice/tiny", tuple(expected), 3)
    assert result.commit_url == f"{hub.url}/alice/tiny/commit/{commit['oid']}"


def test_publish_to_an_existing_org_repo_adds_a_commit(hub, run):
    section = OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id="lab/tiny-lm")
    push(section, run)
    push(section, run)
    assert hub.routes(409) == ["create_repo"]  # exists: reused, not an error
    assert len(hub.repos["lab/tiny-lm"].commits) == 2


def test_a_503_on_commit_is_retried_with_backoff(hub, run):
    hub.faults["commit"] = [503]
    sleeps = []
    result = push(OutputSection(push_to_hub=True, hub_token=GOOD), run, sleeps)
    assert sleeps == [2.0]
    assert [(r.route, r.status) for r in hub.api_requests() if r.route == "commit"] == [("commit", 503), ("commit", 200)]
    assert len(hub.repos["alice/tiny"].commits) == 1 and result.hub_calls == 4


def test_429_and_5xx_on_whoami_back_off_exponentially(hub, run):
    hub.faults["whoami"] = [429, 502, 504]
    sleeps = []
    push(OutputSection(push_to_hub=True, hub_token=GOOD), run, sleeps)
    assert sleeps == [2.0, 4.0, 8.0]
    assert len(hub.repos["alice/tiny"].commits) == 1


def test_a_hub_that_stays_down_fails_as_transient(hub, run):
    hub.faults["commit"] = [503] * 10
    with pytest.raises(HubError, match=r"commit failed 3 times \(HTTP 503.*Re-run the flow later") as info:
        push(OutputSection(push_to_hub=True, hub_token=GOOD), run, retry_delays_s=(0.0, 0.0))
    assert is_transient(info.value)
    assert hub.routes().count("commit") == 3 and hub.repos["alice/tiny"].commits == []


def test_connection_refused_is_transient(monkeypatch, tmp_path, run):
    with serve_hub(monkeypatch, tmp_path) as gone:
        url = gone.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    sleeps = []
    with pytest.raises(HubError, match=r"whoami failed 2 times \(ConnectError") as info:
        push(OutputSection(push_to_hub=True, hub_token=GOOD), run, sleeps, retry_delays_s=(0.5,))
    assert is_transient(info.value) and sleeps == [0.5]


def test_a_bad_token_fails_at_once_without_revealing_it(hub, run):
    sleeps = []
    with pytest.raises(HubError) as info:
        push(OutputSection(push_to_hub=True, hub_token=BAD), run, sleeps)
    message = str(info.value)
    assert "the Hub rejected the token (whoami: HTTP 401)" in message
    assert "HF_TOKEN" in message and "https://huggingface.co/settings/tokens" in message
    assert not is_transient(info.value) and sleeps == []
    assert hub.routes() == ["whoami"] and hub.repos == {}
    shown = message + repr(info.value) + "".join(traceback.format_exception(info.value))
    assert BAD not in shown and "SENTINEL" not in shown


@pytest.mark.parametrize("repo, fault, expected", [
    ("bigcorp/tiny", None, r"may not write to bigcorp/tiny \(create repo: HTTP 403\)"),
    ("readers/tiny", None, r"may not write to readers/tiny \(create repo: HTTP 403\)"),
    ("alice/tiny", 404, r"alice/tiny was not found \(commit: HTTP 404\)\. Check output\.hub_model_id"),
])
def test_403_and_404_fail_at_once_with_the_fix(hub, run, repo, fault, expected):
    if fault:
        hub.faults["commit"] = [fault]
    sleeps = []
    with pytest.raises(HubError, match=expected) as info:
        push(OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id=repo), run, sleeps)
    assert sleeps == [] and not is_transient(info.value)


def test_offline_mode_fails_at_once(hub, run, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sleeps = []
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 forbids contacting the Hub") as info:
        push(OutputSection(push_to_hub=True, hub_token=GOOD), run, sleeps)
    assert sleeps == [] and not is_transient(info.value) and hub.routes() == []


def test_hf_token_from_the_environment_wins_over_the_config(hub, run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD)
    push(OutputSection(push_to_hub=True, hub_token=BAD), run)  # the bad config token is never sent
    assert hub.routes(401) == [] and len(hub.repos["alice/tiny"].commits) == 1
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hub token found; export HF_TOKEN"):
        push(OutputSection(push_to_hub=True), run)


def test_a_lora_run_uploads_the_adapter(hub, tiny_weights_dir, tiny_data_dir, tokenizer_artifact, layout, tmp_path):
    from ptflow.data.dataset import prepare_dataset
    from ptflow.train.loop import train

    data = prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=32),
                           tokenizer_artifact, layout)
    model = train(ModelSection(model_name_or_path=str(tiny_weights_dir)),
                  TrainSection(finetuning_type="lora", max_steps=2, per_device_train_batch_size=2, save_steps=1),
                  tokenizer_artifact, data, layout)
    out = tmp_path / "lora-out"
    export(model, out)
    result = publish(OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id="tiny-lora"), out, [model],
                     run_name="tiny", data_digest=data.digest)
    uploaded = set(hub.repos["alice/tiny-lora"].files)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= uploaded
    assert "model.safetensors" not in uploaded and not any(name.startswith("checkpoint-") for name in uploaded)
    assert set(result.files) == uploaded


# preflight


def test_check_access_accepts_a_write_token_for_its_user_and_orgs(hub):
    assert check_access(OutputSection(push_to_hub=True, hub_token=GOOD), "tiny") == []
    assert check_access(OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id="lab/x"), "tiny") == []
    assert hub.routes() == ["whoami", "whoami"]


def test_check_access_names_each_problem(hub, monkeypatch):
    [bad] = check_access(OutputSection(push_to_hub=True, hub_token=BAD), "tiny")
    assert "rejected the token (whoami: HTTP 401)" in bad and BAD not in bad
    [foreign] = check_access(OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id="bigcorp/x"), "tiny")
    assert "the token belongs to 'alice', who is not a member of 'bigcorp'" in foreign
    assert "push to alice/x" in foreign
    [reader] = check_access(OutputSection(push_to_hub=True, hub_token=GOOD, hub_model_id="readers/x"), "tiny")
    assert "'alice' has the read role in 'readers'" in reader
    hub.add_user("hf_readOnlyToken0123456789", "bob", role="read")
    [read_only] = check_access(OutputSection(push_to_hub=True, hub_token="hf_readOnlyToken0123456789"), "tiny")
    assert "the token is read-only" in read_only
    [missing] = check_access(OutputSection(push_to_hub=True), "tiny")
    assert "no Hub token found; export HF_TOKEN" in missing


def test_preflight_fails_on_a_bad_token_before_anything_is_written(hub, make_config, tmp_path):
    from ptflow.preflight import preflight

    store = tmp_path / "store"
    with pytest.raises(PreflightError, match=r"output\.push_to_hub: publish: the Hub rejected the token") as info:
        preflight(make_config(store=str(store), output={"push_to_hub": True, "hub_token": BAD}))
    assert BAD not in str(info.value) and not store.exists()
    preflight(make_config(store=str(store), output={"push_to_hub": True, "hub_token": GOOD}))
    assert hub.routes() == ["whoami", "whoami"]


# config


def test_a_token_is_refused_as_a_command_line_override_and_never_echoed(tmp_path):
    from ptflow.config.loading import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model: {model_name_or_path: m}\ndata: {dataset: d}\noutput: {hub_token: 12345}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"output.hub_token={BAD}"])
    assert "output.hub_token: a token on the command line shows up in the process list" in str(info.value)
    assert BAD not in str(info.value)
    path.write_text("model: {model_name_or_path: m}\ndata: {dataset: d}\noutput: {hub_token: [98765]}\n")
    with pytest.raises(ConfigError, match=r"output\.hub_token \(line 3\): got '<hidden>'") as info:
        load_config(path)
    assert "98765" not in str(info.value)


def test_the_token_never_appears_in_a_dump_of_the_config():
    section = OutputSection(push_to_hub=True, hub_token=BAD)
    assert BAD not in repr(section) + str(section.model_dump()) + section.model_dump_json()
    assert section.hub_token.get_secret_value() == BAD
