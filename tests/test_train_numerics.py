"""The loop's numerics on CPU: token-weighted accumulation, doc-masked sharded evaluation, MFU's parameter count."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from tiny_assets import ASSETS, tiny_llama_config, write_dataset_info
from transformers import AutoModelForCausalLM

from ptflow.config.schema import DataSection, TrainSection
from ptflow.data.dataset import open_blocks, open_doc_starts, prepare_dataset
from ptflow.train.batches import Slicing, cut_step
from ptflow.train.bf16_adamw import StochasticRoundingAdamW, stochastic_round_
from ptflow.train.distributed import Ranks
from ptflow.train.eval_loss import eval_batches, eval_loss
from ptflow.train.step import StepRunner
from ptflow.train.telemetry import flops_per_token, matmul_parameters


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    lines = (ASSETS / "three_docs.jsonl").read_text().splitlines()
    (folder / "rep.jsonl").write_text("".join(json.dumps({"text": json.loads(line)["text"] + f" Copy {i}."}) + "\n"
                                              for i in range(4) for line in lines))  # 12 distinct documents
    return write_dataset_info(folder, {"rep": {"file_name": "rep.jsonl"}})


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


def gradients(blocks, lengths, rows, micro_batch: int, accumulation: int) -> tuple[float, dict]:
    """Loss and gradients of one step over `rows`, cut into `accumulation` micro-batches."""
    net = tiny_model()
    runner = StepRunner(net, torch.optim.SGD(net.parameters(), lr=0.0), None, Ranks(torch.device("cpu")),
                        TrainSection(max_steps=1), padded=True)
    cut = Slicing(micro_batch, accumulation, 0, 1, blocks.shape[1], torch.device("cpu"))
    loss = runner.accumulate(cut_step(blocks, lengths, None, np.asarray(rows), cut))
    return float(loss), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_padded_rows_weigh_tokens_not_micro_batches(docs_dir, tokenizer_artifact, layout):
    data = prepare_dataset(DataSection(dataset="rep", dataset_dir=str(docs_dir), cutoff_len=32, packing=False),
                           tokenizer_artifact, layout)
    blocks, lengths = open_blocks(data, "train")
    assert lengths is not None
    short, long = np.argsort(lengths)[:2], np.argsort(lengths)[-2:]
    rows = [*short, *long]  # micro-batches of 2 hold very different token counts
    assert lengths[short].sum() < lengths[long].sum()
    loss_41, grads_41 = gradients(blocks, lengths, rows, 4, 1)
    loss_22, grads_22 = gradients(blocks, lengths, rows, 2, 2)
    assert loss_22 == pytest.approx(loss_41, abs=1e-6)
    for name, grad in grads_41.items():
        assert torch.allclose(grads_22[name], grad, atol=1e-5), name
    ids = torch.from_numpy(np.asarray(blocks[rows], dtype=np.int64))
    mask = torch.arange(ids.shape[1])[None] < torch.from_numpy(lengths[rows])[:, None]
    labels = ids.masked_fill(~mask, -100)
    equal = tiny_model()  # what weighting micro-batches equally gives: a different gradient
    sum(equal(input_ids=ids[h], attention_mask=mask[h].long(), labels=labels[h]).loss / 2
        for h in (slice(0, 2), slice(2, 4))).backward()
    assert not all(torch.allclose(p.grad, grads_41[n], atol=1e-5) for n, p in equal.named_parameters())
    # the loss is the plain token mean of the rows, as computed from logits
    net = tiny_model()
    with torch.no_grad():
        logits = net(input_ids=ids, attention_mask=mask.long()).logits
    targets = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100)
    assert loss_41 == pytest.approx(float(expected), abs=1e-5)


def test_doc_masked_evaluation_equals_each_document_alone(docs_dir, tokenizer_artifact, layout):
    data = prepare_dataset(DataSection(dataset="rep", dataset_dir=str(docs_dir), cutoff_len=16, doc_mask=True,
                                       val_size=4), tokenizer_artifact, layout)
    blocks, starts = open_blocks(data, "eval")[0], open_doc_starts(data, "eval")
    assert starts is not None and any(len(s) > 1 for s in starts)
    net = tiny_model().eval()
    masked, count = eval_loss(net, blocks, None, 4, "cpu", doc_starts=starts)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row, block in enumerate(blocks):
            ids = torch.from_numpy(np.asarray(block, dtype=np.int64))
            bounds = [*map(int, starts[row]), len(ids)]
            for first, end in pairwise(bounds):
                logits = net(input_ids=ids[None, first:end]).logits[0]
                targets = ids[first + 1: end + 1]  # the last position predicts the next document's first token
                total += float(torch.nn.functional.cross_entropy(logits[: len(targets)], targets, reduction="sum"))
                tokens += len(targets)
    assert count == tokens == len(blocks) * (blocks.shape[1] - 1)
    assert masked == pytest.approx(total / tokens, abs=1e-5)
    unmasked, _ = eval_loss(net, blocks, None, 4, "cpu")
    assert abs(unmasked - masked) > 1e-3  # without positions documents would see each other


def test_evaluation_shards_cover_every_block_once_with_equal_batch_counts():
    for n, batch_size, world in ((7, 2, 3), (9, 4, 2), (2, 8, 4), (12, 3, 2)):
        shards = [eval_batches(n, batch_size, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # FSDP forwards are collectives: every rank runs as many
        counted = sorted(int(r) for s in shards for rows, keep in s if keep for r in rows)
        assert counted == list(range(n))
        assert all(len(rows) <= batch_size for s in shards for rows, _ in s)


def test_mfu_counts_matmul_parameters_not_the_embedding_table():
    config = tiny_llama_config()
    untied = AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "tie_word_embeddings": False}))
    tied = AutoModelForCausalLM.from_config(config.__class__(**{**config.to_dict(), "tie_word_embeddings": True}))
    table = config.vocab_size * config.hidden_size
    assert matmul_parameters(untied) == sum(p.numel() for p in untied.parameters()) - table
    assert matmul_parameters(tied) == sum(p.numel() for p in tied.parameters())  # the shared table is the head
    layers, hidden, seq = config.num_hidden_layers, config.hidden_size, 128
    assert flops_per_token(1000, layers, hidden, seq) == 6000 + 12 * layers * hidden * seq


def lm_losses(kind: str, steps: int, lr: float = 5e-5) -> list[float]:
    """Losses of `steps` AdamW steps on one fixed batch: fp32 weights, bf16 weights (plain AdamW) or bf16 + ours."""
    net = tiny_model()
    if kind != "fp32":
        net.to(torch.bfloat16)
    optimizer = StochasticRoundingAdamW(net.parameters(), lr=lr) if kind == "rounded" else \
        torch.optim.AdamW(net.parameters(), lr=lr)
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_stochastic_rounding_is_unbiased():
    value = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of a bf16 ulp above 1.0: nearest rounding gives 1.0
    target = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(target, value, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(target.float().mean()) == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert float(target.float().neg().mean()) == pytest.approx(-(1.0 + 2**-10), abs=2e-5)


def test_bf16_weights_with_stochastic_rounding_track_fp32_master_weights():
    steps = 15
    fp32, plain, rounded = (lm_losses(kind, steps) for kind in ("fp32", "plain", "rounded"))
    progress = {name: curve[0] - curve[-1] for name, curve in (("fp32", fp32), ("plain", plain),
                                                               ("rounded", rounded))}
    assert progress["fp32"] > 0.02
    assert progress["rounded"] == pytest.approx(progress["fp32"], rel=0.1)  # every step's update lands
    assert progress["plain"] < 0.8 * progress["fp32"]  # plain bf16 AdamW drops the small updates
    assert max(abs(a - b) for a, b in zip(rounded, fp32)) < 0.01
