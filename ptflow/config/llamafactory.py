"""LLaMA-Factory `stage: pt` YAML files: recognise them, map every key onto ptflow's sections, say what changed.

A LLaMA-Factory config is flat (`model_name_or_path`, `cutoff_len`, `learning_rate`, ... at the top
level). ptflow's keys are LLaMA-Factory's names already and unique across sections, so a key the schema
has is routed to its section by name, from the pydantic fields themselves: a field added to a section is
picked up without touching this module. `RULES` lists only the other LLaMA-Factory keys: mapped onto a
differently named ptflow key, ignored with a warning (and why), or rejected (why, and what to do).
`LF_DEFAULTS` are the keys whose LLaMA-Factory default differs from ptflow's: when an LLaMA-Factory file
leaves one out, LLaMA-Factory's default is applied (drop-in fidelity) and a note says so.

    from ptflow.config.llamafactory import convert, is_llamafactory, to_ptflow_yaml
    result = convert(flat_dict, yaml_root)         # result.raw: sectioned config; result.notes: what each key became
    print(to_ptflow_yaml(result, "lf.yaml"))        # `ptflow convert-lf lf.yaml`: the same run as a ptflow YAML

`ptflow run lf.yaml` and `ptflow validate lf.yaml` accept such a file directly (`config.load_config` calls
`load`). docs/llamafactory.md holds the table of every key (`ptflow config-reference --llamafactory`).
"""

from __future__ import annotations

import difflib
import logging
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ptflow.config.schema import (
    SECRET_KEYS,
    SECTIONS,
    TOP_LEVEL,
    RunConfig,
    apply_overrides,
    is_secret,
    validate_config,
)
from ptflow.errors import ConfigError

log = logging.getLogger("ptflow.llamafactory")

GROUPS = ("model", "data", "finetuning", "training", "generation")
"""LLaMA-Factory's argument classes (hparams/*_args.py; training = transformers' TrainingArguments + LF's)."""


class Unsupported(ValueError):
    """A value a mapping cannot express in ptflow; the message says why and what to do."""


@dataclass(frozen=True)
class Rule:
    """What happens to one LLaMA-Factory key that ptflow's schema does not have by that name."""

    action: str  # "mapped" | "ignored" | "rejected"
    group: str
    why: str
    # values that need no warning (ignored) or are accepted (rejected): LF's default, or what ptflow does anyway
    quiet: tuple = ()
    example: Any = None  # a value the rule acts on (tests, docs); derived from `quiet` when None
    to: tuple[str, ...] = ()  # mapped: the ptflow keys it writes
    # mapped: value -> ({ptflow key: value}, warning or None); raises Unsupported for a value it cannot map
    apply: Callable[[Any], tuple[dict[str, Any], str | None]] | None = None

    def trigger(self) -> Any:
        """A value that makes the rule act (warn, reject or map)."""
        if self.example is not None:
            return self.example
        first = self.quiet[0] if self.quiet else None
        if isinstance(first, bool):
            return not first
        if isinstance(first, (int, float)):
            return first + 1
        if isinstance(first, str):
            return first + "-custom"
        return "custom"


def _many(action: str, group: str, why: str, keys: dict[str, Any]) -> dict[str, Rule]:
    """One rule per key sharing a reason; a key's value is its quiet value (a tuple: several)."""
    return {k: Rule(action, group, why, v if isinstance(v, tuple) else (v,)) for k, v in keys.items()}


def _ignored(group: str, why: str, **keys: Any) -> dict[str, Rule]:
    return _many("ignored", group, why, keys)


def _rejected(group: str, why: str, **keys: Any) -> dict[str, Rule]:
    return _many("rejected", group, why, keys)


# -- mapped keys -----------------------------------------------------------------------------------------------

def _flash_attn(value: Any) -> tuple[dict, str | None]:
    if value in ("auto", "sdpa"):
        return {"model.attn_implementation": "sdpa"}, None
    if value in ("disabled", "off"):
        return {"model.attn_implementation": "eager"}, None
    if value in ("fa2", "fa3"):
        return {"model.attn_implementation": "sdpa"}, (
            f"{value}: the flash-attn package is not used; ptflow trains with PyTorch SDPA, whose own FlashAttention "
            "kernel runs on GPU (train.sdpa_backend: flash insists on it)")
    raise Unsupported("expected auto, disabled, sdpa, fa2 or fa3")


def _disable_gc(value: Any) -> tuple[dict, str | None]:
    if not isinstance(value, bool):
        raise Unsupported("expected true or false")
    return {"train.gradient_checkpointing": not value}, None


def _to(target: str) -> Callable[[Any], tuple[dict, None]]:
    return lambda value: ({target: value}, None)


EVAL_STRATEGIES = ("no", "steps", "epoch")


def _eval_strategy(value: Any) -> tuple[dict, str | None]:
    if value not in EVAL_STRATEGIES:
        raise Unsupported(f"expected one of {', '.join(EVAL_STRATEGIES)}")
    return {}, None  # turned into train.eval_steps / eval.do_eval once every key is read (see _evaluation)


