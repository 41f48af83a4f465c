"""Arithmetic on tensors: PEFT's merge arithmetic (`merge_math`, carrying out the plan of
`shardsave.plan.merge_steps`), PiSSA / CorDA / OLoRA conversion (`convert`), the packed host transfer (`host`) and
its Triton / torch kernels (`kernels`).

Functions of tensors in and tensors out, on whatever device they are: no files, no collectives. May import
`shardsave.plan` and the bottom modules (`errors`, `log`, `compat`)."""
