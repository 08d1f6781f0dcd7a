"""Which sipp a run uses: its version from `sipp -v`, remembered per binary.

`sipp -v` costs a fork and exec (3-5 ms); its answer is kept in the keeper's state directory,
keyed by the binary's path, mtime and size, so a rebuilt or upgraded sipp is asked again.
The cache is only an optimisation: any trouble reading or writing it means asking sipp.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fdkeeper.errors import FdkeeperError
from fdkeeper.sipp.tables import NEWEST, OptionTable, table_for
from fdkeeper.statedir import check_private_directory, open_private_file

# The cache as JSON: by binary (path, mtime, size), what `sipp -v` said of it.
CacheEntries = dict[str, dict[str, object]]

CACHE_NAME = "sipp-versions.json"
CACHE_ENTRIES = 16  # binaries remembered; the oldest answer goes first
VERSION_TIMEOUT = 5.0
_VERSION_LINE = re.compile(r"SIPp v(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class SippVersion:
    """What `sipp -v` said: the version (None if it said nothing fdkeeper reads) and its text."""

    number: tuple[int, int, int] | None
    text: str

    @property
    def table(self) -> OptionTable:
        """The option table to read this sipp's arguments with, labelled with its own version."""
        known = table_for(self.number)
        return dataclasses.replace(known, release=self.number) if known and self.number else NEWEST

    def unknown_notice(self, sipp: Path) -> str | None:
        """One line for stderr when the arguments are read with a table not made for this sipp."""
        if table_for(self.number) is not None:
            return None
        said = f"says it is {self.text}" if self.text else "did not tell its version (sipp -v)"
        return f"{sipp} {said}, which fdkeeper does not know; reading its arguments as sipp {NEWEST.label}'s"


def parse_version(output: str) -> SippVersion:
    """The version in `sipp -v` output (" SIPp v3.7.7-TLS-SHA256.")."""
    match = _VERSION_LINE.search(output)
    if match is None:
        return SippVersion(None, "")
    major, minor, patch = (int(part or 0) for part in match.groups())
    line = " ".join(output[match.start() :].split()[:2]).rstrip(".")
    return SippVersion((major, minor, patch), line)


def sipp_version(sipp: Path, state_directory: Path | None = None) -> SippVersion:
    """sipp's version, from the cache in state_directory when the binary is unchanged."""
    key, stamp = _cache_key(sipp)
    cache = _read_cache(state_directory)
    if key in cache and cache[key].get("stamp") == stamp:
        return SippVersion(_as_number(cache[key].get("number")), str(cache[key].get("text", "")))
    version = ask_sipp(sipp)
    cache.pop(key, None)
    cache[key] = {"stamp": stamp, "number": list(version.number) if version.number else None, "text": version.text}
    _write_cache(state_directory, dict(list(cache.items())[-CACHE_ENTRIES:]))
    return version


def ask_sipp(sipp: Path) -> SippVersion:
    try:
        done = subprocess.run(
            [os.fspath(sipp), "-v"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=VERSION_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return SippVersion(None, "")
    return parse_version(done.stdout + done.stderr)


def _cache_key(sipp: Path) -> tuple[str, list[int]]:
    real = os.path.realpath(sipp)
    try:
        info = os.stat(real)
    except OSError:
        return real, []
    return real, [info.st_mtime_ns, info.st_size, info.st_ino]


def _as_number(value: object) -> tuple[int, int, int] | None:
    if isinstance(value, list) and len(value) == 3 and all(isinstance(part, int) for part in value):
        return (value[0], value[1], value[2])
    return None


def _read_cache(directory: Path | None) -> CacheEntries:
    """The cache if the state directory already exists (a first run does not create it for this)."""
    if directory is None or not directory.is_dir():
        return {}
    try:
        check_private_directory(directory)
        with open_private_file(directory, CACHE_NAME, "r", encoding="utf-8") as cache:
            data = json.loads(cache.read(64 * 1024) or "{}")
    except (FdkeeperError, OSError, ValueError):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict)} if isinstance(data, dict) else {}


def _write_cache(directory: Path | None, cache: CacheEntries) -> None:
    if directory is None or not directory.is_dir():
        return
    try:
        with open_private_file(directory, CACHE_NAME, "w", encoding="utf-8") as out:
            out.write(json.dumps(cache))  # a reader racing this sees it empty or partial: a miss
    except (FdkeeperError, OSError):
        pass