RULES: dict[str, Rule] = {
    "stage": Rule("rejected", "finetuning", "ptflow runs only the pt stage (pretraining and continued pretraining); "
                  "run sft/rm/ppo/dpo/kto with LLaMA-Factory", quiet=("pt",), example="sft"),
    # mapped onto a differently named ptflow key
    "flash_attn": Rule("mapped", "model", "auto/sdpa -> sdpa, disabled -> eager; fa2/fa3 -> sdpa with a warning "
                       "(the flash-attn package is not used)", quiet=("auto",), example="fa2",
                       to=("model.attn_implementation",), apply=_flash_attn),
    "disable_gradient_checkpointing": Rule(
        "mapped", "model", "train.gradient_checkpointing = not disable_gradient_checkpointing", quiet=(False,),
        to=("train.gradient_checkpointing",), apply=_disable_gc),
    "use_liger_kernel": Rule("mapped", "training", "transformers' name for LLaMA-Factory's enable_liger_kernel",
                             quiet=(False,), to=("train.enable_liger_kernel",), apply=_to("train.enable_liger_kernel")),
    "no_cuda": Rule("mapped", "training", "transformers' deprecated name for use_cpu", quiet=(False,),
                    to=("train.use_cpu",), apply=_to("train.use_cpu")),
    "hf_hub_token": Rule("mapped", "model", "the Hub token (HF_TOKEN in the environment wins; never echoed)",
                         example="hf_x", to=("output.hub_token",), apply=_to("output.hub_token")),
    "eval_strategy": Rule("mapped", "training", "steps -> evaluate every eval_steps (default logging_steps, as "
                          "transformers does) and at the end; no -> only at the end if do_eval; epoch -> warning, "
                          "only at the end", quiet=("no",), example="steps",
                          to=("train.eval_steps", "eval.do_eval"), apply=_eval_strategy),
    "evaluation_strategy": Rule("mapped", "training", "transformers 4.x name of eval_strategy", quiet=("no",),
                                example="steps", to=("train.eval_steps", "eval.do_eval"), apply=_eval_strategy),
    # rejected unless at a value ptflow matches
    **_rejected("model", "quantized (QLoRA) training is not supported: train lora on the bf16 model "
                "(finetuning_type: lora, bf16: true)", quantization_bit=None),
    **_rejected("model", "adding tokens is not supported: save a tokenizer that has them, point "
                "model_name_or_path at it and set resize_vocab: true", add_tokens=None, add_special_tokens=None,
                new_special_tokens_config=None),
    **_rejected("model", "continuing a LoRA adapter is not supported: merge it into the base model "
                "(llamafactory-cli export) and train from the merged folder (to evaluate an adapter, point "
                "model_name_or_path at its folder with do_train: false)", adapter_name_or_path=None,
                adapter_folder=None),
    **_rejected("model", "only the Hugging Face Hub and local folders are supported: download the model and give "
                "its folder", ms_hub_token=None, om_hub_token=None),
    **_rejected("model", "RoPE scaling is not applied: set rope_scaling in the model's config.json instead",
                rope_scaling=None),
    **_rejected("model", "not supported: the model trains as its config.json defines it", shift_attn=False,
                mixture_of_depths=None, split_special_tokens=False),
    **_rejected("model", "the MoE router auxiliary loss is not added (output_router_logits stays as config.json "
                "sets it)", moe_aux_loss_coef=None),
    **_rejected("model", "FP8 training is not supported: use bf16: true", fp8=False),
    **_rejected("data", "LLaMA-Factory itself refuses it outside sft; ptflow's data.doc_mask records document "
                "boundaries in packed blocks", neat_packing=False),
    **_rejected("data", "prompt masking is for sft (LLaMA-Factory refuses it for pt too)", train_on_prompt=False,
                mask_history=False),
    **_rejected("finetuning", "OFT/LLaMA Pro/GaLore/APOLLO/BAdam/Adam-mini/Muon are not supported: use "
                "finetuning_type full, freeze or lora with AdamW", use_llama_pro=False, use_galore=False,
                use_apollo=False, use_badam=False, use_adam_mini=False, use_muon=False),
    **_rejected("finetuning", "LoRA variants are not supported: plain LoRA (lora_rank, lora_alpha, lora_dropout, "
                "lora_target) only", use_rslora=False, use_dora=False, pissa_init=False, loraplus_lr_ratio=None,
                create_new_adapter=False, additional_target=None),
    **_rejected("finetuning", "freeze trains whole decoder layers only (freeze_trainable_layers / "
                "freeze_trainable_modules); extra modules are not supported", freeze_extra_modules=None),
    **_rejected("finetuning", "alternative losses are not supported: ptflow trains plain next-token cross-entropy",
                use_dft_loss=False, use_mca=False),
    **_rejected("finetuning", "the data order is a seeded permutation per epoch (what makes O(1) resume work); "
                "an unshuffled order is not supported", disable_shuffling=False),
    **_rejected("finetuning", "early stopping is not supported: set max_steps", early_stopping_steps=None),
    **_rejected("training", "the data order is a seeded permutation per epoch; another sampler is not supported",
                train_sampling_strategy="random"),
    **_rejected("training", "fp16 mixed precision is not supported: use bf16: true (GPU), or neither for fp32",
                fp16=False),
    **_rejected("training", "no DeepSpeed: multi-GPU training is torchrun DDP, one process per GPU "
                "(train.num_processes, default every visible GPU); for ZeRO-3-like sharding set train.fsdp: true",
                deepspeed=None),
    **_ignored("training", "train.fsdp wraps each decoder layer (FSDP2); fsdp_config is not read",
               fsdp_config=None),
    **_rejected("training", "ptflow trains with torch AdamW (fused where available): adamw_torch, "
                "adamw_torch_fused and adamw_hf are accepted, other optimizers are not",
                optim=("adamw_torch", "adamw_torch_fused", "adamw_hf")),
    **_rejected("training", "optimizer and scheduler arguments are fixed: warmup_stable_decay decays over the last "
                "10% of steps, cosine_with_min_lr ends at 0.1 x learning_rate", lr_scheduler_kwargs=(None, {}, {"min_lr_rate": 0.1}),
                optim_args=None, adafactor=False),
    **_rejected("training", "the final model is the last step's: load_best_model_at_end is not supported",
                load_best_model_at_end=False),
    **_rejected("training", "not supported: ptflow trains plain next-token cross-entropy",
                label_smoothing_factor=0.0, neftune_noise_alpha=None),
    **_rejected("training", "the batch size is what you set: auto_find_batch_size is not supported",
                auto_find_batch_size=False),
    **_rejected("training", "pt does not generate (LLaMA-Factory refuses it outside sft too)",
                predict_with_generate=False),
    # ignored with a warning
    **_ignored("data", "pt trains on raw text + EOS without a chat template (LLaMA-Factory uses it in pt only to "
               "pick llama3's <|end_of_text|> as EOS; ptflow uses the tokenizer's eos_token)", template=None),
    **_ignored("data", "the content-addressed store re-tokenizes exactly when the data files, tokenizer or data "
               "config change; orchestration.force: [prepare_dataset] forces it", overwrite_cache=False,
               tokenized_path=None),
    **_ignored("data", "a stream shuffles whole shards per pass (data.shuffle_shards, so a resume seeks without "
               "replay), not examples in a buffer", buffer_size=16384),
    **_ignored("data", "one eval_loss over all held-out blocks is reported", eval_on_each_dataset=False),
    **_ignored("data", "sft/multimodal settings, unused by pt", media_dir=None, image_dir=None, tool_format=None,
               eval_num_beams=None, ignore_pad_token_for_loss=True, default_system=None, enable_thinking=True),
    **_ignored("model", "set HF_HOME or HF_HUB_CACHE to move the Hugging Face cache", cache_dir=None),
    **_ignored("model", "a speed setting ptflow does not use (its own: train.torch_compile, enable_liger_kernel); "
               "results do not depend on it", use_unsloth=False, use_unsloth_gc=False, low_cpu_mem_usage=True,
               use_v1_kernels=False),
    **_ignored("model", "ptflow always uses non-reentrant activation checkpointing", use_reentrant_gc=False),
    **_ignored("model", "bf16 autocast keeps fp32 weights (norms included), and transformers computes the loss in "
               "fp32",
               upcast_layernorm=False, upcast_lmhead_output=False),
    **_ignored("model", "only with quantization_bit, which is not supported",
               quantization_method="bnb", quantization_type="nf4", double_quantization=True,
               quantization_device_map=None),
    **_ignored("model", "only with fp8, which is not supported", fp8_backend="auto",
               fp8_enable_fsdp_float8_all_gather=False),
    **_ignored("model", "only when adding tokens, which is not supported", init_special_tokens="noise_init"),
    **_ignored("model", "ptflow logs the trainable and total parameter counts", print_param_status=False),
    **_ignored("model", "inference settings (llamafactory-cli chat/api), unused by training",
               infer_backend="huggingface", infer_dtype="auto", use_kv_cache=True, offload_folder="offload",
               use_kt=False),
    **_ignored("finetuning", "used only by other stages (rm/ppo/dpo/kto)", ref_model=None, ref_model_adapters=None,
               ref_model_quantization_bit=None, reward_model=None, reward_model_adapters=None,
               reward_model_quantization_bit=None, reward_model_type="lora", ld_alpha=None, simpo_gamma=0.5),
    **_ignored("finetuning", "multimodal settings; ptflow trains text-only models", freeze_vision_tower=True,
               freeze_multi_modal_projector=True, freeze_language_model=False, train_mm_proj_only=False),
    **_ignored("finetuning", "eval reports eval_loss and perplexity only", compute_accuracy=False),
    **_ignored("finetuning", "tokens/s per device, MFU and total tokens are always logged",
               include_effective_tokens_per_second=False),
    **_ignored("training", "ptflow resumes only checkpoints of this exact config (their fingerprint is checked) "
               "and replaces the output files of each run; set resume_from_checkpoint: false to start over",
               overwrite_output_dir=False),
    **_ignored("training", "metrics go to the Prefect UI and trainer_log.jsonl; no tracker integrations",
               report_to=(None, "none", [], ["none"]), project="huggingface", use_swanlab=False, logging_dir=None,
               ray_run_name=None),
    **_ignored("training", "ptflow's multi-GPU runs are torchrun DDP with PyTorch's defaults; there is no timeout "
               "or DDP tuning knob", ddp_timeout=1800, ddp_backend=None, ddp_find_unused_parameters=None,
               ddp_bucket_cap_mb=None, ddp_broadcast_buffers=None, ddp_static_graph=None, local_rank=-1),
    **_ignored("training", "checkpoints always hold the optimizer, scheduler and data cursor (a re-run resumes from "
               "them); the output folder holds the final model only", save_only_model=False),
    **_ignored("training", "checkpoints are written every save_steps (they are what a re-run resumes from); raise "
               "save_steps to write fewer", save_strategy="steps"),
    **_ignored("training", "ptflow logs every logging_steps", logging_strategy="steps", logging_first_step=False,
               logging_nan_inf_filter=True, log_level="passive", log_level_replica="warning",
               log_on_each_node=True, disable_tqdm=None),
    **_ignored("training", "ptflow's data loader reads memory-mapped blocks with a prefetch thread (no worker "
               "processes) and always drops an epoch's incomplete last batch", dataloader_num_workers=0,
               dataloader_pin_memory=True, dataloader_persistent_workers=False, dataloader_prefetch_factor=None,
               dataloader_drop_last=True, remove_unused_columns=True, group_by_length=False,
               length_column_name="length", label_names=None),
    **_ignored("training", "the data order comes from seed (resume seeks it in O(1), no batches are skipped)",
               data_seed=None, ignore_data_skip=False, full_determinism=False),
    **_ignored("training", "precision is train.bf16 / train.pure_bf16 (evaluation follows it); TF32 stays at PyTorch's "
               "default",
               tf32=None, bf16_full_eval=False, fp16_full_eval=False, half_precision_backend="auto"),
    **_ignored("training", "ptflow compiles with the inductor backend (train.compile_scope chooses what)",
               torch_compile_backend=None, torch_compile_mode=None),
    **_ignored("training", "use gradient_checkpointing (ptflow checkpoints every decoder layer, non-reentrant)",
               gradient_checkpointing_kwargs=None, activation_checkpointing=None,
               activation_checkpointing_kwargs=None),
    **_ignored("training", "input tokens, tokens/s and total tokens are always logged",
               include_num_input_tokens_seen=("no", False), include_tokens_per_second=False),
    **_ignored("training", "evaluation computes the mean loss over all held-out blocks at once",
               eval_accumulation_steps=None, eval_delay=0, eval_on_start=False, prediction_loss_only=False,
               eval_do_concat_batches=True, batch_eval_metrics=False, eval_use_gather_object=False,
               include_for_metrics=(None, []), include_inputs_for_metrics=False, metric_for_best_model=None,
               greater_is_better=None),
    **_ignored("training", "the output folder is pushed once after the run (no checkpoints), to hub_model_id",
               hub_strategy="every_save", hub_always_push=False, hub_revision=None),
    **_ignored("training", "no predict step in pt", do_predict=False, sortish_sampler=False,
               generation_max_length=None, generation_num_beams=None, generation_config=None),
    **_ignored("training", "settings ptflow's training loop has no use for", save_safetensors=True,
               save_on_each_node=False, skip_memory_metrics=True, past_index=-1, debug=("", []),
               restore_callback_states_from_checkpoint=False, torch_empty_cache_steps=None, use_cache=False,
               average_tokens_across_devices=True, accelerator_config=None, parallelism_config=None,
               optim_target_modules=None, liger_kernel_config=None, enable_jit_checkpoint=False,
               jit_mode_eval=False, use_ipex=False, tpu_num_cores=None, dataloader_multiprocessing_context=None,
               dataloader_in_order=True),
    **_ignored("generation", "generation settings (chat/predict); pt does not generate", do_sample=True,
               temperature=0.95, top_p=0.7, top_k=50, num_beams=1, max_length=1024, max_new_tokens=1024,
               repetition_penalty=1.0, length_penalty=1.0, skip_special_tokens=True),
}

