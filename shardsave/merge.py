"""`python -m shardsave.merge`: stitch a shard set, rescue an adapter from a framework checkpoint, or merge an
adapter into a base model's weights (`--into`). The command line lives in `shardsave.cli.merge`, the stitcher in
`shardsave.save.stitch`; this module keeps the command and the names it always had."""

import sys

from shardsave.cli.merge import main
from shardsave.save.stitch import ShardSet, ShardSetError, default_output, merge_shards, read_shard_set

__all__ = ["ShardSetError", "ShardSet", "read_shard_set", "merge_shards", "default_output", "main"]

if __name__ == "__main__":
    sys.exit(main())
