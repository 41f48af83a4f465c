"""Pipeline stages as a pure function over what each rank reports: `shardsave.plan.stages.union_views`."""

from __future__ import annotations

import time

import pytest

from shardsave.plan.stages import StageError, merge_orders, sender_of, union_views

A = "layers.{}.q_proj.lora_A.default.weight"
B = "layers.{}.q_proj.lora_B.default.weight"


def view(layers, *, runs=None, prints="p", shape=(4, 8), key=None):
    """One rank's part: LoRA A/B of `layers`, each whole (or in `runs` of its 32 elements)."""
    tensors, entries = {}, []
    for i in layers:
        for name in (A.format(i), B.format(i)):
            held = [[a, b, f"{prints}{name}{a}"] for a, b in (runs or [(0, 32)])]
            tensors[name] = [list(shape), "float32", True, held]
            entries.append([(key or name).format(i).replace(".default", ""), name])
    return {"tensors": tensors, "entries": {"default": {"0": entries}}}


def test_two_stages_with_replicas_give_each_tensor_once_in_model_order():
    views = {0: view([0, 1]), 1: view([0, 1]), 2: view([2, 3]), 3: view([2, 3])}
    union = union_views(views)
    assert list(union["tensors"]) == [n.format(i) for i in range(4) for n in (A, B)]
    assert union["runs"][A.format(0)] == [[0, 32, [0, 1]]]
    assert union["runs"][B.format(3)] == [[0, 32, [2, 3]]]
    keys = [k for k, _ in union["entries"]["default"]["0"]]
    assert keys == [n.format(i).replace(".default", "") for i in range(4) for n in (A, B)]


def test_fsdp_inside_each_stage_tiles_every_tensor():
    views = {r: view([0] if r < 2 else [1], runs=[(16 * (r % 2), 16 * (r % 2) + 16)]) for r in range(4)}
    union = union_views(views)
    assert union["runs"][A.format(1)] == [[0, 16, [2]], [16, 32, [3]]]


def test_interleaved_stages_keep_the_natural_order():
    # virtual stages: rank 0 holds layers 0, 1, 10, 11; rank 1 holds layers 2, 3, 12 (10 sorts after 9, not after 1)
    union = union_views({0: view([0, 1, 10, 11]), 1: view([2, 3, 12])})
    assert [int(n.split(".")[1]) for n in union["tensors"]][::2] == [0, 1, 2, 3, 10, 11, 12]
    assert merge_orders([["a", "c"], ["b", "c"], ["a", "b"]]) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "views, message",
    [
        ({0: view([0]), 1: view([0], shape=(8, 4))}, "on rank 0 but [8, 4]"),
        ({0: view([0], runs=[(0, 16)]), 1: view([0], runs=[(20, 32)])}, "leaves [16, 20) on no rank"),
        ({0: view([0], runs=[(0, 20)]), 1: view([0], runs=[(16, 32)])}, "overlaps the run before it"),
        ({0: view([0], runs=[(0, 16)]), 1: view([1])}, "elements [16, 32) are held by no rank"),
        ({0: view([0], prints="x"), 1: view([0], prints="y")}, "renumber their modules"),
        ({0: view([0]), 1: view([1], key=A)}, "checkpoint key"),
        ({0: view([0, 1]), 1: view([1, 0])}, "contradicting orders"),
    ],
)
def test_parts_that_do_not_add_up_are_refused_with_what_was_found(views, message):
    with pytest.raises(StageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        union_views(views)


def test_the_sender_is_the_destination_when_it_holds_a_copy_else_spread_by_name():
    assert sender_of("x", [4, 2, 9], dst=9) == 9
    picked = {sender_of(A.format(i), [0, 1, 2, 3]) for i in range(32)}
    assert len(picked) >= 3  # different tensors, different replicas
    assert sender_of("x", [3, 1]) == sender_of("x", [1, 3])


def test_1024_ranks_in_64_stages_are_put_together_quickly():
    """64 stages of 16 data-parallel ranks (FSDP inside each), 4 layers a stage: rank 0's work stays small."""
    views = {}
    for rank in range(1024):
        stage, member = divmod(rank, 16)
        runs = [(2 * member, 2 * member + 2)]
        views[rank] = view(range(4 * stage, 4 * stage + 4), runs=runs)
    started = time.perf_counter()
    union = union_views(views)
    elapsed = time.perf_counter() - started
    assert len(union["tensors"]) == 2 * 4 * 64 and len(union["entries"]["default"]["0"]) == 512
    assert union["runs"][A.format(255)] == [[2 * m, 2 * m + 2, [1008 + m]] for m in range(16)]
    assert elapsed < 5, elapsed
