"""`import shardsave` and a DDP / FSDP1 / FSDP2 save need neither DeepSpeed, Triton, transformers' Trainer nor
accelerate: a fresh interpreter with those modules made unimportable saves what PEFT saves."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# PEFT itself imports accelerate, so accelerate is checked in shardsave's sources rather than blocked at run time
BLOCKED = ("deepspeed", "triton", "transformers.trainer")
OPTIONAL = ("deepspeed", "triton", "accelerate", "transformers")

SCRIPT = """
import sys

# what an interpreter without them sees: `import x` fails and importlib.util.find_spec("x") is None
for name in {blocked!r}:
    sys.modules[name] = None

import shardsave  # noqa: E402

import copy, os, tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard  # noqa: E402
from tiny import assert_same_files, peft_model  # noqa: E402

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
out = Path(tempfile.mkdtemp())
model = peft_model(LoraConfig(target_modules=["q_proj", "v_proj"]))
model.save_pretrained(str(out / "peft"))
wrapped = {{
    "ddp": lambda m: torch.nn.parallel.DistributedDataParallel(m),
    "fsdp1": lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu"), use_orig_params=True),
    "fsdp2": lambda m: fully_shard(m),
}}
for name, wrap in wrapped.items():
    shardsave.save_pretrained(wrap(copy.deepcopy(model)), out / name)
    assert_same_files(out / name, out / "peft", model)
dist.destroy_process_group()
loaded = sorted(m for m in sys.modules if m.startswith({blocked!r}) and sys.modules[m] is not None)
assert not loaded, loaded
print("saved without", ", ".join({blocked!r}))
"""


def test_ddp_and_fsdp_saves_without_optional_modules(tmp_path):
    from multirank import free_port

    script = SCRIPT.format(blocked=BLOCKED, port=free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests/helpers")]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "saved without" in proc.stdout


def module_level_imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_optional_modules_are_imported_only_where_used():
    """Only the Trainer callback imports transformers at module level; no module imports the others there."""
    for path in sorted((ROOT / "shardsave").rglob("*.py")):
        optional = module_level_imports(path) & set(OPTIONAL)
        allowed = {"transformers"} if path.name == "integrations.py" else set()
        assert optional <= allowed, f"{path.relative_to(ROOT)} imports {sorted(optional)} at module level"
