"""ZeRO-3 partitions over each parameter's own group (`ds_process_group`), which may be smaller than the world:
the layout (which ranks hold which range, who sends it) as pure functions at simulated scale, and the
collector on fake ZeRO-3 parameters of simulated ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardsave.ranks.collect import zero3
from shardsave.ranks.collect.zero3 import UnsupportedPartitionError, Zero3Collector, partition_groups, partition_slices


def strided(world: int, size: int) -> list[tuple[int, ...]]:
    """The data-parallel groups of `size` ranks that an inner dimension of `world // size` ranks leaves."""
    stride = world // size
    return [tuple(range(j, world, stride)) for j in range(stride)]


def group_of(rank: int, groups) -> tuple[int, ...]:
    return next(g for g in groups if rank in g)


def test_every_rank_derives_the_same_groups_at_512_ranks():
    world, size = 512, 64
    truth = strided(world, size)
    assert len(truth) == 8 and sorted(r for g in truth for r in g) == list(range(world))
    for rank in range(world):
        assert partition_groups(group_of(rank, truth), world) == truth


def test_the_world_as_one_group_keeps_its_group_rank_order():
    assert partition_groups(range(8), 8) == [tuple(range(8))]
    assert partition_groups([3, 1, 2, 0], 4) == [(3, 1, 2, 0)]


@pytest.mark.parametrize(
    "own,world",
    [
        (range(64), 512),  # consecutive blocks: a second tiling could mix with strides undetected
        ((0, 2, 4), 8),  # size does not divide the world
        ((0, 4), 12),  # stride 4 where the world needs 6
        ((4, 0), 8),  # strided ranks out of group-rank order
        ((0, 0), 4),
        ((0, 8), 8),
        ((), 8),
    ],
)
def test_layouts_that_not_every_rank_can_derive_are_refused(own, world):
    assert partition_groups(own, world) is None


@pytest.mark.parametrize("numel", [1, 63, 64, 4096, 4096 * 3 + 17])
@pytest.mark.parametrize("shift", [0, 5, 2**31 + 3])
def test_each_element_comes_once_from_a_rank_that_holds_it_at_512_ranks(numel, shift):
    world, size = 512, 64
    groups = strided(world, size)
    partition = -(-numel // size)
    pieces = partition_slices(numel, partition, groups, shift)
    covered = sorted((p.start, p.stop) for p in pieces if p.stop > p.start)
    assert covered[0][0] == 0 and covered[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))  # no gap, no overlap
    for piece in pieces:
        index = group_of(piece.rank, groups).index(piece.rank)  # this rank's group rank: its DeepSpeed partition
        assert (piece.start, piece.stop) == (min(index * partition, numel), min((index + 1) * partition, numel))
    # one parameter's ranges come from every replica group in turn
    assert {group_of(p.rank, groups) for p in pieces} == set(groups)


def test_parameters_spread_over_the_replicas():
    world, size = 512, 64
    groups = strided(world, size)
    senders = {p.rank for shift in range(8) for p in partition_slices(64 * 10, 10, groups, shift)}
    assert senders == set(range(world))


def test_sizes_that_cannot_hold_the_parameter_are_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        partition_slices(100, 1, strided(8, 4))


# -- the collector, on fake ZeRO-3 parameters of simulated ranks ---------------------------------------------


class FakeGroup:
    def __init__(self, ranks):
        self.ranks = list(ranks)


def fake_zero3_param(full: torch.Tensor, group: FakeGroup, rank: int, partition: int | None = None) -> nn.Parameter:
    """What `deepspeed.zero.Init` leaves on `rank`: an empty parameter whose `ds_tensor` is its partition over
    `group` (padded to a multiple of the group's size)."""
    size = len(group.ranks)
    partition = -(-full.numel() // size) if partition is None else partition
    index = group.ranks.index(rank)
    padded = torch.zeros(partition * size, dtype=full.dtype)
    padded[: full.numel()] = full.reshape(-1)
    param = nn.Parameter(torch.empty(0, dtype=full.dtype))
    param.ds_id, param.ds_shape, param.ds_numel, param.ds_persist = 0, full.shape, full.numel(), False
    param.ds_tensor = padded[index * partition : (index + 1) * partition].clone()
    param.ds_tensor.ds_numel = partition
    param.ds_process_group = group
    param.ds_zero_partition_world_size = size
    param.partition_numel = lambda: partition
    return param


def simulated_ranks(monkeypatch, full: torch.Tensor, world: int, groups, **kwargs) -> list[Zero3Collector]:
    monkeypatch.setattr(zero3.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(zero3.dist, "get_process_group_ranks", lambda group: group.ranks)
    collectors = []
    for rank in range(world):
        module = nn.Module()
        module.weight = fake_zero3_param(full, FakeGroup(group_of(rank, groups)), rank, **kwargs)
        collectors.append(Zero3Collector(module, rank, world))
    return collectors


def test_replicated_partitions_assemble_the_parameter(monkeypatch):
    """8 ranks, a data-parallel group of 4 (stride 2) and 2 replicas: the ranges every rank agrees on, each
    read from its sender's own partition, give back the full tensor."""
    full = torch.arange(6 * 7, dtype=torch.float32).reshape(6, 7)
    collectors = simulated_ranks(monkeypatch, full, 8, strided(8, 4))
    layouts = [c.slices("weight") for c in collectors]
    assert all(layout == layouts[0] for layout in layouts)
    flat = torch.full((full.numel(),), float("nan"))
    for piece in layouts[0]:
        flat[piece.start : piece.stop] = collectors[piece.rank].local("weight", piece)
    assert torch.equal(flat.view(6, 7), full)


def test_partition_size_is_checked_exactly(monkeypatch):
    collectors = simulated_ranks(monkeypatch, torch.ones(10, 3), 4, strided(4, 2), partition=16)
    with pytest.raises(UnsupportedPartitionError, match=r"weight: .*partitions of 16 .*ceil\(30/2\) = 15"):
        collectors[0].slices("weight")


def test_block_groups_are_described_by_each_rank_as_its_own_group(monkeypatch):
    """Consecutive blocks cannot be told from metadata alone: each rank describes its own group, the layouts differ
    between the groups, and the save puts the parts together from what each rank holds (shardsave/stages.py)."""
    blocks = [(0, 1), (2, 3)]
    collectors = simulated_ranks(monkeypatch, torch.ones(4, 4), 4, blocks)
    assert {s.rank for s in collectors[0].slices("weight")} == {0, 1}
    assert {s.rank for s in collectors[2].slices("weight")} == {2, 3}
    assert [(s.start, s.stop) for s in collectors[2].own("weight")] == [(0, 8)]


def test_tensor_parallel_parameters_are_refused_under_a_smaller_group(monkeypatch):
    collectors = simulated_ranks(monkeypatch, torch.ones(4, 4), 4, strided(4, 2))
    collectors[1]._tensors["weight"].tensor_model_parallel = True
    with pytest.raises(UnsupportedPartitionError, match="tensor_model_parallel"):
        collectors[1].slices("weight")


# -- DeepSpeed itself, 4 gloo ranks ----------------------------------------------------------------------------


@pytest.mark.multirank
def test_zero3_over_data_parallel_groups_smaller_than_the_world(tmp_path):
    """Parameters partitioned over data-parallel groups {0, 2} and {1, 3} (`zero.Init(data_parallel_group=)`):
    shardsave's file is PEFT's save of the natively gathered weights, and reproduces the model's logits."""
    from multirank import check_ok, run_ranks

    lora = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    results = run_ranks("zero3_group_save", tmp_path, world_size=4, group=2, lora=lora)
    check_ok(results)
    assert [r.result["partition_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    _same_as_peft(tmp_path)


@pytest.mark.multirank
def test_zero3_over_consecutive_blocks_of_ranks(tmp_path):
    """Partition groups {0, 1} and {2, 3} (MiCS-style blocks, which no rank can tell from its own group): the ranks
    report what they hold and the save puts it together; the same file as PEFT's."""
    from multirank import check_ok, run_ranks

    lora = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    results = run_ranks("zero3_group_save", tmp_path, world_size=4, group=2, lora=lora, blocks=True)
    check_ok(results)
    assert [r.result["partition_ranks"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    _same_as_peft(tmp_path)


def _same_as_peft(tmp_path) -> None:
    from peft import PeftConfig, PeftModel
    from tiny import assert_same_files, base_model, logits

    config = PeftConfig.from_pretrained(str(tmp_path / "theirs"))
    assert_same_files(tmp_path / "ours", tmp_path / "theirs", type("M", (), {"peft_config": {"default": config}})())
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "logits.pt"), atol=1e-4, rtol=1e-4)
    names = sorted(p.name for p in (tmp_path / "merged_theirs").iterdir())  # save_merged: PEFT's merged files
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == names
    for name in names:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "merged_theirs" / name).read_bytes(), name
