"""The README as a new user meets it: its marked code blocks run as written, its versions table says what
pyproject.toml says, and its "Layout of the code" lists every module under shardsave/ (and no other), in the
layer order of pyproject.toml's import contract."""

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


#: An entry of the "Layout of the code" tree: two spaces per level, a module (`name.py`) or a folder (`name/`), then
#: at least two spaces and what it is.
ENTRY = re.compile(r"((?:  )+)(\w+(?:\.py|/)) {2,}\S.*")


def layout_entries() -> list[tuple[int, str]]:
    """(depth, path under shardsave/) of each entry of the "Layout of the code" tree, in order; folders end in `/`.
    An entry sits at most one level below the folder above it; a line indented deeper than that continues the
    description above it, and any other line is an error."""
    block = re.search(r"```\n(shardsave/\n.*?)```", section("Layout of the code"), re.DOTALL)
    assert block, "no shardsave/ tree in the Layout section"
    entries, folders = [], []  # folders: the open folders, outermost first
    for line in block.group(1).splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        if indent > 2 * (len(folders) + 1):
            assert entries and line.strip(), f"Layout tree: a continuation line with nothing above it: {line!r}"
            continue
        match = ENTRY.fullmatch(line)
        assert match, f"Layout tree: not `<indent>name.py  what it is` or `<indent>folder/  what it is`: {line!r}"
        depth, name = len(match.group(1)) // 2, match.group(2)
        del folders[depth - 1 :]
        path = "".join(folders) + name
        entries.append((depth, path))
        if name.endswith("/"):
            folders.append(name)
    return entries


def listed_modules() -> set[str]:
    """Paths of the .py files the "Layout of the code" tree lists, relative to shardsave/, at any depth."""
    modules = [path for _, path in layout_entries() if path.endswith(".py")]
    assert len(modules) == len(set(modules)), "the Layout tree lists a module twice"
    return set(modules)


def test_layout_lists_every_module():
    actual = {p.relative_to(ROOT / "shardsave").as_posix() for p in (ROOT / "shardsave").rglob("*.py")}
    listed = listed_modules()
    assert not actual - listed, f"add to README's 'Layout of the code': {sorted(actual - listed)}"
    assert not listed - actual, (
        f"README's 'Layout of the code' lists modules that do not exist: {sorted(listed - actual)}"
    )


def contract_layers() -> list[set[str]]:
    """The layers of pyproject.toml's import-linter contract, top first, as names under shardsave."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [{name.strip().removeprefix("shardsave.") for name in layer.split("|")} for layer in layers]


def test_layout_lists_the_layers_top_to_bottom():
    """The tree's top-level folders and modules appear in the contract's layer order, each named in a layer."""
    layers = contract_layers()
    order = []
    for depth, path in layout_entries():
        name = path.removesuffix("/").removesuffix(".py")
        if depth == 1 and name != "__init__":
            (index,) = [i for i, layer in enumerate(layers) if name in layer] or [None]
            assert index is not None, f"README's Layout lists shardsave/{path}, which no layer of the contract names"
            order.append((index, path))
    assert order == sorted(order, key=lambda item: item[0]), f"README's Layout is not in layer order: {order}"
    assert {i for i, _ in order} == set(range(len(layers))), "README's Layout misses a layer of the contract"


def test_launch_table_commands_are_whole():
    commands = re.findall(r"^\| `((?:torchrun|deepspeed|accelerate) [^`]+)` \|", README, re.MULTILINE)
    assert len(commands) >= 5, commands
    for command in commands:
        assert "..." not in command and "[" not in command, f"write the launch command whole: {command}"
        for word in command.split():
            if word.startswith(("launch_scripts/", "configs/")):
                assert (ROOT / word).is_file(), f"{command}: {word} does not exist"
