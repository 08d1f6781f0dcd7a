"""How the LD_PRELOAD shim (helpers/*.c) and its C test programs are compiled: written once.

setup.py (the package build), tests/test_shim*.py and bench/lease_latency.py all take their
sources and flags from here. By hand:

    python3 helpers/shimbuild.py OUT.so [--sanitize]

With --sanitize (AddressSanitizer + UBSan) the shim only loads into a program that has the
ASan runtime first: LD_PRELOAD="$(gcc -print-file-name=libasan.so) OUT.so".
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HELPERS = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
LIBRARIES = ["dl", "pthread"]
SANITIZE_CFLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
PROGRAM_CFLAGS = ["-O2", "-Wall", "-pthread"]
# The keeper's TLS pump (fdkeeper/keeper/tlspump.py loads it with ctypes): not part of the shim,
# so it lives in its own directory, out of the shim's *.c glob; linked to the libssl of _ssl.
TLSPUMP_SOURCES = ["tlspump/tlspump.c", "tlspump/sipframe.c"]
TLSPUMP_HEADERS = ["tlspump/sipframe.h"]
TLSPUMP_LIBRARIES = [":libssl.so.3", ":libcrypto.so.3", "pthread"]  # by file name: no libssl-dev needed


def sources(relative_to: Path | None = None) -> list[str]:
    """The shim's C files, sorted; relative to a directory when given (setup.py wants that)."""
    return _named(sorted(HELPERS.glob("*.c")), relative_to)


def compile_shim(output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """Compile the shim to output; return gcc's warnings ("" when clean), raise when it fails."""
    libraries = [f"-l{name}" for name in LIBRARIES]
    return _gcc(["-shared", "-fPIC", *CFLAGS, *extra_cflags, "-o", str(output), *sources(), *libraries])


def tlspump_sources(relative_to: Path | None = None, names: Sequence[str] = TLSPUMP_SOURCES) -> list[str]:
    """The TLS pump's C files (or its headers); relative to a directory when given, as sources()."""
    return _named([HELPERS / name for name in names], relative_to)


def _named(paths: Sequence[Path], relative_to: Path | None) -> list[str]:
    return [str(path.relative_to(relative_to) if relative_to else path) for path in paths]


def compile_tlspump(output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """Compile the TLS pump library to output; as compile_shim."""
    libraries = [f"-l{name}" for name in TLSPUMP_LIBRARIES]
    return _gcc(["-shared", "-fPIC", *CFLAGS, *extra_cflags, "-o", str(output), *tlspump_sources(), *libraries])


def compile_program(source: Path, output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """Compile one C program that the shim is preloaded into (tests, benches); as compile_shim."""
    return _gcc([*PROGRAM_CFLAGS, *extra_cflags, "-o", str(output), str(source)])


def asan_runtime() -> str:
    """The ASan runtime that must come first in LD_PRELOAD for a --sanitize shim."""
    return _gcc_output(["-print-file-name=libasan.so"]).strip()


def _gcc(arguments: list[str]) -> str:
    return _run_gcc(arguments).stderr


def _gcc_output(arguments: list[str]) -> str:
    return _run_gcc(arguments).stdout


def _run_gcc(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["gcc", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"gcc {' '.join(arguments)} failed:\n{result.stderr}")
    return result


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    warnings = compile_shim(Path(arguments[0]), SANITIZE_CFLAGS if "--sanitize" in arguments else ())
    sys.stderr.write(warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
