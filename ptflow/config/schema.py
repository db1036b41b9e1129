"""The run config: one YAML file, one typed section per stage, every problem reported at once.

Keys follow LLaMA-Factory's `pt` names where they exist (`model_name_or_path`, `cutoff_len`,
`learning_rate`, ...), grouped by the stage that reads them. `load_config(path, overrides)`
parses the file, applies dotted `section.key=value` overrides, and raises one `ConfigError`
listing every problem with its key path, line, value and the expected form (ptflow/config/loading.py).
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ptflow.errors import ConfigError

MAX_EPOCHS = 10_000  # bounds on what a run may ask for: 1e300 epochs would write checkpoints until the disk fills
MAX_STEPS = 1_000_000_000
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_RUN_NAME = 128  # run_name names files and folders (<run_name>.jsonl); file names stop at 255 bytes
QUOTE = reprlib.Repr()  # a bounded echo of a bad value (an alias bomb expands exponentially)
QUOTE.maxlevel, QUOTE.maxlist, QUOTE.maxdict, QUOTE.maxstring, QUOTE.maxother = 2, 6, 6, 80, 80


def _comma_list(value: Any) -> Any:
    """`a, b` -> ["a", "b"], as LLaMA-Factory writes lists of names; anything else is left to the type check."""
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return value


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    # inf/nan are never meaningful settings (an infinite epoch count trains forever); refuse them up front
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    def digest_fields(self) -> dict[str, Any]:
        """The fields that change this section's outputs (used in cache keys)."""
        return self.model_dump(mode="json")


class ModelSection(Section):
    """Which model and tokenizer to start from. Read by `load_tokenizer` and `train`."""

    model_name_or_path: str = Field(
        description="Local directory with config.json and tokenizer files, or a Hub repo id "
        "(resolved through the local Hugging Face cache; set HF_HUB_OFFLINE=1 to forbid downloads)."
    )
    model_revision: str = Field("main", description="Hub revision (branch, tag or commit) for a hub id.")
    train_from_scratch: bool = Field(
        False, description="Build the model from its config.json with random weights instead of loading weights."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model/tokenizer code from the model repo to run. Off unless you trust it."
    )
    use_fast_tokenizer: bool = Field(True, description="Use the Rust (fast) tokenizer.")
    resize_vocab: bool = Field(
        False, description="Resize the embeddings when the tokenizer is larger than the model's vocabulary."
    )
    attn_implementation: Literal["sdpa", "flex_attention", "eager"] = Field(
        "sdpa", description="Attention kernel: PyTorch scaled_dot_product_attention, flex_attention (compiled "
        "block-sparse kernel: fast document masking with data.doc_mask; training needs a CUDA GPU) or the eager "
        "reference."
    )

    def tokenizer_fields(self) -> dict[str, Any]:
        return {"model_revision": self.model_revision, "use_fast_tokenizer": self.use_fast_tokenizer,
                "trust_remote_code": self.trust_remote_code}


