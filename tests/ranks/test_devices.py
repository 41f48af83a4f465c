"""Where the gather's buffers live (pure), and what a timeout means against the process group's own."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from shardsave.ranks.collect.sharded import pick_device
from shardsave.ranks.identity import group_timeout, resolve_timeout

CPU, CUDA0, CUDA3, CUDA5 = (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 3),
                            torch.device("cuda", 5))  # fmt: skip


def test_shards_device_is_used_when_the_backend_can_move_it():
    # NCCL, rank bound to cuda:3 through FSDP's device_id without set_device (current device stays cuda:0)
    assert pick_device(CUDA3, {"cuda"}, None, CUDA0) == CUDA3
    assert pick_device(CPU, {"cpu", "cuda"}, None, CUDA0) == CPU  # gloo, or cpu:gloo,cuda:nccl: no GPU trip
    xpu = torch.device("xpu", 1)
    assert pick_device(xpu, {"xpu"}, None, None) == xpu  # xccl: not CPU buffers


def test_cpu_offloaded_shards_on_nccl_go_to_the_bound_device():
    assert pick_device(CPU, {"cuda"}, CUDA5, CUDA0) == CUDA5  # init_process_group(device_id=cuda:5)
    assert pick_device(CPU, {"cuda"}, None, CUDA3) == CUDA3  # else the current device
    assert pick_device(CPU, {"hpu"}, None, None) == CPU


@pytest.fixture
def one_rank_group():
    from multirank import free_port

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=42)
    )
    yield
    dist.destroy_process_group()


def test_a_timeout_beyond_the_groups_own_is_warned_about(one_rank_group, caplog):
    assert group_timeout() == 42
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        assert resolve_timeout(10) == 10
        assert not caplog.records
        assert resolve_timeout(300) == 300
    assert "exceeds the process group's own timeout of 42 s" in caplog.text


def test_the_default_timeout_follows_the_groups_own(one_rank_group, caplog):
    """Not a fixed 300 s: a job whose collectives wait 30 minutes (Trainer's ddp_timeout) waits as long in a
    save, ending a little before the group's watchdog would."""
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        assert resolve_timeout(None) == pytest.approx(0.9 * 42)
    assert not caplog.records


def test_no_group_no_warning(caplog):
    assert group_timeout() is None or dist.is_initialized()
    with caplog.at_level(logging.WARNING, logger="shardsave"):
        resolve_timeout(10_000)
    assert not caplog.records
    if not dist.is_initialized():
        assert resolve_timeout(None) == 300  # DEFAULT_TIMEOUT, where no group tells its own