PREFIXES: dict[str, Rule] = {
    **_ignored("model", "inference/export settings (llamafactory-cli chat/api/export), unused by training",
               vllm_=None, sglang_=None, kt_=None, export_=None),
    **_ignored("model", "multimodal processor settings; ptflow trains text-only models", image_=None, video_=None,
               audio_=None),
    **_ignored("finetuning", "settings of methods or stages ptflow does not run (their switches are rejected)",
               oft_=None, galore_=None, apollo_=None, badam_=None, pissa_=None, loraplus_=None, pref_=None, dpo_=None,
               kto_=None, ppo_=None),
    **_ignored("training", "metrics go to the Prefect UI and trainer_log.jsonl; no tracker integrations",
               swanlab_=None, trackio_=None, ray_=None),
    **_ignored("training", "FSDP tuning settings are not read: train.fsdp wraps each decoder layer (FSDP2) with "
               "PyTorch's defaults", fsdp_=None),
}
"""Families of keys (name prefix) ignored with one reason; their switch (use_galore, fsdp, ...) is in RULES."""

SAME_NAMES: dict[str, tuple[str, ...]] = {
    "model": ("model_name_or_path", "model_revision", "trust_remote_code", "use_fast_tokenizer", "resize_vocab",
              "train_from_scratch", "enable_liger_kernel"),
    "data": ("dataset", "eval_dataset", "dataset_dir", "cutoff_len", "val_size", "max_samples", "mix_strategy",
             "interleave_probs", "packing", "streaming", "preprocessing_num_workers", "preprocessing_batch_size"),
    "finetuning": ("finetuning_type", "pure_bf16", "freeze_trainable_layers", "freeze_trainable_modules", "lora_rank",
                   "lora_alpha", "lora_dropout", "lora_target", "plot_loss"),
    "training": ("output_dir", "run_name", "seed", "do_train", "do_eval", "fsdp", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
                 "lr_scheduler_type", "warmup_ratio", "warmup_steps", "logging_steps", "save_steps", "save_total_limit",
                 "eval_steps", "use_cpu", "bf16", "torch_compile", "gradient_checkpointing", "resume_from_checkpoint",
                 "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo"),
}
"""LLaMA-Factory keys ptflow's schema has by the same name (routed dynamically; listed for the docs)."""

