"""The README as a new user meets it: its marked code blocks run as written, its versions table says what
pyproject.toml says, and its "Layout of the code" lists every module under shardsave/ (and no other)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pins import pins

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# `<!-- readme-test: torchrun N -->` or `<!-- readme-test: python -->` right before a fenced block marks it to run
MARKED = re.compile(r"<!-- readme-test: (python|torchrun (\d+)) -->\n```python\n(.*?)\n```", re.DOTALL)


def marked_blocks() -> list[tuple[str, int, str]]:
    """(first line, number of ranks (0: plain python), code) of each marked block."""
    return [(code.splitlines()[0], int(n or 0), code) for _, n, code in MARKED.findall(README)]


def test_readme_marks_its_examples():
    # the FSDP2 and the DeepSpeed first script, Trainer + ZeRO-3 on CPU
    assert [ranks for _, ranks, _ in marked_blocks()] == [2, 2, 2]


@pytest.mark.multirank
@pytest.mark.parametrize("index", range(len(marked_blocks())))
def test_marked_block_runs_as_written(index, tmp_path):
    _, ranks, code = marked_blocks()[index]
    if "import deepspeed" in code or "deepspeed=" in code:  # DeepSpeed itself, or through Trainer
        pytest.importorskip("deepspeed")
    script = tmp_path / "example.py"
    script.write_text(code + "\n")
    cmd = [sys.executable, script.name]
    if ranks:
        # --standalone, as the README says: the launcher binds a free port itself (a port picked here and released
        # could be taken by another job before torchrun binds it)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               script.name]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    for rank in range(ranks):
        assert f"rank {rank}: the resumed model gives the trained logits: True" in output, output[-3000:]


def section(heading: str) -> str:
    """The README's text under the `## heading` (up to the next `## `)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.DOTALL | re.MULTILINE)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def versions_table() -> list[tuple[str, SpecifierSet, str]]:
    rows = re.findall(
        r"^\| `?([\w-]+)`? \| `([^`]+)`[^|]* \| ([\w.]+)[^|]* \|$",
        section("Two commands (fresh machine, Python 3.10+)"),
        re.MULTILINE,
    )
    return [(name.lower(), SpecifierSet(spec), tested) for name, spec, tested in rows]


def test_versions_table_says_what_pyproject_says():
    table = versions_table()
    names = [name for name, _, _ in table]
    assert names == ["python", "torch", "peft", "transformers", "accelerate", "deepspeed", "triton"], names
    found = pins()
    for name, spec, tested in table:
        assert name in found, f"README's versions table lists {name}, which pyproject.toml does not require"
        for pinned in found[name]:
            assert pinned == spec, f"{name}: README says {spec}, pyproject.toml says {pinned}: update the table"
        assert tested in spec, f"{name}: the tested version {tested} is outside the supported range {spec}"


def ci_pins(name: str) -> dict[str, str]:
    """package -> version of each `package==version` line of .ci/<name>.txt (what .ci/setup installs)."""
    pins = {}
    for line in (ROOT / ".ci" / f"{name}.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            pins[requirement.name.lower().replace("_", "-")] = version
    return pins


def test_tested_column_is_what_ci_setup_installs():
    """The "tested" versions are the newest set's pins (.ci/newest.txt, and .ci/setup's torch) then the oldest set's
    (.ci/oldest.txt), so the table cannot drift from what `bash .ci/setup` installs (pip holds those pins, and
    `pip check` the rest). Python is whatever the machine has: not checked."""
    rows = re.findall(
        r"^\| `?([\w-]+)`? \| `[^`]+`[^|]* \| ([^|]+) \|$",
        section("Two commands (fresh machine, Python 3.10+)"),
        re.MULTILINE,
    )
    newest, oldest = ci_pins("newest"), ci_pins("oldest")
    (torch,) = re.findall(r"^TORCH=([\d.]+)$", (ROOT / ".ci" / "setup").read_text(), re.MULTILINE)
    newest["torch"] = oldest["torch"] = torch
    checked = []
    for name, cell in rows:
        if name.lower() == "python":
            continue
        tested = re.findall(r"\d+(?:\.\d+)+", cell)
        sets = [newest] if len(tested) == 1 else [newest, oldest]
        expected = [pins.get(name.lower()) for pins in sets]
        assert tested == expected, f"README's versions table says {name} {tested} was tested; .ci installs {expected}"
        checked.append(name.lower())
    assert checked == ["torch", "peft", "transformers", "accelerate", "deepspeed", "triton"], checked
    assert set(newest) - {"torch"} <= set(checked) and set(checked) - {"triton"} <= set(oldest)


def listed_modules() -> set[str]:
    """Paths of the .py files in the "Layout of the code" tree: `  name.py` under `shardsave/`, `    name.py`
    under a `  folder/` line; deeper-indented lines continue a description."""
    block = re.search(r"```\n(shardsave/\n.*?)```", section("Layout of the code"), re.DOTALL)
    assert block, "no shardsave/ tree in the Layout section"
    listed, folder = set(), ""
    for line in block.group(1).splitlines()[1:]:
        match = re.match(r"( +)(\S+)", line)
        if not match or not re.fullmatch(r"[\w]+(\.py|/)", match.group(2)):
            continue
        depth, name = len(match.group(1)), match.group(2)
        if depth == 2:
            folder = name if name.endswith("/") else ""
            if name.endswith(".py"):
                listed.add(name)
        elif depth == 4 and folder and name.endswith(".py"):
            listed.add(folder + name)
    return listed


def test_layout_lists_every_module():
    actual = {p.relative_to(ROOT / "shardsave").as_posix() for p in (ROOT / "shardsave").rglob("*.py")}
    listed = listed_modules()
    assert not actual - listed, f"add to README's 'Layout of the code': {sorted(actual - listed)}"
    assert not listed - actual, (
        f"README's 'Layout of the code' lists modules that do not exist: {sorted(listed - actual)}"
    )


def test_launch_table_commands_are_whole():
    commands = re.findall(r"^\| `((?:torchrun|deepspeed|accelerate) [^`]+)` \|", README, re.MULTILINE)
    assert len(commands) >= 5, commands
    for command in commands:
        assert "..." not in command and "[" not in command, f"write the launch command whole: {command}"
        for word in command.split():
            if word.startswith(("launch_scripts/", "configs/")):
                assert (ROOT / word).is_file(), f"{command}: {word} does not exist"
