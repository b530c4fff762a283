"""The package as a user meets it: public API, docstrings, loud failure without native code."""
from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlplat as mp


def test_public_names_are_exported_and_documented():
    for name in mp.__all__:
        obj = getattr(mp, name)
        if isinstance(obj, type):
            assert obj.__module__ == "mlplat", name
        assert obj.__doc__, f"mlplat.{name} has no docstring"
    assert (Path(mp.__file__).parent / "py.typed").exists()


def test_error_tree_has_one_root():
    for name in ("ConfigError", "DefinitionError", "NotFoundError", "DataError", "StoreError", "SchemaVersionError",
                 "NativeExtensionError"):
        assert issubclass(getattr(mp, name), mp.MlplatError)
    assert str(mp.NotFoundError("unknown view 'x'")) == "unknown view 'x'"  # not KeyError's quoting


@pytest.mark.parametrize(
    "module",
    ["mlplat.dtypes", "mlplat._time", "mlplat.settings", "mlplat.features.definitions", "mlplat._native.keys", "mlplat.db.engine",
     "mlplat.runs.search", "mlplat.runs.artifacts", "mlplat.runs.training", "mlplat.demo.data", "mlplat",
     "mlplat.serving.client", "mlplat.serving.gateway", "mlplat._checks", "mlplat.monitoring.stats",
     "mlplat.demo.model"],
)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("extension", ["mlplat._native._asof", "mlplat._native._keys"])
def test_import_fails_loudly_without_a_native_extension(extension):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {extension!r}:
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        try:
            import mlplat
        except ImportError as exc:
            print(type(exc).__name__, "|", exc)
        else:
            print("imported")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("NativeExtensionError | mlplat's native extensions could not be imported")
    assert "pip install" in out


def test_import_mlplat_does_not_load_pandas_or_torch():
    # pandas and torch are optional and slow to import; `import mlplat` (and so `mlplat --help`) must not pay for them
    script = "import sys, mlplat; print(sorted(m for m in ('pandas', 'torch', 'polars') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
