"""`pip install .` (not editable) compiles the shim from helpers/ and the package finds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pip_install_builds_the_shim_and_installs_the_command(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # Run from elsewhere so the checkout is not on sys.path: only the installed copy counts.
    probe = (
        "from fdkeeper.modes.preload import shim_path, PreloadMode; "
        "from fdkeeper import testbed as sut; "
        "import os; print(shim_path()); print(os.path.exists(shim_path())); "
        "print((sut.SCENARIOS_DIR / 'uac-register.xml').exists())"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    shim, exists, scenarios = result.stdout.split()
    assert shim.startswith(str(venv)) and exists == "True" and scenarios == "True", result.stderr
    nm = subprocess.run(["nm", "-D", "--defined-only", shim], capture_output=True, text=True)
    assert " T connect" in nm.stdout and " T epoll_wait" in nm.stdout
    helped = subprocess.run([str(venv / "bin" / "fdkeeper"), "sipp", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--reconnect" in helped.stdout
