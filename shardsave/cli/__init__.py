"""The command lines, `python -m shardsave.merge` and `python -m shardsave.verify`: argument parsing over library
calls, importing only what the chosen job needs.

The top layer, with `shardsave.integrations` (only the `python -m` shims `shardsave.merge` and `shardsave.verify` sit
above it): may import anything below."""
