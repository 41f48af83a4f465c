"""Bytes at a location, behind one declared protocol (`base.Storage`: its docstring gives the call order, the
rank of each step, and what an object store must provide). The local POSIX implementation: the atomic publish
of a folder, hidden staging and one-file commits (`local`), writing whole files and byte ranges into a stage
(`files`), reading (`reads`), what may be removed (`stale`: dead writers' leftovers, superseded weights), owner
tags of hidden leftovers (`owner`), the system calls they share (`posix`), background fsync (`sync`), which
filesystem holds a path and whether it keeps parallel writers (`filesystems`), and safetensors written one
tensor at a time (`streaming`).

Knows nothing of ranks or PEFT. May import `shardsave.plan` (names that become paths) and the bottom modules."""