DIFFERENCES: dict[str, str] = {
    "fsdp": "transformers' option strings are read: full_shard, shard_grad_op or hybrid_shard (with auto_wrap) all "
            "mean FSDP2 full sharding, one unit per decoder layer; offload is not done; no_shard or empty is DDP",
    "cutoff_len": "blocks hold exactly cutoff_len tokens; LLaMA-Factory cuts cutoff_len - 1 when packing: true is "
                  "set explicitly, and overwrites each block's first token with BOS for tokenizers that add one",
    "packing": "true (pt's default in both): text + EOS concatenated and cut into blocks, the EOS is trained on, and "
               "only the corpus' final partial block is dropped (LLaMA-Factory drops the remainder of every "
               "preprocessing batch); false: each document truncated to cutoff_len",
    "streaming": "true tokenizes and packs while training, shards in a seeded order per pass (LLaMA-Factory "
                 "shuffles examples in a buffer_size buffer), and resumes from the checkpoint's data cursor without "
                 "re-reading; max_samples needs shuffle_shards: false; false (default) tokenizes each file once "
                 "into the shard cache",
    "preprocessing_batch_size": "documents per tokenizer call only: no remainder is dropped per batch, so the blocks "
                                "do not depend on it",
    "preprocessing_num_workers": "default every core (LLaMA-Factory: one process); ptflow's blocks do not depend on "
                                 "it, LLaMA-Factory's do (each worker's share of the documents drops its own "
                                 "remainder), so with several LLaMA-Factory workers block boundaries differ and ptflow "
                                 "makes a few more blocks",
    "val_size": "held-out documents split off before packing, as LLaMA-Factory does, but chosen by a hash of each "
                "document's text instead of a seeded draw, so the split is stable as the corpus grows (no earlier "
                "eval document is ever trained on); a count N holds out the N documents of smallest hash; with "
                "streaming: true, a count of the first blocks in file order",
    "finetuning_type": "LLaMA-Factory's default lora is applied when absent (ptflow's own default is full); oft is "
                       "not supported",
    "plot_loss": "LLaMA-Factory's default false is applied when absent (ptflow's own: true); also writes "
                 "training_lr.png and training_throughput.png",
    "do_train": "transformers' default false is applied when absent (ptflow's own: true): add do_train: true",
    "do_eval": "absent: true when eval_strategy is steps or epoch, else false, as in transformers (ptflow's own "
               "default: true); writes eval_results.json with eval_loss and perplexity",
    "eval_steps": "used only with eval_strategy: steps, as in transformers (then default logging_steps)",
    "logging_steps": "transformers' default 500 is applied when absent (ptflow's own: 10)",
    "lr_scheduler_type": "transformers' default linear is applied when absent (ptflow's own: cosine); "
                         "reduce_lr_on_plateau and the *_with_min_lr variants other than cosine_with_min_lr are "
                         "not supported",
    "gradient_checkpointing": "LLaMA-Factory turns it on unless disable_gradient_checkpointing: true, and that is "
                              "applied when both are absent (ptflow's own default: off); here gradient_checkpointing: "
                              "false turns it off, which LLaMA-Factory ignores",
    "num_train_epochs": "an epoch is the whole optimizer steps that fit in the training blocks: the incomplete last "
                        "batch is dropped (transformers runs it)",
    "warmup_steps": "a float below 1 (transformers 5: a fraction of the steps) is read as warmup_ratio",
    "output_dir": "gets hard links to the stored results (model, logs, plots, card, checkpoint-<step>/); absent: "
                  "<store>/runs/<run_name> (transformers: ./trainer_output)",
    "run_name": "also names the store's run folder and lineage; absent: derived from output_dir (transformers' "
                "run_name defaults to output_dir)",
    "resume_from_checkpoint": "absent or null: auto, resume from the newest valid checkpoint of this exact config "
                              "(LLaMA-Factory: the last checkpoint in output_dir unless overwrite_output_dir)",
    "push_to_hub": "one commit after the run with the output folder but no checkpoints (transformers pushes at every "
                   "save)",
    "hub_token": "HF_TOKEN in the environment wins over it; never echoed or saved",
    "use_cpu": "trains and evaluates on the CPU even on a GPU host, in one process, as in transformers; it is not part "
               "of the cache key (where a stage runs never is), so a model already trained on a GPU for the same "
               "config is reused, not retrained on the CPU",
    "bf16": "refused on a CUDA GPU without native bf16 (before Ampere), as transformers refuses it; on the CPU it "
            "is PyTorch's CPU bf16 autocast with fp32 master weights (slow without AMX/AVX512-BF16), also without "
            "use_cpu on a machine with no GPU, where transformers refuses and asks for use_cpu; the evaluate stage "
            "runs in fp32 on the CPU",
    "torch_compile": "compiles each decoder layer by default (train.compile_scope) and combines with "
                     "enable_liger_kernel, which LLaMA-Factory cannot",
}
"""Same-named keys whose behaviour differs from LLaMA-Factory's in a way a user should know."""