class DataSection(Section):
    """Which corpus to tokenize and how to pack it. Read by `prepare_dataset`."""

    dataset: list[str] = Field(
        description="Dataset names registered in `dataset_dir`/dataset_info.json (a list or a comma-separated string)."
    )
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and the data files.")
    eval_dataset: list[str] | None = Field(
        None, description="Datasets (names in dataset_info.json, a list or comma-separated) packed into the held-out "
        "blocks, instead of splitting val_size off the training blocks."
    )
    cutoff_len: int = Field(2048, ge=2, le=1_048_576, description="Tokens per packed training block (sequence length).")
    val_size: float = Field(
        0.0, ge=0, description="Held-out documents for evaluation (chosen by a hash of their text, before packing): a "
        "fraction in (0, 1) or an integer count (>= 1; with streaming, a count of the first blocks)."
    )
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many documents per dataset (for "
                                    "debugging; only the shards holding them are tokenized).")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat", description="How several datasets are combined: concat appends them in order; interleave_under "
        "alternates documents until the first dataset runs out, interleave_over until every dataset has been used "
        "once (oversampling the others), as datasets.interleave_datasets does with the run seed."
    )
    interleave_probs: list[float] | None = Field(
        None, description="interleave_*: probability of drawing the next document from each dataset (one per "
        "dataset, summing to 1; a list or comma-separated). Unset alternates round-robin."
    )
    packing: bool = Field(
        True, description="Concatenate documents (each followed by EOS) and cut into `cutoff_len` blocks; "
        "false truncates each document to `cutoff_len` on its own."
    )
    doc_mask: bool = Field(
        False, description="Record where each document starts inside every packed block (<split>_doc_offsets.npy, "
        "<split>_doc_starts.npy) so training can block attention across documents and restart positions."
    )
    streaming: bool = Field(
        False, description="Tokenize and pack while training, storing no tokens (for corpora larger than the "
        "disk). Needs train.max_steps; val_size must be a count (the first blocks); datasets are read one after the "
        "other (concat). Resumes from the checkpoint's data cursor without re-reading."
    )
    shuffle_shards: bool = Field(
        True, description="streaming: read the shards (up to 32 MiB pieces of the files) of each pass in a seeded "
        "random order, different every pass (resumable); false reads the files in order."
    )
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes that tokenize shards in parallel; default every available core. The result "
        "does not depend on it (not part of the cache key)."
    )
    preprocessing_batch_size: int = Field(
        1000, ge=1, description="Documents per tokenizer call. The result does not depend on it (no remainder is "
        "dropped per batch; not part of the cache key)."
    )
    dask_address: str | None = Field(
        None, description="A dask.distributed scheduler (e.g. tcp://10.0.0.5:8786): the token cache's missing shards "
        "are tokenized there, one Prefect task each (needs the `dask` extra; workers see the store and data at the "
        "same paths). Default: a local process pool. The result does not depend on it (not part of the cache key)."
    )

    @field_validator("dataset", "eval_dataset", "interleave_probs", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("dataset")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one dataset from dataset_info.json")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DataSection":
        problems = []
        for key, names in (("dataset", self.dataset), ("eval_dataset", self.eval_dataset or [])):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                problems.append(f"data.{key} lists {', '.join(twice)} more than once; name each dataset once")
        if self.eval_dataset is not None and not self.eval_dataset:
            problems.append("data.eval_dataset is empty; name datasets or remove the key")
        if self.eval_dataset and self.val_size:
            problems.append("data.val_size and data.eval_dataset both choose held-out data; set only one")
        probs = self.interleave_probs
        if probs is not None and self.mix_strategy == "concat":
            problems.append("data.interleave_probs is only used with mix_strategy interleave_under or "
                            "interleave_over; set one of them or remove interleave_probs")
        elif probs is not None:
            if len(probs) != len(self.dataset):
                problems.append(f"data.interleave_probs has {len(probs)} values for {len(self.dataset)} datasets "
                                f"({', '.join(self.dataset)}); give one probability per dataset")
            if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                problems.append(f"data.interleave_probs {probs} must be non-negative and sum to 1 "
                                f"(they sum to {sum(probs):g})")
            if self.mix_strategy == "interleave_over" and any(p == 0 for p in probs):
                problems.append("data.interleave_probs: interleave_over uses every dataset up; a probability of 0 "
                                "never would; raise it or use interleave_under")
        if self.streaming:
            if self.val_size and (self.val_size < 1 or self.val_size != int(self.val_size)):
                problems.append(f"data.val_size: {self.val_size:g} is a fraction, but a stream's length is unknown; "
                                "with streaming: true give a count of blocks (e.g. 100): the first blocks are held out")
            if self.mix_strategy != "concat" and len(self.dataset) > 1:
                problems.append(f"data.mix_strategy: {self.mix_strategy} is not available with streaming: true; "
                                "streamed datasets are read one after the other (concat)")
            if not self.packing:
                problems.append("data.packing: false is not available with streaming: true (a stream is packed "
                                "into cutoff_len blocks); set packing: true")
            if self.max_samples is not None and self.shuffle_shards:
                problems.append("data.max_samples keeps each streamed dataset's first documents, which needs the "
                                "files read in order; set data.shuffle_shards: false (or remove max_samples)")
        if self.doc_mask and not self.packing:
            problems.append("data.doc_mask marks documents inside packed blocks; with packing: false every block "
                            "is one document already: remove doc_mask or set packing: true")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def digest_fields(self) -> dict[str, Any]:
        # How many processes tokenize, and in what batches, does not change the blocks.
        fields = self.model_dump(mode="json")
        for name in ("preprocessing_num_workers", "preprocessing_batch_size", "dask_address"):
            fields.pop(name)
        if not self.streaming:
            fields.pop("shuffle_shards")  # only read by a stream
        return fields

    @field_validator("val_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("use a fraction below 1 (e.g. 0.05) or a whole number of blocks (e.g. 100)")
        return value


class TrainSection(Section):
    """How to train. Read by `train`."""

    do_train: bool = Field(
        True, description="Train. false skips training and evaluates the existing model in model.model_name_or_path "
        "(a saved model or LoRA adapter folder, or a Hub id) on the held-out blocks: LLaMA-Factory's evaluate-only use."
    )
    finetuning_type: Literal["full", "freeze", "lora"] = Field(
        "full", description="full: all weights; freeze: only the last `freeze_trainable_layers` layers; lora: adapters (peft)."
    )
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last N layers (negative: the first |N| layers)."
    )
    freeze_trainable_modules: list[str] = Field(
        ["all"], description="freeze: module names inside trainable layers to train (e.g. mlp,self_attn), or all."
    )
    lora_rank: int = Field(8, ge=1, description="lora: adapter rank.")
    lora_alpha: int | None = Field(None, ge=1, description="lora: scale numerator; default 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="lora: dropout on adapter inputs.")
    lora_target: list[str] = Field(
        ["all"], description="lora: module names to adapt (e.g. q_proj,v_proj), or all linear layers but the head."
    )
    save_merged_model: bool = Field(
        False, description="lora: also save the base model with the adapters merged in, under merged/.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 disables clipping).")
    num_train_epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS,
                                    description="Passes over the training blocks (ignored when max_steps > 0).")
    max_steps: int = Field(-1, le=MAX_STEPS, description="Optimizer steps to run; -1 derives them from num_train_epochs.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Blocks per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "warmup_stable_decay", "cosine_with_min_lr",
    ] = Field("cosine", description="Learning-rate schedule (transformers.get_scheduler names).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps; overrides warmup_ratio when > 0.")
    logging_steps: int = Field(10, ge=1, description="Log loss, lr, throughput every N steps.")
    save_steps: int = Field(500, ge=1, description="Write a resumable checkpoint every N steps.")
    save_strategy: Literal["steps", "no"] = Field(
        "steps", description="steps: a resumable checkpoint every save_steps and at the last step; no: none at all "
        "(HF Trainer's save_strategy: no), so a stopped run starts over: for benchmarks, or models whose "
        "checkpoint would not fit the disk.")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate on the validation blocks every N steps (and at the end).")
    num_processes: int | None = Field(
        None, ge=1, description="Training processes (DDP through torchrun), one per GPU; default: every "
        "visible GPU, or 1 on CPU. More than 1 on CPU runs gloo DDP (for tests).")
    fsdp: bool = Field(
        False, description="Shard parameters, gradients and optimizer states across the training processes "
        "(PyTorch FSDP2, one unit per decoder layer) instead of replicating them (DDP): for models whose weights and "
        "AdamW states do not fit one GPU. Needs num_processes > 1; full or freeze training.")
    ddp_bucket_cap_mb: int | None = Field(
        None, ge=1, description="DDP: megabytes of gradients per all-reduce bucket (transformers' key). Unset: 100, "
        "which measured 94.0% per-GPU efficiency for llama-1.1b on 2 H200s against 88.6% with PyTorch's 25 "
        "(docs/benchmarks.md). Not part of the cache key: it changes when gradients are reduced, not their values.")
    async_checkpoint: bool = Field(
        False, description="FSDP: copy each sharded checkpoint to host memory and write it in the background while "
        "training goes on (torch.distributed.checkpoint's async_save); it is sealed (hashed, renamed into place) "
        "once every rank's write is done, so a run killed meanwhile resumes from the previous one. A 10.2B model's "
        "123 GB checkpoint took 77-97 s to write on 2 H200s, with training stopped. Needs fsdp.")
    use_cpu: bool = Field(
        False, description="Train and evaluate on the CPU even when a GPU is visible (transformers' use_cpu); one "
        "process unless num_processes says more. Not part of the cache key: where a stage runs never is.")
    bf16: bool = Field(
        False, description="bf16 autocast with fp32 master weights. Refused on a CUDA GPU without native bf16 "
        "(before Ampere); on the CPU (no GPU, or use_cpu) it is PyTorch's CPU bf16 autocast: the same numerics, "
        "usually slower than fp32 unless the CPU has AMX or AVX512-BF16.")
    pure_bf16: bool = Field(False, description="Keep weights and optimizer states in bf16 (no fp32 master copy): "
                            "less memory and faster, slightly less precise.")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile.")
    compile_scope: Literal["model", "layers"] = Field(
        "layers", description="torch_compile: compile each decoder layer (one compilation reused by every layer: "
        "shortest first step, and the fastest measured on llama-1.1b) or the whole model.")
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="Attention kernel behind PyTorch SDPA during training (auto lets PyTorch choose).")
    enable_liger_kernel: bool = Field(
        False, description="Use liger-kernel's fused linear cross-entropy (and, without compile, its RMSNorm/SwiGLU/"
        "RoPE kernels). Needs a CUDA GPU and `pip install liger-kernel`.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    resume_from_checkpoint: str | bool = Field(
        "auto", description="auto: resume from the newest valid checkpoint of this exact run; false: start over; "
        "or a checkpoint directory."
    )

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: Any) -> Any:
        """Also transformers' `fsdp` option strings (LLaMA-Factory configs): "full_shard auto_wrap" -> true."""
        if value is None or isinstance(value, bool):
            return bool(value)
        options = value.split() if isinstance(value, str) else value if isinstance(value, list) else None
        known = {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "auto_wrap", "offload",
                 "no_shard"}
        if options is None or not all(isinstance(o, str) and o in known for o in options):
            raise ValueError(f"expected true/false or transformers' FSDP options (e.g. 'full_shard auto_wrap'), "
                             f"got {value!r}")
        return bool(options) and "no_shard" not in options

    @field_validator("freeze_trainable_modules", "lora_target", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        return _comma_list(value)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSection":
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be a positive number of steps, or -1 to use num_train_epochs")
        if self.fsdp and self.finetuning_type == "lora":
            raise ValueError("train.fsdp shards full weights; a LoRA adapter is small enough for DDP: remove fsdp "
                             "or use finetuning_type full/freeze")
        if self.async_checkpoint and not self.fsdp:
            raise ValueError("train.async_checkpoint writes FSDP's sharded checkpoints in the background; set "
                             "train.fsdp: true or remove async_checkpoint")
        if self.fsdp and self.num_processes == 1:
            raise ValueError("train.fsdp shards across processes, but num_processes is 1; raise num_processes "
                             "(one per GPU) or remove fsdp")
        return self

    def digest_fields(self) -> dict[str, Any]:
        # How often we log or checkpoint, and whether we resume, do not change the trained weights.
        fields = self.model_dump(mode="json")
        # Nor does use_cpu: keys never depend on where a stage runs (a GPU run's model serves a use_cpu config).
        for name in ("logging_steps", "save_steps", "save_strategy", "save_total_limit", "resume_from_checkpoint",
                     "do_train", "use_cpu", "ddp_bucket_cap_mb", "async_checkpoint"):
            fields.pop(name)
        return fields


class EvalSection(Section):
    """Perplexity on the held-out blocks. Read by `evaluate`."""

    do_eval: bool = Field(True, description="Compute eval_loss and perplexity after training (needs val_size > 0).")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Blocks per evaluation batch.")


class OutputSection(Section):
    """Where results go, what the model card says and where they are published. Read by `plot_loss`, `write_model_card` and `publish`."""

    output_dir: str | None = Field(
        None, description="Folder that receives the model, logs, plots and card; default <store>/runs/<run_name>."
    )
    plot_loss: bool = Field(True, description="Write training_loss.png and training_eval_loss.png.")
    license: str = Field("other", description="License identifier for the model card metadata.")
    tags: list[str] = Field([], description="Extra tags for the model card.")
    push_to_hub: bool = Field(
        False, description="Upload the output folder (weights or LoRA adapter, tokenizer, card, plots, results; no "
        "checkpoints) to the Hugging Face Hub in one commit after the run. Auth is checked before training starts.")
    hub_model_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$",
        description="Hub repo to push to (namespace/name, or name under the token's user); default run_name.")
    hub_private_repo: bool | None = Field(
        None, description="Create the repo as private (true) or public (false); null keeps the Hub's default. "
        "Only applies when the repo is created.")
    hub_token: SecretStr | None = Field(
        None, description="Hub token with write access. Prefer the HF_TOKEN environment variable, which wins over "
        "this key; never pass it as a command-line override. Kept out of logs, cards, artifacts and saved configs.")


