"""Whole-model compile keeps SDPA on the causal fast path (no dense mask), and still masks packed documents.

Dynamo runs with a backend that records the traced graphs instead of compiling them (seconds on CPU),
so the test reads what scaled_dot_product_attention receives.
"""

from __future__ import annotations

import pytest
import torch
from tiny_assets import tiny_llama_config

from ptflow.train.kernels import keep_packed_check_eager


def sdpa_calls(model, **inputs) -> tuple[list, torch.Tensor]:
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.compile(backend=record, dynamic=False)
    loss = model(**inputs).loss
    nodes = [n for g in graphs for n in g.graph.nodes if "scaled_dot_product" in str(n.target)]
    return nodes, loss


@pytest.fixture
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


IDS = torch.randint(3, 4000, (2, 32), generator=torch.Generator().manual_seed(1))


def test_plain_packing_reaches_sdpa_as_is_causal_without_a_mask(model):
    eager_loss = model(input_ids=IDS, labels=IDS).loss
    keep_packed_check_eager(model)
    nodes, loss = sdpa_calls(model, input_ids=IDS, labels=IDS)
    assert nodes and all(n.kwargs.get("attn_mask") is None and n.kwargs.get("is_causal") for n in nodes)
    torch.testing.assert_close(loss, eager_loss)


def test_packed_documents_still_get_their_block_diagonal_mask(model):
    positions = torch.cat([torch.arange(12), torch.arange(20)]).repeat(2, 1)
    eager_loss = model(input_ids=IDS, labels=IDS, position_ids=positions).loss
    keep_packed_check_eager(model)
    nodes, loss = sdpa_calls(model, input_ids=IDS, labels=IDS, position_ids=positions)
    assert nodes and all(n.kwargs.get("attn_mask") is not None for n in nodes)
    torch.testing.assert_close(loss, eager_loss)
    plain = model(input_ids=IDS, labels=IDS).loss
    assert not torch.allclose(loss, plain)  # the documents really were masked from each other
