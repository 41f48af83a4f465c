"""The command lines, `python -m shardsave.merge` and `python -m shardsave.verify`: argument parsing over library
calls, importing only what the chosen job needs.

The top layer: may import anything."""
