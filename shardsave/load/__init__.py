"""Loading a saved adapter into a live, sharded model: `load_pretrained` (`pretrained`), each rank reading only
the element ranges it holds.

May import `shardsave.checks`, `ranks` and everything below it."""
