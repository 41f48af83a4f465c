"""Saving an adapter from live ranks: gathered (`gathered`: `save_pretrained`, `gather_state_dict`), per-rank
shards (`shards`: `save_shards`), the plan both start from (`request`: what every rank plans, run through
`shardsave.ranks.handshake`), and the stitch of a shard set into the adapter folder (`stitch`: `merge_shards`).

Thin over the layers below: plan, agree, collect, then write through `formats` and `storage`. May import
`shardsave.checks`, `ranks` and everything below it."""
