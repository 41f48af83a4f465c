"""Bytes at a location: the atomic publish of a folder, hidden staging, fsync, stale-file removal
(`local`), owner tags of hidden leftovers (`owner`), which filesystem holds a path and whether it keeps parallel
writers (`filesystems`), and safetensors written one tensor at a time (`streaming`).

Knows nothing of ranks or PEFT. May import `shardsave.plan` (names that become paths) and the bottom modules."""
