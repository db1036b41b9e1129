"""ptflow/train/distributed.py: one process, DDP and FSDP2 through one object; gloo ranks on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_worker import launch, train_steps

from ptflow.errors import TrainingError
from ptflow.train import distributed
from ptflow.train.distributed import Ranks


def test_one_process_has_no_group_and_leaves_the_model_as_it_is(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks.open(cpu=True)
    assert (ranks.rank, ranks.world, ranks.device, ranks.is_main) == (0, 1, torch.device("cpu"), True)
    assert not dist.is_initialized()
    net = torch.nn.Linear(2, 2)
    assert ranks.wrap(net, fsdp=True) is net and ranks.mode == "single"  # FSDP needs ranks to shard over
    assert ranks.unwrap(net) is net and ranks.full_weights(net) is None
    tensor = torch.ones(2)
    assert ranks.sum(tensor) is tensor
    net(torch.ones(1, 2)).sum().backward()
    with ranks.gradient_sync(net, False):  # nothing to skip with one process
        pass
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert float(ranks.clip(list(net.parameters()), 0)) == pytest.approx(float(expected))
    ranks.barrier()


def test_nccl_on_the_cpu_is_refused_naming_why(monkeypatch):
    with pytest.raises(TrainingError, match="nccl, which runs only on CUDA GPUs.*CPU ranks need gloo"):
        distributed.check_backend("nccl", torch.device("cpu"))
    distributed.check_backend("gloo", torch.device("cpu"))
    # a group the caller created with nccl, joined by a rank that trains on the CPU
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *_: "nccl")
    with pytest.raises(TrainingError, match="process group uses nccl"):
        Ranks.open(cpu=True)


def test_a_rank_without_its_own_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match="local rank 2 needs GPU 2, but this machine shows 2 GPU"):
        distributed.local_device(False, 2)
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.integration
def test_ddp_and_fsdp_on_two_gloo_ranks_match_one_process(tmp_path):
    """The same global batch of padded rows, split over two ranks and two micro-batches: the same losses and
    clipped gradient norms as one process, with a frozen layer (DDP finds no unused parameters to wait for)."""
    report = launch(tmp_path / "report.json")
    one = train_steps(Ranks(torch.device("cpu")), fsdp=False)
    assert (report["world"], report["backend"], report["device"]) == (2, "gloo", "cpu")
    assert report["ddp"]["wrapper"] == "DistributedDataParallel" and report["ddp"]["mode"] == "ddp"
    assert report["ddp"]["device_ids"] is None  # CPU ranks: DDP gets no device ids
    assert report["fsdp"]["wrapper"].startswith("FSDP") and report["fsdp"]["mode"] == "fsdp"
    assert one["wrapper"] == "LlamaForCausalLM"
    for mode in ("ddp", "fsdp"):
        assert report[mode]["losses"] == pytest.approx(one["losses"], abs=1e-5), mode
        assert report[mode]["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4), mode
    assert one["losses"][-1] < one["losses"][0]  # the steps train: a frozen or unreduced model would not match
