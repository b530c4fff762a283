"""Builds mlplat's native extensions: one table, shared compiler directives.

Set MLPLAT_DEBUG_NATIVE=1 to build the Cython kernels with bounds checks and
the C++ code without optimisation, for debugging.
"""
import os

from Cython.Build import cythonize
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup

DEBUG = os.environ.get("MLPLAT_DEBUG_NATIVE") == "1"
NATIVE = "src/mlplat/_native"

CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
OPT = ["-O0", "-g"] if DEBUG else ["-O3"]

# name -> sources and flags. "kind" picks Cython or pybind11.
EXTENSIONS = {
    "mlplat._native._asof": {
        "kind": "cython",
        "sources": [f"{NATIVE}/_asof.pyx"],
        "extra_compile_args": OPT + ["-fopenmp"],
        "extra_link_args": ["-fopenmp"],
    },
    "mlplat._native._keys": {
        "kind": "pybind11",
        "sources": [f"{NATIVE}/_keys.cpp"],
        "extra_compile_args": OPT,
    },
    "mlplat._native._codec": {
        "kind": "pybind11",
        "sources": [f"{NATIVE}/_codec.cpp"],
        "extra_compile_args": OPT,
    },
    "mlplat._native._hashing": {
        "kind": "pybind11",
        "sources": [f"{NATIVE}/_hashing.cpp"],
        "extra_compile_args": OPT,
    },
}


def _extensions():
    cython_exts, cpp_exts = [], []
    for name, spec in EXTENSIONS.items():
        kwargs = {k: v for k, v in spec.items() if k not in ("kind", "sources")}
        if spec["kind"] == "cython":
            cython_exts.append(Extension(name, spec["sources"], **kwargs))
        else:
            cpp_exts.append(Pybind11Extension(name, spec["sources"], cxx_std=17, **kwargs))
    return cythonize(cython_exts, compiler_directives=CYTHON_DIRECTIVES) + cpp_exts


setup(ext_modules=_extensions())
