"""mlplat's native code and its thin Python wrappers.

* ``_asof`` (Cython, typed memoryviews, nogil): :func:`asof_backward_on_ts_by_key`,
  the point-in-time join kernel.
* ``_keys`` (C++ through pybind11, GIL released): dense key factorization used
  to turn join keys of any type into int64 codes (:class:`KeyFactorizer`).
* ``_codec`` (C++ through pybind11, GIL released): the online store's binary
  records, entity keys, Redis keys and commands (:mod:`.codec`).
* ``_hashing`` (C++ through pybind11): XXH64, the stable hash behind A/B routing.

There is no pure-Python fallback: importing this package fails with
:class:`mlplat.errors.NativeExtensionError` when an extension was not built.
The pure-Python references live in the tests.
"""
from __future__ import annotations

try:
    from . import _asof, _codec, _hashing, _keys  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    from ..errors import NativeExtensionError

    raise NativeExtensionError(
        f"mlplat's native extensions could not be imported ({exc}). They are compiled when mlplat is "
        "installed: run `pip install -e .` in a source checkout, or reinstall the package "
        "(`pip install --force-reinstall mlplat`); a C/C++ compiler and the Python headers are needed."
    ) from exc

from ._asof import asof_backward_on_ts_by_key
from .keys import KeyFactorizer

__all__ = ["asof_backward_on_ts_by_key", "KeyFactorizer"]
