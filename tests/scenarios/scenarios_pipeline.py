"""Multi-rank scenarios of pipeline-parallel stages: save, shards, merged save and load of a model cut into
stages (tests/save/test_pipeline_stages.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from scenario_tools import save_reference
from workers import scenario

import shardsave


def _adapter_state(model, layout: str = "") -> dict[str, torch.Tensor]:
    """This rank's trainable tensors, full (an FSDP2 stage's gathered over its data-parallel ranks, an FSDP1
    stage's through its full state dict)."""
    from torch.distributed.tensor import DTensor

    if layout.endswith("fsdp1"):
        from backends import full_state

        from shardsave.plan.names import canonical_name

        names = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full_state(model, "fsdp1").items() if k in names}
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _all_stages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's `_adapter_state` in one dict (the stages' union, as the pipeline trained it)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {k: v for part in parts for k, v in part.items()}


@scenario
def pp_save(rank, world, out: Path, params):
    """Two pipeline stages on a ("pp", "dp") 2 x 2 mesh, for each of `params["layouts"]`: "pp" (plain stages,
    two replicas each), "pp_fsdp2" (FSDP2 over "dp" inside each stage), "pp_renumbered" (stage 1 renumbers its
    layers: refused). Train through `torch.distributed.pipelining`, then save_pretrained, save_shards and
    gather_state_dict; load the save into fresh stages. Rank 0 writes PEFT's save of all stages' weights
    (`theirs`), the trained and loaded states; the last stage writes the pipeline's logits."""
    from peft import LoraConfig
    from pipeline import StageModule, cut_stage, pipeline_logits, train_by_hand, train_pipeline
    from tiny import VOCAB, peft_model, randomize_trainable
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lora = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    meshes = {  # "pp_fsdp1": stages on ranks {0, 2} and {1, 3}, so FSDP1's groups are no blocks of consecutive ranks
        order: init_device_mesh("cpu", (2, 2), mesh_dim_names=order) for order in (("pp", "dp"), ("dp", "pp"))
    }

    def build(layout: str, mesh, stage: int, seed: int | None = None):
        model = peft_model(lora)
        if seed is not None:
            randomize_trainable(model, seed=seed)
        cut_stage(model, stage, renumber=layout == "pp_renumbered")
        if layout == "pp_fsdp2":
            for layer in model.base_model.model.model.layers:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        if layout == "pp_fsdp1":
            from peft.utils.other import fsdp_auto_wrap_policy
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP(
                model, device_id=torch.device("cpu"), use_orig_params=True, process_group=mesh["dp"].get_group(),
                auto_wrap_policy=fsdp_auto_wrap_policy(model),
            )  # fmt: skip
        return model

    for layout in params["layouts"]:
        folder = out / layout
        folder.mkdir(exist_ok=True)
        mesh = meshes[("dp", "pp") if layout == "pp_fsdp1" else ("pp", "dp")]
        stage, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
        model = build(layout, mesh, stage)
        module = StageModule(model, stage)
        peer = dist.get_global_rank(mesh["pp"].get_group(), 1 - stage)
        if layout == "pp_fsdp1":
            train_by_hand(module, stage, peer)
        elif layout != "pp_renumbered":
            train_pipeline(module, stage, mesh["pp"].get_group())
        try:
            shardsave.save_pretrained(model, folder / "ours")
        except Exception as exc:
            (folder / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
            continue
        shardsave.save_shards(model, folder / "shards")
        try:
            shardsave.save_merged(model, folder / "merged")
            (folder / f"merged-{rank}.txt").write_text("returned")
        except Exception as exc:
            (folder / f"merged-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        gathered = shardsave.gather_state_dict(model)
        trained = _all_stages(_adapter_state(model, layout))
        ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))  # tiny.logits' input
        piped = pipeline_logits(module, stage, peer, ids)
        fresh = build(layout, mesh, stage, seed=9)
        result = shardsave.load_pretrained(fresh, folder / "ours")
        loaded = _all_stages(_adapter_state(fresh, layout))
        if rank == 0:
            save_reference(lora, trained, folder)
            torch.save({"trained": trained, "loaded": loaded, "gathered": gathered}, folder / "states.pt")
        if stage == 1 and replica == 0:
            torch.save(piped, folder / "logits.pt")
        (folder / f"load-{rank}.json").write_text(json.dumps(list(result.unexpected_keys)))
    return {}