STAGE_ORDER = ("load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card")
"""The stages in the order the flow runs them (`orchestration.from_stage` redoes one and all after it)."""


class OrchestrationSection(Section):
    """Where the train stage runs, what a run redoes, and what it continues from. Read by the flow, not by a stage."""

    placement: Literal["local", "gpu-pool"] = Field(
        "local", description="local: train in the flow's own process; gpu-pool: run the `train_deployment` "
        "deployment (a worker of the gpu work pool) through run_deployment, sharing artifacts through the store.")
    train_deployment: str = Field(
        "train-stage/gpu", pattern=r"^[^/]+/[^/]+$",
        description="The train deployment (flow/deployment) used with placement: gpu-pool; see prefect.yaml.")
    force: list[str] = Field(
        [], description="Stages to redo although they are cached (store entry and Prefect cache record are "
        "replaced; a forced train starts over from step 0), e.g. [prepare_dataset] or prepare_dataset,train.")
    from_stage: str | None = Field(
        None, description="Redo this stage and every stage after it (order: " + ", ".join(STAGE_ORDER) + ").")
    continue_from: str | None = Field(
        None, description="Continual pretraining: `latest` starts training from the newest model of this run_name's "
        "lineage (<store>/lineage/<run_name>.jsonl) that was trained on other data, or from `model` on the first "
        "run; or a folder with a saved model. Null trains from `model` every time.")

    @field_validator("force", mode="before")
    @classmethod
    def _split_stages(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("force")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_stage(name)
        return value

    @field_validator("from_stage")
    @classmethod
    def _known_stage(cls, value: str | None) -> str | None:
        return value if value is None else _check_stage(value)

    def forced_stages(self) -> set[str]:
        """`force` plus `from_stage` and everything after it."""
        later = STAGE_ORDER[STAGE_ORDER.index(self.from_stage):] if self.from_stage else ()
        return set(self.force) | set(later)


def _check_stage(name: str) -> str:
    if name not in STAGE_ORDER:
        close = difflib.get_close_matches(name, STAGE_ORDER, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"{name!r} is not a stage; {hint}stages are {', '.join(STAGE_ORDER)}")
    return name


class RunConfig(BaseModel):
    """A whole run: one section per stage plus run-wide settings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    run_name: str = Field("ptflow-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_RUN_NAME,
                          description="Name of the run (default output folder, model card title).")
    store: str | None = Field(None, description="Artifact store root: a folder, or an object store URL "
                              "(s3://bucket/prefix, gs://...; credentials never in the URL) cached per machine in "
                              "PTFLOW_CACHE_DIR; default $PTFLOW_HOME or ~/.cache/ptflow.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for the validation split, data order and weight init.")
    model: ModelSection
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()
    orchestration: OrchestrationSection = OrchestrationSection()

    @model_validator(mode="after")
    def _cross_section(self) -> "RunConfig":
        problems = []
        if self.data.val_size == 0 and not self.data.eval_dataset and self.train.eval_steps:
            problems.append("train.eval_steps needs held-out data: set data.val_size (e.g. 0.05) or data.eval_dataset")
        if self.model.train_from_scratch and self.train.finetuning_type != "full":
            problems.append(f"train.finetuning_type: {self.train.finetuning_type!r} on random weights "
                            "(model.train_from_scratch: true) trains a frozen random model; use full")
        if self.data.doc_mask and self.model.attn_implementation == "sdpa" and self.train.sdpa_backend == "flash":
            problems.append("train.sdpa_backend: flash takes no attention mask, but data.doc_mask needs one per "
                            "document; use model.attn_implementation: flex_attention (GPU) or sdpa_backend: auto")
        if self.data.streaming and self.train.max_steps <= 0:
            problems.append("train.max_steps: a stream's length is unknown, so data.streaming: true needs "
                            "train.max_steps (e.g. 10000) instead of num_train_epochs")
        if self.orchestration.continue_from and self.train.finetuning_type == "lora":
            problems.append("orchestration.continue_from needs a model with full weights, but lora stores only the "
                            "adapter; use train.finetuning_type: full or freeze for continual pretraining")
        if problems:
            raise ValueError("; ".join(problems))
        return self


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection, "data": DataSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection,
    "orchestration": OrchestrationSection,
}
TOP_LEVEL = {name for name in RunConfig.model_fields if name not in SECTIONS}
SECRET_KEYS = {"hub_token"}  # never echoed in errors, refused as command-line overrides


def is_secret(name: str) -> bool:
    """Whether a key can hold a credential (hub_token, LLaMA-Factory's hf_/ms_/om_hub_token, any *_token)."""
    name = name.lower()
    return name in SECRET_KEYS or name == "token" or name.endswith("_token")


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Apply `a.b=value` strings in place (values parsed as YAML); return malformed ones as problems."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected section.key=value, e.g. train.learning_rate=3e-4")
            continue
        parts = key.strip().split(".")
        if is_secret(parts[-1]):  # never echo the value: it is a secret
            problems.append(f"override {key.strip()}: a token on the command line shows up in the process list, "
                            "shell history and the flow run's parameters; export HF_TOKEN instead "
                            "(or set it in the config file)")
            continue
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"override {key.strip()}: value {QUOTE.repr(value)} is not valid YAML "
                            f"({getattr(exc, 'problem', None) or 'syntax error'}); quote it or fix it, "
                            "e.g. train.learning_rate=3e-4")
    return problems


