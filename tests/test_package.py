"""The package as a user meets it: public API, docstrings, loud failure without native code."""
from __future__ import annotations

import doctest
import importlib
import inspect
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


def _public_classes() -> list[type]:
    """The exported classes, the services a Platform hands out, and the objects their methods return."""
    from mlplat.features.online_read import OnlineResponse
    from mlplat.features.store import FeatureStore
    from mlplat.models.registry import ModelRegistry
    from mlplat.monitoring.service import Monitoring
    from mlplat.runs.artifacts import ArtifactStore
    from mlplat.runs.run import ActiveRun
    from mlplat.runs.tracking import RunStore
    from mlplat.runs.training import Training
    from mlplat.serving.local import LocalBackend
    from mlplat.serving.predict import Prediction
    from mlplat.serving.service import ServingService

    exported = [obj for obj in (getattr(mp, n) for n in mp.__all__) if isinstance(obj, type)
                and not issubclass(obj, BaseException)]
    return exported + [FeatureStore, RunStore, ModelRegistry, ServingService, Monitoring, ActiveRun, Training,
                       ArtifactStore, LocalBackend, Prediction, OnlineResponse]


def test_public_methods_have_docstrings_and_type_hints():
    missing = []
    for cls in _public_classes():
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if not inspect.isfunction(fn):
                continue
            where = f"{cls.__qualname__}.{name}"
            if not (fn.__doc__ or "").strip():
                missing.append(f"{where}: no docstring")
            sig = inspect.signature(fn)
            unhinted = [p for p in sig.parameters if p not in ("self", "cls")
                        and sig.parameters[p].annotation is inspect.Parameter.empty]
            if unhinted or sig.return_annotation is inspect.Signature.empty:
                missing.append(f"{where}: no type hint for {unhinted or 'the return value'}")
    assert not missing, "\n".join(missing)


def test_error_tree_has_one_root():
    for name in ("ConfigError", "DefinitionError", "NotFoundError", "DataError", "StoreError", "SchemaVersionError",
                 "NativeExtensionError"):
        assert issubclass(getattr(mp, name), mp.MlplatError)
    assert str(mp.NotFoundError("unknown view 'x'")) == "unknown view 'x'"  # not KeyError's quoting


@pytest.mark.parametrize(
    "module",
    ["mlplat.dtypes", "mlplat._time", "mlplat._expiring", "mlplat.settings", "mlplat.features.definitions",
     "mlplat._native.keys", "mlplat.db.engine", "mlplat.runs.search", "mlplat.runs.artifacts", "mlplat.runs.training",
     "mlplat.demo.data", "mlplat", "mlplat.serving.client", "mlplat.serving.gateway", "mlplat.serving.served_log",
     "mlplat.serving.triton_repo", "mlplat._checks", "mlplat.monitoring.stats", "mlplat.monitoring.service",
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


def test_import_mlplat_and_the_cli_load_the_rest_on_first_use():
    # `import mlplat` loads the native code (failing loudly) and the errors; the stores, SQLAlchemy and the serving
    # clients load when a name needs them, so `mlplat --help` answers at once and Ctrl-C finds the CLI listening
    heavy = ("sqlalchemy", "redis", "tritonclient", "grpc", "mlplat.platform", "mlplat.features", "mlplat.serving")
    script = textwrap.dedent(f"""
        import sys, mlplat, mlplat.cli
        print(sorted(m for m in {heavy!r} if m in sys.modules))
        mlplat.Platform, mlplat.FeatureView
        print(sorted(m for m in ('sqlalchemy', 'mlplat.platform', 'mlplat.features') if m in sys.modules))
        print(mlplat.FeatureView.__module__, mlplat.Int64.__module__, mlplat.runs.table_hash.__name__)
        print(set(mlplat.__all__) <= set(dir(mlplat)))
        from mlplat import *
        print(TritonClient.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:5] == ["[]", "['mlplat.features', 'mlplat.platform', 'sqlalchemy']",
                                   "mlplat mlplat table_hash", "True", "mlplat"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mp.Nope  # noqa: B018