@dataclass(frozen=True)
class Default:
    """A key whose LLaMA-Factory default differs from ptflow's, applied when an LF file leaves it out."""

    target: str  # ptflow key
    value: Any
    why: str


LF_DEFAULTS: dict[str, Default] = {
    "finetuning_type": Default("train.finetuning_type", "lora", "LLaMA-Factory's default; ptflow's own is full"),
    "disable_gradient_checkpointing": Default(
        "train.gradient_checkpointing", True, "LLaMA-Factory checkpoints activations unless "
        "disable_gradient_checkpointing: true; ptflow's own default is off"),
    "logging_steps": Default("train.logging_steps", 500, "transformers' default; ptflow's own is 10"),
    "lr_scheduler_type": Default("train.lr_scheduler_type", "linear", "transformers' default; ptflow's own is cosine"),
    "plot_loss": Default("output.plot_loss", False, "LLaMA-Factory's default: no training_loss.png; ptflow's own is "
                         "true"),
    "do_train": Default("train.do_train", False, "transformers' default: LLaMA-Factory would not train; add "
                        "do_train: true"),
    "do_eval": Default("eval.do_eval", False, "transformers' default without eval_strategy; ptflow's own is true"),
}
"""LLaMA-Factory (or transformers) defaults that differ from ptflow's, verified against their sources:
finetuning_args.py (finetuning_type lora, plot_loss false), model_utils/checkpointing.py (activation
checkpointing unless disable_gradient_checkpointing), TrainingArguments (logging_steps 500,
lr_scheduler_type linear, do_train/do_eval false, do_eval true when eval_strategy is not no)."""


# -- conversion ------------------------------------------------------------------------------------------------

@dataclass
class Note:
    key: str
    line: int | None
    kind: str  # "mapped" | "default" | "differs" | "warning"
    text: str

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.key}{where}: {self.text}"


@dataclass
class Conversion:
    """A flat LLaMA-Factory config mapped onto ptflow's sections."""

    raw: dict
    notes: list[Note] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # ptflow key -> the LF key it came from
    lines: dict[str, int] = field(default_factory=dict)  # LF key -> line in the file
    defaulted: dict[str, str] = field(default_factory=dict)  # ptflow key set for an absent LF key -> why


def owners() -> dict[str, str]:
    """Every key of ptflow's schema -> its dotted path (`learning_rate` -> `train.learning_rate`), from the fields."""
    out = {name: name for name in TOP_LEVEL}
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            out[name] = f"{section}.{name}"
    return out


