"""The log folder of a run: `<logs>/<timestamp>/<test>/`, with `<logs>/latest` pointing at
the newest run. Older runs beyond ``KEEP_RUNS`` are removed unless the caller keeps them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

KEEP_RUNS = 10
LATEST = "latest"
_RUN_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")


def new_run_dir(base: Path, keep_all: bool = False) -> Path:
    """Create this run's folder, point `latest` at it and prune older runs."""
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = base / stamp
    suffix = 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:  # two runs within one second
            suffix += 1
            run_dir = base / f"{stamp}-{suffix}"
    _point_latest(base, run_dir)
    if not keep_all:
        _prune(base, KEEP_RUNS)
    return run_dir


def folder_for_test(run_dir: Path, name: str) -> Path:
    """A folder for one test; a second test of the same name gets `name-2`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "test"
    candidate, number = run_dir / safe, 1
    while candidate.exists():
        number += 1
        candidate = run_dir / f"{safe}-{number}"
    candidate.mkdir(parents=True)
    return candidate


def _point_latest(base: Path, run_dir: Path) -> None:
    """Replace the `latest` symlink atomically (readers never see it missing)."""
    temporary = base / f".{LATEST}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(run_dir.name)
    os.replace(temporary, base / LATEST)


def _prune(base: Path, keep: int) -> None:
    runs = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_NAME.match(p.name))
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
