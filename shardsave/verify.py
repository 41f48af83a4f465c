"""`python -m shardsave.verify PATH [--base BASE] [--json] [--allow-pickle]`: check a saved adapter for the silent
failures of distributed saves. The checks live in `shardsave.checks.verify`, the command line in `shardsave.cli.verify`;
this module keeps the command and the names it always had (`shardsave.verify.verify_adapter`, `check_tensors`)."""

import sys

from shardsave.checks.verify import (
    KINDS,
    AdapterSummary,
    Finding,
    Report,
    VerifyError,
    check_tensors,
    verify_adapter,
    warn_findings,
)
from shardsave.cli.verify import main

__all__ = ["VerifyError", "Finding", "AdapterSummary", "Report", "KINDS", "check_tensors", "warn_findings",
           "verify_adapter", "main"]  # fmt: skip

if __name__ == "__main__":
    sys.exit(main())
