"""Checks of a saved adapter for the silent failures of distributed saves (`verify`: `verify_adapter`,
`check_tensors`, and `callback_adapter`: what the adapter in Trainer's `checkpoint-N/` is worth), as a library that
save, rescue and merge call on what they write; it reads adapter folders through `shardsave.formats.adapter`.

May import `shardsave.formats` and everything below it; nothing that runs collectives."""
