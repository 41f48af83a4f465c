"""The files shardsave reads and writes, as formats: the PEFT adapter folder (read by `adapter`, written by
`adapter_write`), its `adapter_config.json` and model card (`texts`), and the checkpoints training frameworks
write: DeepSpeed ZeRO (`deepspeed`), torch DCP (`dcp`), accelerate's FSDP files (`fsdp`).

Readers never run code from a file (weights-only unpickling, allowlists) and never name a path outside the folder
they read. Writers write into a directory the storage staged and never publish themselves. May import
`shardsave.storage`, `tensors`, `plan` and the bottom modules; never ranks."""
