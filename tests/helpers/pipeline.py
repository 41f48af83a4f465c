"""Two pipeline stages of the tiny Llama + LoRA, as users cut them by hand for `torch.distributed.pipelining`
(torchtitan's recipe): every rank builds the whole PeftModel, then drops the other stage's modules, keeping the
full model's module names (the layers it does not run become parameter-free pass-throughs)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class PassThrough(nn.Module):
    """A decoder layer of another stage: hands the hidden states on."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def cut_stage(model, stage: int, *, split: int = 1, renumber: bool = False):
    """`model` (a PeftModel on the tiny Llama) reduced to pipeline stage `stage` of 2: stage 0 runs the embedding
    and layers `[0, split)` and returns hidden states; stage 1 the other layers, the norm and the head.
    `renumber`: stage 1 keeps its layers in a new ModuleList (their names restart at 0), the mistake that makes
    two stages save different tensors under one name."""
    inner = model.base_model.model
    layers = inner.model.layers
    if renumber and stage == 1:
        inner.model.layers = nn.ModuleList(layers[i] for i in range(split, len(layers)))
        inner.config.num_hidden_layers = len(inner.model.layers)
    else:
        for i in range(len(layers)):
            if (i < split) != (stage == 0):
                layers[i] = PassThrough()
    if stage == 0:
        inner.model.norm = nn.Identity()
        inner.lm_head = nn.Identity()
    else:
        inner.model.embed_tokens = None
    return model


class StageModule(nn.Module):
    """What `PipelineStage` runs: token ids to hidden states (stage 0), hidden states to logits (stage 1)."""

    def __init__(self, peft_model, stage: int):
        super().__init__()
        self.peft_model = peft_model
        self.stage = stage

    def forward(self, x):
        if self.stage == 0:
            return self.peft_model(input_ids=x).logits
        return self.peft_model(inputs_embeds=x).logits


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def sgd_steps(stage_module, *, steps: int, seed: int, lr: float) -> Iterator[torch.Tensor]:
    """Each training step's batch, yielded between the optimizer's zero_grad and step (SGD on the stage's trainable
    parameters): the same batches on every data-parallel replica; the stage in train mode meanwhile, eval after."""
    opt = torch.optim.SGD([p for p in stage_module.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    stage_module.train()
    for _ in range(steps):
        ids = torch.randint(1, 90, (4, 8), generator=gen)
        opt.zero_grad()
        yield ids
        opt.step()
    stage_module.eval()


def train_pipeline(stage_module, stage: int, group, *, steps: int = 2, seed: int = 11, lr: float = 0.1) -> None:
    """`steps` GPipe steps of 2 micro-batches; every data-parallel replica sees the same batches."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    pipe = PipelineStage(stage_module, stage, 2, torch.device("cpu"), group=group)
    schedule = ScheduleGPipe(pipe, n_microbatches=2, loss_fn=loss_fn)
    for ids in sgd_steps(stage_module, steps=steps, seed=seed, lr=lr):
        if stage == 0:
            schedule.step(ids)
        else:
            schedule.step(target=ids)


def pipeline_logits(stage_module, stage: int, peer: int, ids: torch.Tensor) -> torch.Tensor | None:
    """The pipeline's output for `ids`, by hand: stage 0 sends its hidden states to `peer`; stage 1 returns logits."""
    import torch.distributed as dist

    with torch.no_grad():
        if stage == 0:
            dist.send(stage_module(ids).contiguous(), peer)
            return None
        hidden = torch.empty(ids.shape[0], ids.shape[1], stage_module.peft_model.config.hidden_size)
        dist.recv(hidden, peer)
        return stage_module(hidden).float()


def train_by_hand(stage_module, stage: int, peer: int, *, steps: int = 2, seed: int = 11, lr: float = 0.1) -> None:
    """The same training without the pipelining schedules (which FSDP1 cannot run under): one micro-batch a
    step, stage 0's activations sent forward and their gradient sent back point to point."""
    import torch.distributed as dist

    for ids in sgd_steps(stage_module, steps=steps, seed=seed, lr=lr):
        if stage == 0:
            hidden = stage_module(ids)
            dist.send(hidden.detach().contiguous(), peer)
            grad = torch.empty_like(hidden)
            dist.recv(grad, peer)
            hidden.backward(grad)
        else:
            hidden = torch.empty(4, 8, stage_module.peft_model.config.hidden_size)
            dist.recv(hidden, peer)
            hidden.requires_grad_(True)
            loss_fn(stage_module(hidden), ids).backward()
            dist.send(hidden.grad.contiguous(), peer)
