"""Build or load the causal LM and set which parameters train (full / freeze / lora).

The rules follow LLaMA-Factory: freeze trains the last `freeze_trainable_layers` decoder
layers (the first |N| when negative), restricted to `freeze_trainable_modules`; lora wraps
`lora_target` linear layers with peft adapters (`all` = every linear layer but the head),
with `lora_alpha` defaulting to twice the rank. Only safetensors weights are loaded.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from ptflow.config.schema import ModelSection, TrainSection
from ptflow.errors import ModelError

log = logging.getLogger("ptflow.model")


def model_files(model_dir: Path, from_scratch: bool) -> list[Path]:
    """The files that define the model's content (config, and weights unless built from scratch)."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelError(f"model.model_name_or_path: {model_dir} has no config.json; it must be a saved "
                         "transformers model (or its config, with train_from_scratch: true)")
    if from_scratch:
        return [config]
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" It has {', '.join(pickles)}: pickle weights are not loaded; convert them to safetensors."
                if pickles else " Set model.train_from_scratch: true to start from random weights.")
        raise ModelError(f"model.model_name_or_path: {model_dir} has no *.safetensors weights.{hint}")
    return [config, *weights]


def build_model(section: ModelSection, model_dir: Path, vocab_size: int, seed: int,
                init_device: torch.device | None = None, sharded: bool = False):
    """The model in fp32 (master weights), from its config (random init) or from safetensors weights.

    A from-scratch model is built on the meta device and initialised on `init_device` (default: the CPU), where
    it trains: on a GPU that takes a fraction of a second for a 1B model, against seconds to tens of seconds on
    the CPU. With `sharded` it is left on the meta device for FSDP to shard first; `init_weights.initialize`
    then allocates and initialises each rank's shards. Either way the weights are the same for a given seed
    and kind of device (`init_weights`), and differ from a CPU build, as any GPU run's numbers do.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"trust_remote_code": section.trust_remote_code, "attn_implementation": section.attn_implementation}
    try:
        if section.train_from_scratch:
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=section.trust_remote_code)
            config.vocab_size = vocab_for(section, config.vocab_size, vocab_size)  # random rows either way
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True, **kwargs)
            model_vocab = model.get_input_embeddings().weight.shape[0]
            if vocab_for(section, model_vocab, vocab_size) != model_vocab:
                model.resize_token_embeddings(vocab_size, pad_to_multiple_of=64)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.model_name_or_path: cannot build the model from {model_dir}: {exc}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if section.train_from_scratch and not sharded:
        from ptflow.train.init_weights import initialize

        with init_threads():
            initialize(model, init_device or torch.device("cpu"), seed)
    return model


def vocab_for(section: ModelSection, model_vocab: int, tokenizer_vocab: int) -> int:
    """The vocabulary the model needs: its own, or the tokenizer's rounded up to a multiple of 64 (resize_vocab)."""
    if tokenizer_vocab <= model_vocab:
        return model_vocab
    if not section.resize_vocab:
        raise ModelError(f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is {model_vocab}; "
                         "set model.resize_vocab: true or use the model's own tokenizer")
    padded = -(-tokenizer_vocab // 64) * 64
    log.info("model: vocabulary %d -> %d (the tokenizer's %d, padded to a multiple of 64)", model_vocab, padded,
             tokenizer_vocab)
    return padded


@contextmanager
def init_threads():
    """This rank's share of the host's cores while weights are initialised on the CPU.

    torchrun sets OMP_NUM_THREADS=1, which leaves a model initialised on the CPU (CPU ranks, tests) drawing
    its weights on one core each; the ranks of a node split the cores instead.
    """
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(before, share))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def setup_finetuning(model, train: TrainSection):
    """Mark trainable parameters; returns the (possibly peft-wrapped) model."""
    if train.finetuning_type == "full":
        model.requires_grad_(True)
        return model
    if train.finetuning_type == "freeze":
        n_layers = model.config.num_hidden_layers
        k = train.freeze_trainable_layers
        layer_ids = range(max(0, n_layers - k), n_layers) if k > 0 else range(min(-k, n_layers))
        modules = train.freeze_trainable_modules
        pattern = re.compile(r"\.(\d+)\.(.+)$")
        for name, param in model.named_parameters():
            match = pattern.search(name)
            in_layer = bool(match) and int(match.group(1)) in layer_ids and ".layers." in name
            param.requires_grad_(in_layer and ("all" in modules or any(f".{m}" in name or match.group(2).startswith(m)
                                                                       for m in modules)))
        if not any(p.requires_grad for p in model.parameters()):
            raise ModelError(f"train.freeze_trainable_modules: {modules} matches no parameter in layers "
                             f"{list(layer_ids)}; use module names such as mlp or self_attn")
        return model
    from peft import LoraConfig, get_peft_model

    targets = train.lora_target
    if "all" in targets:
        output_names = {"lm_head", "embed_out", "output_layer"}
        targets = sorted({name.split(".")[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in output_names})
    lora = LoraConfig(task_type="CAUSAL_LM", r=train.lora_rank, lora_alpha=train.lora_alpha or 2 * train.lora_rank,
                      lora_dropout=train.lora_dropout, target_modules=targets)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"train.lora_target: {train.lora_target}: {exc}") from None


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def load_saved_model(folder: Path, device: torch.device):
    """A stored model in fp32 on `device` (merging nothing: a LoRA folder loads base + adapter)."""
    from transformers import AutoModelForCausalLM

    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return model.to(device)
