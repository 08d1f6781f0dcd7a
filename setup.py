"""Builds the LD_PRELOAD shim (helpers/*.c) from source as part of `pip install .`.

The shim is compiled as the extension module fdkeeper._shim only so that setuptools builds
and installs it with the package; it is never imported, only preloaded into sipp. Its sources
and flags come from helpers/shimbuild.py, as for the tests and benches.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "helpers"))
from shimbuild import CFLAGS, LIBRARIES, sources  # noqa: E402 - found through the path above

shim = Extension(
    "fdkeeper._shim",
    sources=sources(relative_to=ROOT),
    extra_compile_args=CFLAGS,
    libraries=LIBRARIES,
)

setup(ext_modules=[shim])
