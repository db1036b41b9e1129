"""Model building and finetuning types: exact trainable-parameter counts, safetensors only, vocab checks."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import TINY_LLAMA

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.errors import ModelError
from ptflow.train.model import (
    build_model,
    count_parameters,
    model_files,
    setup_finetuning,
)

LAYER_PARAMS = 9280  # q 1024 + k 512 + v 512 + o 1024 + gate/up/down 3 x 2048 + 2 norms x 32
TOTAL_PARAMS = 4096 * 32 + 2 * LAYER_PARAMS + 32  # tied embedding/head + layers + final norm


def scratch(model_dir, **kw) -> ModelSection:
    return ModelSection(model_name_or_path=str(model_dir), train_from_scratch=True, **kw)


@pytest.fixture
def model(tiny_model_dir):
    return build_model(scratch(tiny_model_dir), tiny_model_dir, 4096, seed=0)


def trainable_names(net) -> set[str]:
    return {name for name, p in net.named_parameters() if p.requires_grad}


def numel(net, predicate) -> int:
    return sum(p.numel() for name, p in net.named_parameters() if predicate(name))


def test_tiny_model_shape(model):
    assert count_parameters(model) == (TOTAL_PARAMS, TOTAL_PARAMS) == (149_664, 149_664)
    assert model.config.num_hidden_layers == TINY_LLAMA["num_hidden_layers"]
    assert model.config.use_cache is False
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied


def test_full_trains_everything(model):
    net = setup_finetuning(model, TrainSection(finetuning_type="full"))
    assert count_parameters(net) == (TOTAL_PARAMS, TOTAL_PARAMS)


def test_freeze_last_layer(model):
    expected = numel(model, lambda name: name.startswith("model.layers.1."))
    net = setup_finetuning(model, TrainSection(finetuning_type="freeze", freeze_trainable_layers=1))
    assert count_parameters(net) == (TOTAL_PARAMS, expected) == (TOTAL_PARAMS, LAYER_PARAMS)
    assert trainable_names(net) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}


def test_freeze_negative_trains_the_first_layers(model):
    net = setup_finetuning(model, TrainSection(finetuning_type="freeze", freeze_trainable_layers=-1))
    assert trainable_names(net) == {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")}


def test_freeze_more_layers_than_the_model_has(model):
    net = setup_finetuning(model, TrainSection(finetuning_type="freeze", freeze_trainable_layers=5))
    assert count_parameters(net)[1] == 2 * LAYER_PARAMS  # every decoder layer, never embeddings or final norm


@pytest.mark.parametrize("modules, expected", [
    (["mlp"], 3 * 2048),
    (["self_attn"], 1024 + 512 + 512 + 1024),
    (["q_proj", "down_proj"], 1024 + 2048),
])
def test_freeze_restricted_to_modules(model, modules, expected):
    net = setup_finetuning(model, TrainSection(finetuning_type="freeze", freeze_trainable_layers=1,
                                               freeze_trainable_modules=modules))
    assert count_parameters(net)[1] == expected
    assert all(name.startswith("model.layers.1.") for name in trainable_names(net))


def test_freeze_with_unknown_module_raises(model):
    with pytest.raises(ModelError, match=r"train\.freeze_trainable_modules: \['attention'\] matches no parameter in "
                                         r"layers \[1\]"):
        setup_finetuning(model, TrainSection(finetuning_type="freeze", freeze_trainable_layers=1,
                                             freeze_trainable_modules=["attention"]))


def lora_expected(model, rank: int, names: set[str] | None = None) -> int:
    """r * (in + out) for every adapted Linear (all linear layers but the output head by default)."""
    total = 0
    for name, module in model.named_modules():
        short = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and short != "lm_head" and (names is None or short in names):
            total += rank * (module.in_features + module.out_features)
    return total


def test_lora_rank_4_on_all_linear_layers(model):
    expected = lora_expected(model, 4)
    assert expected == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96) == 4096
    net = setup_finetuning(model, TrainSection(finetuning_type="lora", lora_rank=4))
    total, trainable = count_parameters(net)
    assert (total, trainable) == (TOTAL_PARAMS + expected, expected)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable_names(net))
    config = net.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)  # alpha defaults to 2 x rank
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_on_chosen_modules(model):
    expected = lora_expected(model, 2, {"q_proj", "v_proj"})
    net = setup_finetuning(model, TrainSection(finetuning_type="lora", lora_rank=2, lora_alpha=16,
                                               lora_target="q_proj,v_proj"))
    assert count_parameters(net)[1] == expected == 2 * 2 * (64 + 48)
    assert net.peft_config["default"].lora_alpha == 16


def test_lora_with_unknown_target_raises(model):
    with pytest.raises(ModelError, match=r"train\.lora_target: \['qkv'\]"):
        setup_finetuning(model, TrainSection(finetuning_type="lora", lora_target=["qkv"]))


def test_pretrained_weights_load_from_safetensors(tiny_weights_dir):
    section = ModelSection(model_name_or_path=str(tiny_weights_dir))
    assert [p.name for p in model_files(tiny_weights_dir, False)] == ["config.json", "model.safetensors"]
    assert [p.name for p in model_files(tiny_weights_dir, True)] == ["config.json"]
    net = build_model(section, tiny_weights_dir, 4096, seed=123)
    saved = load_file(tiny_weights_dir / "model.safetensors")
    state = net.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert next(net.parameters()).dtype == torch.float32


def test_scratch_init_is_seeded(tiny_model_dir):
    a = build_model(scratch(tiny_model_dir), tiny_model_dir, 4096, seed=1)
    b = build_model(scratch(tiny_model_dir), tiny_model_dir, 4096, seed=1)
    c = build_model(scratch(tiny_model_dir), tiny_model_dir, 4096, seed=2)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_scratch_init_follows_the_models_own_init(tiny_model_dir):
    """Built on the meta device, initialised by the model's `_init_weights`: N(0, 0.02) matrices, unit norms, a zero
    padding row, the head still tied to the embedding, real rotary frequencies."""
    net = build_model(scratch(tiny_model_dir), tiny_model_dir, 4096, seed=0)
    embed = net.model.embed_tokens.weight
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in net.parameters())
    assert net.lm_head.weight is embed and count_parameters(net)[0] == TOTAL_PARAMS
    assert torch.count_nonzero(embed[TINY_LLAMA["pad_token_id"]]) == 0
    assert torch.equal(net.model.norm.weight, torch.ones(32))
    up = net.model.layers[0].mlp.up_proj.weight
    assert abs(float(up.mean())) < 2e-3 and float(up.std()) == pytest.approx(0.02, rel=0.1)
    assert torch.allclose(net.model.rotary_emb.inv_freq, net.model.rotary_emb.original_inv_freq)
    assert float(net.model.rotary_emb.inv_freq[0]) == 1.0


def test_a_parameter_the_init_does_not_reach_is_named(tiny_model_dir):
    """An extra parameter that `_init_weights` knows nothing of would train from uninitialised memory: refused."""
    from transformers import AutoModelForCausalLM

    from ptflow.train.init_weights import initialize
    from tiny_assets import tiny_llama_config

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(tiny_llama_config())
        net.model.layers[1].mlp.register_parameter("gain", torch.nn.Parameter(torch.empty(32)))
    with pytest.raises(ModelError, match=r"does not initialise model\.layers\.1\.mlp\.gain"):
        initialize(net, torch.device("cpu"), seed=0)


def test_pickle_weights_are_refused(tiny_weights_dir, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_weights_dir / name, folder / name)
    torch.save({"model.norm.weight": torch.ones(32)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights\. It has pytorch_model\.bin: pickle weights "
                                         r"are not loaded; convert them to safetensors"):
        model_files(folder, from_scratch=False)
    with pytest.raises(ModelError, match=r"cannot build the model from .*bin-only"):
        build_model(ModelSection(model_name_or_path=str(folder)), folder, 4096, seed=0)


def test_no_weights_suggests_train_from_scratch(tiny_model_dir):
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights\. Set model\.train_from_scratch: true"):
        model_files(tiny_model_dir, from_scratch=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"has no config\.json; it must be a saved transformers model"):
        model_files(tmp_path, from_scratch=True)


def test_tokenizer_larger_than_vocab_needs_resize_vocab(tiny_model_dir):
    with pytest.raises(ModelError, match=r"the tokenizer has 5000 tokens but the model's vocabulary is 4096; "
                                         r"set model\.resize_vocab: true"):
        build_model(scratch(tiny_model_dir), tiny_model_dir, 5000, seed=0)
    net = build_model(scratch(tiny_model_dir, resize_vocab=True), tiny_model_dir, 5000, seed=0)
    assert net.get_input_embeddings().weight.shape == (5056, 32)  # padded to a multiple of 64
    assert net.get_output_embeddings().weight.shape[0] == 5056


def test_smaller_tokenizer_keeps_the_vocabulary(tiny_model_dir):
    net = build_model(scratch(tiny_model_dir), tiny_model_dir, 4000, seed=0)
    assert net.get_input_embeddings().weight.shape == (4096, 32)
