"""Builds the LD_PRELOAD shim (helpers/shim/), the keeper's TLS pump (helpers/tlspump/) and the
ptrace mode's send stub (helpers/ptrace/) from source as part of `pip install .`.

The shim is compiled as the extension module fdkeeper._shim only so that setuptools builds
and installs it with the package; it is never imported, only preloaded into sipp. Its sources
and flags come from helpers/shimbuild.py, as for the tests and benches; without -Werror, which
the project's own check and tests add (a newer compiler's new warning must not fail an install).
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "helpers"))
from shimbuild import (  # noqa: E402 - found through the path above
    CFLAGS,
    LIBRARIES,
    SENDSTUB_CFLAGS,
    TLSPUMP_HEADERS,
    TLSPUMP_LIBRARIES,
    sendstub_source,
    sources,
    tlspump_sources,
)

shim = Extension(
    "fdkeeper._shim",
    sources=sources(relative_to=ROOT),
    extra_compile_args=CFLAGS,
    libraries=LIBRARIES,
)

# The keeper's TLS pump, loaded with ctypes (fdkeeper/keeper/tlspump.py), never imported either.
# Optional: where it cannot be built the keeper relays TLS in Python (and says so once).
tlspump = Extension(
    "fdkeeper._tlspump",
    sources=tlspump_sources(relative_to=ROOT),
    depends=tlspump_sources(relative_to=ROOT, names=TLSPUMP_HEADERS),  # rebuilt on change, and in the sdist
    extra_compile_args=CFLAGS,
    libraries=TLSPUMP_LIBRARIES,
    optional=True,
)

# The ptrace mode's send stub (fdkeeper/modes/ptrace/sendstub.py reads its functions' bytes and
# maps them into a traced program). Optional: without it each later message of a per-call
# connection, and each call's connect() and epoll_ctl(), costs the traced program one more stop.
sendstub = Extension(
    "fdkeeper._sendstub",
    sources=[sendstub_source(relative_to=ROOT)],
    extra_compile_args=SENDSTUB_CFLAGS,
    optional=True,
)

setup(ext_modules=[shim, tlspump, sendstub])