def rule_for(key: str) -> Rule | None:
    if key in RULES:
        return RULES[key]
    return next((rule for prefix, rule in PREFIXES.items() if key.startswith(prefix)), None)


def is_llamafactory(raw: dict) -> bool:
    """A `stage` key, or flat keys with no ptflow section mapping, mark an LLaMA-Factory-style file."""
    if "stage" in raw:
        return True
    if any(key in SECTIONS and isinstance(value, dict) for key, value in raw.items()):
        return False
    return any(key not in TOP_LEVEL for key in raw)


def _nullable(target: str) -> bool:
    section, _, name = target.rpartition(".")
    info = (SECTIONS[section].model_fields if section else RunConfig.model_fields)[name]
    return info.annotation is type(None) or type(None) in typing.get_args(info.annotation)


def _secret(target: str) -> bool:
    return is_secret(target.rpartition(".")[2])


class _Builder:
    def __init__(self, lines: dict[str, int]):
        self.out = Conversion(raw={}, lines=lines)
        self.values: dict[str, Any] = {}

    def line(self, key: str) -> int | None:
        return self.out.lines.get(key)

    def where(self, key: str) -> str:
        line = self.line(key)
        return f"{key} (line {line})" if line else key

    def note(self, key: str, kind: str, text: str) -> None:
        self.out.notes.append(Note(key, self.line(key), kind, text))

    def problem(self, key: str, text: str) -> None:
        self.out.problems.append(f"{self.where(key)}: {text}")

    def put(self, target: str, value: Any, source: str) -> None:
        if target in self.values and self.values[target] != value:
            shown = ("<hidden>", "<hidden>") if _secret(target) else (repr(self.values[target]), repr(value))
            first = self.out.origin[target]
            self.problem(source, f"sets {target} to {shown[1]}, but {self.where(first)} sets it to {shown[0]}; "
                         "keep one of them")
            return
        self.values[target] = value
        self.out.origin[target] = source
        section, _, name = target.rpartition(".")
        (self.out.raw.setdefault(section, {}) if section else self.out.raw)[name] = value


