"""The files shardsave reads and writes, as formats: the PEFT adapter folder (`adapter`: the one reader and its one
pickle gate; `adapter_write`: the one writer; `runs`: an adapter as element runs read by range; `initial`: the PiSSA
conversion's initial adapter), its `adapter_config.json` and model card (`texts`; `peft_json`: the same files from the
config's JSON, without peft), the shard set (`shard_set`: names, manifest, header and coverage checks; `shard_index`: a
set opened across ranks), the Hugging Face model folder (`hf_model`; `hf_base`: a base described from its files
alone, without transformers), where a checkpoint came from (`sources`), and the checkpoints training frameworks
write: DeepSpeed ZeRO (`deepspeed`), torch DCP (`dcp`), accelerate's FSDP files (`fsdp`).

Readers never run code from a file (weights-only unpickling, allowlists) and never name a path outside the folder they
read; they read through `shardsave.storage.reads`. Writers write into a directory the storage staged and never publish
themselves. May import `shardsave.storage`, `tensors`, `plan` and the bottom modules; never ranks or an operation's
folder (save, load, merged, rescue, checks)."""
