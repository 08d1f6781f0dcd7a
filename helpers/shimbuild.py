"""How the LD_PRELOAD shim (helpers/shim/), the keeper's TLS pump (helpers/tlspump/) and the C test
programs are compiled: written once, the one build script for both libraries.

setup.py (the package build), the tests, bench/lease_latency.py and the static check all take
their sources and flags from here. By hand:

    python3 helpers/shimbuild.py OUT.so [--sanitize]   compile the shim
    python3 helpers/shimbuild.py --check                 the C check (.ci/check runs it)

With --sanitize (AddressSanitizer + UBSan) the shim only loads into a program that has the
ASan runtime first: LD_PRELOAD="$(gcc -print-file-name=libasan.so) OUT.so".

--check compiles the shim, the TLS pump and the C test programs with -Werror (into a temporary
directory) and runs cppcheck over helpers/; it prints every finding and exits 1 on any.
Warnings are errors here and in the tests, not in `pip install` (setup.py takes CFLAGS without
-Werror): a newer compiler's new warning must fail the project's check, never a user's install.
A cppcheck finding that is wrong is suppressed where it is, with the reason on the line above:
    /* cppcheck-suppress <id> */
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

HELPERS = Path(__file__).resolve().parent
SHIM = HELPERS / "shim"  # the shim's own sources: every *.c there is compiled into it
ROOT = HELPERS.parent
CFLAGS = ["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
# Added wherever the project itself compiles (tests, benches, --check); not in setup.py.
WERROR = ["-Werror"]
LIBRARIES = ["dl", "pthread"]
SANITIZE_CFLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
PROGRAM_CFLAGS = ["-O2", "-Wall", "-Wextra", *WERROR, "-pthread"]
# The keeper's TLS pump (fdkeeper/keeper/tlspump.py loads it with ctypes): not part of the shim,
# so it lives in its own directory beside shim/; linked to the libssl of _ssl.
TLSPUMP_SOURCES = ["tlspump/tlspump.c", "tlspump/sipframe.c", "tlspump/wsframe.c"]
TLSPUMP_HEADERS = ["tlspump/sipframe.h", "tlspump/wsframe.h"]
TLSPUMP_LIBRARIES = [":libssl.so.3", ":libcrypto.so.3", "pthread"]  # by file name: no libssl-dev needed
# The ptrace mode's send stub (fdkeeper/modes/ptrace/sendstub.py copies each of its functions into
# a traced program): freestanding and position-independent, no stack protector or CET notes (the
# copy runs from a bare page), no jump tables (no data beside the code).
SENDSTUB_SOURCE = "ptrace/sendstub.c"
SENDSTUB_CFLAGS = [
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fPIC",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-fno-jump-tables",
]
# The C test programs, checked with the rest (each compiled on its own, as the tests do).
TEST_PROGRAMS = ["tests/shim/shimprog.c", "tests/ptrace/sipagent.c", "bench/lease_latency.c"]
# Compiled with a helpers file next to it (tests/shim/rewrite_test.c links rewrite.c alone).
TEST_PROGRAMS_WITH = {"tests/shim/rewrite_test.c": ["shim/rewrite.c"]}
CPPCHECK = [
    "cppcheck",
    "--enable=warning,style,performance,portability",
    "--error-exitcode=1",
    "--inline-suppr",
    "--std=c11",
    "--library=posix",
    "--quiet",
    "--template={file}:{line}:{column}: {severity}: {message} [{id}]",
]


def sources(relative_to: Path | None = None) -> list[str]:
    """The shim's C files, sorted; relative to a directory when given (setup.py wants that)."""
    return _named(sorted(SHIM.glob("*.c")), relative_to)


