"""Merged weights: the base model with the adapter folded in, from the live sharded model (`live`: `save_merged`,
over `planning` (what every rank plans from metadata), `exchange` (the factors, the merged runs, the streaming write)
and `parallel` (every rank writes its runs into the staged files)), or offline from files (`offline`: `merge_into`,
`python -m shardsave.merge SRC --into BASE`).

May import `shardsave.rescue`, `load`, `save`, `checks`, `ranks` and everything below."""