def convert(flat: dict, root: yaml.Node | None = None) -> Conversion:
    """Map a flat LLaMA-Factory config onto ptflow's sections; every key gets a note or a problem."""
    lines = {}
    if isinstance(root, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}
    b = _Builder(lines)
    names = owners()
    for key, value in flat.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):  # a ptflow section inside an LF file: taken as it is
            for name, item in value.items():
                b.put(f"{key}.{name}", item, key)
            b.note(key, "mapped", f"ptflow section, {len(value)} key(s) taken as they are")
            continue
        if key in names:
            _same_name(b, key, value, names[key])
        elif rule_for(key):
            _apply_rule(b, key, value, rule_for(key))
        else:
            close = difflib.get_close_matches(key, [*names, *RULES, *SECTIONS], n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            b.problem(key, f"unknown key: not a LLaMA-Factory pt key, nor a ptflow key. {hint}"
                      "See docs/llamafactory.md for every key ptflow reads")
    _evaluation(b, flat)
    _absent_defaults(b, flat)
    _names(b, flat)
    return b.out


def _same_name(b: _Builder, key: str, value: Any, target: str) -> None:
    if key == "eval_steps":
        return  # meaningful only with eval_strategy: steps (see _evaluation)
    if key == "finetuning_type" and value == "oft":
        b.problem(key, "'oft' is not supported: use lora (or full, freeze)")
        return
    if key == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
        b.put("train.warmup_ratio", value, key)
        b.note(key, "mapped", f"{value} is a fraction of the steps (transformers 5) -> train.warmup_ratio")
        return
    if value is None and not _nullable(target):
        b.note(key, "mapped", f"null -> ptflow's default for {target}")
        return
    b.put(target, value, key)
    b.note(key, "mapped", f"-> {target}")
    if key in DIFFERENCES and key not in LF_DEFAULTS and key != "do_eval":  # those differ only when absent
        b.note(key, "differs", DIFFERENCES[key])


def _apply_rule(b: _Builder, key: str, value: Any, rule: Rule) -> None:
    if rule.action == "mapped":
        try:
            updates, warning = rule.apply(value)
        except Unsupported as exc:
            shown = "<hidden>" if is_secret(key) else repr(value)
            b.problem(key, f"got {shown}; {exc}")
            return
        for target, mapped in updates.items():
            b.put(target, mapped, key)
        if updates:  # eval_strategy maps once every key is read (_evaluation)
            b.note(key, "mapped", "-> " + ", ".join(f"{t} = {'<hidden>' if _secret(t) else repr(v)}"
                                                    for t, v in updates.items()))
        if warning:
            b.note(key, "warning", warning)
        return
    if value in rule.quiet:
        b.note(key, "mapped", f"{'<hidden>' if is_secret(key) else _show(value)}: nothing to do")
        return
    if rule.action == "ignored":
        b.note(key, "warning", f"ignored: {rule.why}")
    else:
        b.problem(key, f"got {'<hidden>' if is_secret(key) else _show(value)}; {rule.why}")


def _evaluation(b: _Builder, flat: dict) -> None:
    """eval_strategy / eval_steps / do_eval as transformers reads them."""
    key = "eval_strategy" if "eval_strategy" in flat else "evaluation_strategy"
    strategy = flat.get(key, "no")
    if "evaluation_strategy" in flat and flat.get("evaluation_strategy") != strategy:
        b.problem("evaluation_strategy", f"is {flat['evaluation_strategy']!r} but eval_strategy is {strategy!r}; "
                  "keep eval_strategy (evaluation_strategy is its transformers 4.x name)")
    if flat.get("do_eval") is True and not flat.get("val_size") and not flat.get("eval_dataset"):
        b.problem("do_eval", "true needs held-out data: set val_size (e.g. 0.05) or eval_dataset (LLaMA-Factory "
                  "refuses it too)")
    if strategy not in EVAL_STRATEGIES:
        return  # reported by the rule
    if strategy == "steps":
        steps = flat.get("eval_steps") or flat.get("logging_steps") or LF_DEFAULTS["logging_steps"].value
        b.put("train.eval_steps", steps, "eval_steps" if flat.get("eval_steps") else key)
        b.note(key, "mapped", f"steps -> train.eval_steps = {steps}"
               + ("" if flat.get("eval_steps") else " (eval_steps absent: logging_steps, as transformers does)"))
    elif strategy == "no" and key in flat:
        b.note(key, "mapped", "no -> no evaluation during training (train.eval_steps unset)")
    elif strategy == "epoch":
        b.note(key, "warning", "epoch: ptflow evaluates every eval_steps, not per epoch; evaluating at the end only "
               "(use eval_strategy: steps with eval_steps)")
    elif "eval_steps" in flat:
        b.note("eval_steps", "warning", "ignored: used only with eval_strategy: steps (LLaMA-Factory would not "
               "evaluate during training either); add eval_strategy: steps")
    if "do_eval" not in flat:
        do_eval = strategy != "no"
        b.put("eval.do_eval", do_eval, "do_eval")
        b.out.defaulted["eval.do_eval"] = "transformers' default (true exactly when eval_strategy is not no)"
        b.note("do_eval", "default", f"absent -> eval.do_eval = {do_eval} (transformers: true exactly when "
               "eval_strategy is not no; ptflow's own default is true)")


def _absent_defaults(b: _Builder, flat: dict) -> None:
    for key, default in LF_DEFAULTS.items():
        if key in flat or key == "do_eval":
            continue
        if key == "disable_gradient_checkpointing" and "gradient_checkpointing" in flat:
            continue
        if key == "finetuning_type" and flat.get("train_from_scratch"):
            b.problem(key, "absent, so LLaMA-Factory's default lora applies, but train_from_scratch: true needs "
                      "full training (adapters on a frozen random model); add finetuning_type: full")
            continue
        b.put(default.target, default.value, key)
        b.out.defaulted[default.target] = default.why
        b.note(key, "default", f"absent -> {default.target} = {default.value!r} ({default.why})")
    if "stage" not in flat:
        b.note("stage", "default", "absent (LLaMA-Factory's default is sft); this file is run as pt")
    if b.values.get("train.do_train") is False and b.values.get("eval.do_eval") is False:
        b.problem("do_train", "do_train and do_eval are both false (absent keys take transformers' default, false): "
                  "nothing would run; add do_train: true")


def _names(b: _Builder, flat: dict) -> None:
    output_dir = flat.get("output_dir")
    if "output_dir" not in flat:
        b.note("output_dir", "default", "absent -> <store>/runs/<run_name> (transformers would use ./trainer_output)")
    if "run_name" not in flat and isinstance(output_dir, str):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", output_dir.strip()).strip("-._")
        if name:
            b.put("run_name", name, "run_name")
            b.out.defaulted["run_name"] = "derived from output_dir, as transformers' run_name"
            b.note("run_name", "default", f"absent -> {name!r}, from output_dir (transformers' run_name defaults to "
                   "output_dir); it names the store's run folder and lineage")


# -- loading (config.load_config hands LLaMA-Factory files here) ------------------------------------------------

def load(raw: dict, source: str, root: yaml.Node | None, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Validate an LLaMA-Factory file as a RunConfig. Overrides: `key=value` in LLaMA-Factory's names (as
    `llamafactory-cli train lf.yaml key=value`) apply before the mapping, `section.key=value` after it."""
    flat_overrides = [o for o in overrides if "." not in o.partition("=")[0]]
    dotted = [o for o in overrides if o not in flat_overrides]
    problems = []
    for item in flat_overrides:
        if item.partition("=")[0].strip() == "hf_hub_token":
            problems.append("override hf_hub_token: a token on the command line shows up in the process list and "
                            "shell history; export HF_TOKEN instead (or set it in the config file)")
    problems += apply_overrides(raw, [o for o in flat_overrides if o.partition("=")[0].strip() != "hf_hub_token"])
    result = convert(raw, root)
    problems += result.problems
    problems += apply_overrides(result.raw, dotted)
    _log(result, source)
    try:
        return validate_config(result.raw, source, None, problems)
    except ConfigError as exc:
        raise ConfigError(source, [_relabel(p, result) for p in exc.problems]) from None


_PROBLEM = re.compile(r"^(?:(?:\(top level\)|[a-z]+): (?=[a-z]+\.\w+: ))?(?P<key>[A-Za-z_][\w.]*): ")


def _relabel(problem: str, result: Conversion) -> str:
    """`train.learning_rate: got ...` -> `learning_rate (line 7) -> train.learning_rate: got ...`; a cross-key
    check's `data: data.streaming: ...` is named by the key it quotes."""
    match = _PROBLEM.match(problem)
    source = result.origin.get(match.group("key")) if match else None
    if not source:
        return problem
    line = result.lines.get(source)
    where = f"{source} (line {line})" if line else f"{source} (absent: LLaMA-Factory's default)"
    return f"{where} -> {match.group('key')}: {problem[match.end():]}"


def _log(result: Conversion, source: str) -> None:
    mapped = sum(n.kind == "mapped" for n in result.notes)
    log.info("%s: LLaMA-Factory pt config, %d key(s) mapped onto ptflow's sections (ptflow convert-lf %s shows "
             "the equivalent ptflow YAML)", source, mapped, source)
    for note in result.notes:
        if note.kind in ("default", "warning"):
            log.warning("%s: %s", source, note)


def describe(result: Conversion, source: str) -> str:
    """The notes as the CLI prints them: what each key became, defaults applied, differences, warnings."""
    out = [f"{source}: LLaMA-Factory pt config, mapped onto ptflow's sections "
           f"(`ptflow convert-lf {source}` writes the equivalent ptflow YAML):"]
    for kind in ("mapped", "default", "differs", "warning"):
        out += [f"  {kind:<8} {note}" for note in result.notes if note.kind == kind]
    return "\n".join(out)


def read(path: str) -> tuple[Conversion | None, dict, yaml.Node | None]:
    """(conversion or None if the file is ptflow-style, raw mapping, YAML node tree); YAML errors raise ConfigError."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    try:
        raw, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), [f"YAML syntax error at {where}: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(raw, dict) or not is_llamafactory(raw):
        return None, raw if isinstance(raw, dict) else {}, root
    return convert(dict(raw), root), raw, root


# -- ptflow convert-lf ---------------------------------------------------------------------------------------------

def to_ptflow_yaml(result: Conversion, source: str) -> str:
    """The conversion as a ptflow YAML: each key commented with the LLaMA-Factory key it came from."""
    header = [f"# ptflow config converted from the LLaMA-Factory file {source} by `ptflow convert-lf`.",
              "# Each key says which LLaMA-Factory key it came from; `default` marks LLaMA-Factory's default for a "
              "key the file left out."]
    warnings = [n for n in result.notes if n.kind == "warning"]
    if warnings:
        header.append("# Warnings (keys not carried over, or carried over with a change):")
        header += [f"#   - {n}" for n in warnings]
    body = []
    for key, value in result.raw.items():
        if not isinstance(value, dict):
            body.append(_line(key, value, result))
    for section in SECTIONS:
        items = result.raw.get(section)
        if not items:
            continue
        body.append(f"{section}:")
        for name, value in items.items():
            body.append("  " + _line(f"{section}.{name}", value, result))
    return "\n".join(header + [""] + body) + "\n"


def _line(target: str, value: Any, result: Conversion) -> str:
    name, source = target.rpartition(".")[2], result.origin.get(target)
    if name in SECRET_KEYS:
        return f"# {name}: omitted (a secret): export HF_TOKEN instead"
    if target in result.defaulted:
        comment = f"  # absent from the LLaMA-Factory file: {result.defaulted[target]}"
    elif source in (None, name):
        comment = ""
    else:
        comment = f"  # from {source}"
    return f"{name}: {_show(value)}{comment}"


# -- the reference table (docs/llamafactory.md) --------------------------------------------------------------------

STATUSES = ("supported", "supported, differs", "mapped", "ignored", "rejected")


def known_keys() -> dict[str, str]:
    """Every LLaMA-Factory key this module knows -> its group (prefix families as `prefix*`)."""
    keys = {name: group for group, names in SAME_NAMES.items() for name in names}
    keys.update({name: rule.group for name, rule in RULES.items()})
    keys.update({f"{prefix}*": rule.group for prefix, rule in PREFIXES.items()})
    return keys


def status(key: str) -> tuple[str, str, str]:
    """(status, ptflow key or '', explanation) of an LLaMA-Factory key. The schema wins over RULES, so a key
    ptflow gains (say `streaming`) becomes supported without touching the rule."""
    names = owners()
    if key in names:
        note = DIFFERENCES.get(key, "")
        return ("supported, differs" if note else "supported"), names[key], note
    rule = RULES.get(key) or PREFIXES.get(key.rstrip("*"))
    if rule is None:
        raise KeyError(key)
    target = ", ".join(rule.to)
    why = rule.why
    if rule.action != "mapped" and rule.quiet != (None,):
        shown = " / ".join(_show(q) for q in rule.quiet)
        why += f" (accepted as: {shown})" if rule.action == "rejected" else f" (no warning for: {shown})"
    return rule.action, target, why


def _show(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, allow_unicode=True).strip()[1:-1]


def reference_table() -> str:
    """Markdown: one row per LLaMA-Factory key, grouped by its argument class; then ptflow's own keys."""
    rows = ["| LLaMA-Factory key | group | status | ptflow | notes |", "|---|---|---|---|---|"]
    keys = known_keys()
    for group in GROUPS:
        for key in sorted(k for k, g in keys.items() if g == group):
            state, target, why = status(key)
            cell = why.replace("|", "\\|")
            rows.append(f"| `{key}` | {group} | {state} | {f'`{target}`' if target else ''} | {cell} |")
    names = owners()
    extra = sorted(set(names) - set(keys))
    rows += ["", "ptflow's own keys (no LLaMA-Factory counterpart), accepted flat in a LLaMA-Factory file too: "
             + ", ".join(f"`{k}` (`{names[k]}`)" if names[k] != k else f"`{k}`" for k in extra) + "."]
    return "\n".join(rows)


def convert_file(source: str) -> tuple[str, Conversion]:
    """`ptflow convert-lf`: the ptflow YAML of an LLaMA-Factory file, after checking it as `ptflow run` would."""
    from pathlib import Path

    if not Path(source).is_file():
        raise ConfigError(source, [f"config file not found (looked in {Path(source).resolve().parent})"])
    result, raw, root = read(source)
    if result is None:
        raise ConfigError(source, ["already a ptflow config (it has sections and no `stage` key): nothing to convert"])
    load(dict(raw), source, root, [])  # every problem at once, as `ptflow run` reports them
    return to_ptflow_yaml(result, source), result


def explain_file(path: str, overrides: list[str] | tuple[str, ...] = ()) -> str | None:
    """For the CLI: what each key of an LLaMA-Factory file became (None for a ptflow file or a missing one).
    It silences this module's log for the process: the CLI prints the notes instead (a flow still logs them)."""
    from pathlib import Path

    if not Path(path).is_file():
        return None  # load_config reports it
    result, raw, root = read(path)
    if result is None:
        return None
    flat = [o for o in overrides if "." not in o.partition("=")[0] and not o.startswith("hf_hub_token=")]
    apply_overrides(raw, flat)
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())  # no second copy through logging's last-resort handler
    return describe(convert(raw, root), path)
