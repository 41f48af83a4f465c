"""Checks of a saved adapter for the silent failures of distributed saves (`verify`: `verify_adapter`,
`check_tensors`), as a library that save, rescue and merge call on what they write.

May import `shardsave.formats` and everything below it; nothing that runs collectives."""