def compile_shim(output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """Compile the shim to output with -Werror; return gcc's output ("" when clean), raise when it fails."""
    libraries = [f"-l{name}" for name in LIBRARIES]
    return _gcc(["-shared", "-fPIC", *CFLAGS, *WERROR, *extra_cflags, "-o", str(output), *sources(), *libraries])


def tlspump_sources(relative_to: Path | None = None, names: Sequence[str] = TLSPUMP_SOURCES) -> list[str]:
    """The TLS pump's C files (or its headers); relative to a directory when given, as sources()."""
    return _named([HELPERS / name for name in names], relative_to)


def _named(paths: Sequence[Path], relative_to: Path | None) -> list[str]:
    return [str(path.relative_to(relative_to) if relative_to else path) for path in paths]


def compile_tlspump(output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """Compile the TLS pump library to output; as compile_shim."""
    libraries = [f"-l{name}" for name in TLSPUMP_LIBRARIES]
    return _gcc(
        ["-shared", "-fPIC", *CFLAGS, *WERROR, *extra_cflags, "-o", str(output), *tlspump_sources(), *libraries]
    )


def sendstub_source(relative_to: Path | None = None) -> str:
    return _named([HELPERS / SENDSTUB_SOURCE], relative_to)[0]


def compile_sendstub(output: Path, extra_cflags: Sequence[str] = ()) -> str:
    """The send stub as pip builds it: a shared object (fdkeeper/_sendstub*.so) holding the function."""
    return _gcc(["-shared", "-nostdlib", *SENDSTUB_CFLAGS, *extra_cflags, "-o", str(output), sendstub_source()])


def compile_twin(output: Path, names: Sequence[str]) -> str:
    """Compile a few helpers files (names relative to helpers/) into a small library for ctypes.

    For the parity tests (tests/parity/), which hold a C function against its Python twin:
    only the files named, every function visible (SHIM_HIDDEN made empty), never the whole
    shim (its hooks would replace the test process's own socket calls).
    """
    paths = [str(HELPERS / name) for name in names]
    include = sorted({f"-I{(HELPERS / name).parent}" for name in names})
    flags = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", *WERROR, "-DSHIM_HIDDEN=", *include]
    return _gcc([*flags, "-o", str(output), *paths])


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


def check() -> list[str]:
    """The C check: every compile with -Werror and cppcheck over helpers/; what failed (empty: clean)."""
    findings = []
    with tempfile.TemporaryDirectory(prefix="shimbuild-check-") as directory:
        out = Path(directory)
        compiles: dict[str, Callable[[], str]] = {
            "the shim": lambda: compile_shim(out / "shim.so"),
            "the TLS pump": lambda: compile_tlspump(out / "tlspump.so"),
            "the send stub": lambda: compile_sendstub(out / "sendstub.so", WERROR),
        }
        for program in TEST_PROGRAMS:
            compiles[program] = _program_compile(program, out)
        for program, companions in TEST_PROGRAMS_WITH.items():
            extra = [f"-I{SHIM}", *(str(HELPERS / name) for name in companions)]
            compiles[program] = _program_compile(program, out, extra)
        for name, compile_it in compiles.items():
            try:
                compile_it()
            except RuntimeError as error:
                findings.append(f"{name}: {error}")
    findings += _cppcheck()
    return findings


def _program_compile(program: str, out: Path, extra: Sequence[str] = ()) -> Callable[[], str]:
    source = ROOT / program
    return lambda: compile_program(source, out / source.stem, extra)


def _cppcheck() -> list[str]:
    headers = sorted({f"-I{path.parent}" for path in HELPERS.rglob("*.h")})
    try:
        result = subprocess.run([*CPPCHECK, *headers, str(HELPERS)], capture_output=True, text=True)
    except FileNotFoundError:
        return ["cppcheck: not found; install the Debian package cppcheck (bash .ci/install does)"]
    if result.returncode == 0 and not result.stderr.strip():
        return []
    return [f"cppcheck (exit {result.returncode}):\n{result.stderr.strip() or result.stdout.strip()}"]


def main(arguments: list[str]) -> int:
    if arguments == ["--check"]:
        findings = check()
        for finding in findings:
            print(finding, file=sys.stderr)
        return 1 if findings else 0
    if not arguments or arguments[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    warnings = compile_shim(Path(arguments[0]), SANITIZE_CFLAGS if "--sanitize" in arguments else ())
    sys.stderr.write(warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
