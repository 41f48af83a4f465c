"""A user script next to a checkout folder named `shardsave/` imports the package, not that folder.

Without `package-dir = {"" = "."}` in pyproject.toml, setuptools makes a flat-layout editable install an import
hook that runs after Python's path search: the checkout folder (no `__init__.py`) was then imported as an empty
namespace package and `shardsave.save_pretrained` did not exist. The test installs the checkout editable into a
throwaway virtual environment (no download, no build: about 2 s) and runs such a script.

The throwaway environment sees the packages of the environment running the tests (pip, setuptools, wheel: the `test`
extra), not those of the base interpreter: under a virtual environment, `venv --system-site-packages` would give it
the base Python's, which on a fresh machine is a setuptools without `wheel` (`invalid command 'bdist_wheel'`)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_script_beside_a_checkout_named_shardsave_imports_the_package(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # after the checkout's own `__editable__.*.pth` (sorted before it), so the checkout comes first on sys.path
    sites = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
    (Path(purelib) / "_running_environment.pth").write_text(f"import site; {sites}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e"]
    proc = subprocess.run([*install, str(ROOT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    user = tmp_path / "work"
    user.mkdir()
    (user / "shardsave").symlink_to(ROOT, target_is_directory=True)  # `git clone ... shardsave` beside the script
    (user / "train.py").write_text("import shardsave\nprint(shardsave.__file__, shardsave.save_pretrained.__name__)\n")
    proc = subprocess.run([str(python), "train.py"], cwd=user, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(ROOT / "shardsave" / "__init__.py"), "save_pretrained"]
