"""Builds the LD_PRELOAD shim (helpers/*.c) from source as part of `pip install .`.

The shim is compiled as the extension module fdkeeper._shim only so that setuptools builds
and installs it with the package; it is never imported, only preloaded into sipp.
"""

from glob import glob

from setuptools import Extension, setup

shim = Extension(
    "fdkeeper._shim",
    sources=sorted(glob("helpers/*.c")),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["dl", "pthread"],
)

setup(ext_modules=[shim])