def validate_config(raw: dict, source: str, root: yaml.Node | None = None, problems: list[str] | None = None) -> RunConfig:
    problems = list(problems or [])
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, raw, root) for err in exc.errors()]
        config = None
    if problems:
        raise ConfigError(source, problems)
    return config


def _describe(err: dict, raw: dict, root: yaml.Node | None) -> str:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    loc = [p for p in loc if "[" not in p]  # drop pydantic's union-branch labels like "function-after[...]"
    key = ".".join(loc) or "(top level)"
    line = _line_of(root, loc)
    where = f"{key} (line {line})" if line else key
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key. {_suggest(loc)}"
    if err["type"] == "missing":
        field = _field(loc)
        hint = f" ({field.description})" if field is not None and field.description else ""
        return f"{where}: required key is missing{hint}"
    value = "<hidden>" if loc and is_secret(loc[-1]) else err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "expected " + msg.removeprefix("Input should be ")
    if isinstance(value, dict):  # a cross-key check: its message names the keys; don't echo the whole section
        return f"{where}: {msg}"
    return f"{where}: got {QUOTE.repr(value)}; {msg}"


def _field(loc: list[str]):
    if len(loc) == 2 and loc[0] in SECTIONS:
        return SECTIONS[loc[0]].model_fields.get(loc[1])
    if len(loc) == 1:
        return RunConfig.model_fields.get(loc[0])
    return None


