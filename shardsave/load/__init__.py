"""Loading a saved adapter into a live, sharded model: `load_pretrained` (`pretrained`: the checks, the plan and
the agreement), each rank reading only the element ranges it holds and writing them in place (`writes`: its ranges,
DeepSpeed's fp32 masters, the ZeRO-3 refusals).

May import `shardsave.checks`, `ranks` and everything below it."""