def _suggest(loc: list[str]) -> str:
    """Closest valid key: first within the same section, then anywhere (a key in the wrong section)."""
    name = loc[-1]
    if len(loc) == 1:
        candidates = sorted(TOP_LEVEL | set(SECTIONS))
        owners = {f"{s}.{f}": f for s, cls in SECTIONS.items() for f in cls.model_fields}
        if name in owners.values():
            home = next(k for k, v in owners.items() if v == name)
            return f"It belongs in a section: did you mean {home}?"
        close = difflib.get_close_matches(name, candidates + list(owners.values()), n=1, cutoff=0.6)
        if close:
            target = close[0] if close[0] in candidates else next(k for k, v in owners.items() if v == close[0])
            return f"Did you mean {target}?"
        return f"Valid top-level keys: {', '.join(candidates)}."
    section = loc[0]
    fields = list(SECTIONS[section].model_fields) if section in SECTIONS else []
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"Did you mean {section}.{close[0]}?"
    for other, cls in SECTIONS.items():
        close = difflib.get_close_matches(name, list(cls.model_fields), n=1, cutoff=0.8)
        if close:
            return f"Did you mean {other}.{close[0]}? (it belongs in the {other} section)"
    return f"Valid keys in {section}: {', '.join(fields)}."


def _line_of(root: yaml.Node | None, loc: list[str]) -> int | None:
    node, line = root, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def describe_fields() -> str:
    """Markdown reference of every key, generated from the schema (docs/config.md)."""
    out = []
    for name, field in RunConfig.model_fields.items():
        if name not in SECTIONS:
            out.append(f"| `{name}` | {_default(field)} | {field.description} |")
    rows = ["| key | default | meaning |", "|---|---|---|", *out]
    for section, cls in SECTIONS.items():
        rows.append(f"| **{section}** | | {cls.__doc__.strip()} |")
        for name, field in cls.model_fields.items():
            rows.append(f"| `{section}.{name}` | {_default(field)} | {field.description} |")
    return "\n".join(rows)


def _default(field) -> str:
    return "required" if field.is_required() else f"`{field.default!r}`"
