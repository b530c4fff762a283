"""``Platform``: the one entry point. It wires settings to stores and nothing more."""
from __future__ import annotations

import os
from collections.abc import Callable

from .db import Database
from .db.migrate import ensure_schema
from .errors import ConfigError, MlplatError, StoreError
from .features.store import FeatureStore
from .models.registry import ModelRegistry
from .monitoring.service import Monitoring
from .runs.artifacts import ArtifactStore
from .runs.tracking import RunStore
from .serving.service import ServingService
from .settings import Settings

__all__ = ["Platform"]


class Platform:
    """mlplat in one object: ``.features``, ``.runs``, ``.models``, ``.serving`` and ``.monitoring``.

    Arguments override ``MLPLAT_*`` environment variables, which override the
    embedded defaults: a SQLite database, a SQLite online store and an
    artifact folder, all under ``home``. The database schema is created or
    upgraded on first use.

    Usage::

        >>> import mlplat as mp, tempfile
        >>> p = mp.Platform(tempfile.mkdtemp())
        >>> p.settings.database_url.startswith("sqlite:///")
        True
        >>> p.close()

        p = mp.Platform("./home", database_url="postgresql://user@db/mlplat",
                        online_store="redis://127.0.0.1:6379/0")

    ``settings=`` (an :class:`~mlplat.Settings`) replaces the other arguments: combining it with any of
    them is a ConfigError.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        database_url: str | None = None,
        online_store: str | None = None,
        artifact_root: str | None = None,
        threads: int | None = None,
        triton_url: str | None = None,
        served_sample_rate: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        arguments = {"home": home, "database_url": database_url, "online_store": online_store,
                     "artifact_root": artifact_root, "threads": threads, "triton_url": triton_url,
                     "served_sample_rate": served_sample_rate}
        if settings is None:
            settings = Settings.resolve(**arguments)
        elif not isinstance(settings, Settings):
            raise ConfigError(f"settings= must be an mp.Settings (from Settings.resolve(...)), got "
                              f"{type(settings).__name__}")
        else:
            given = [f"{k}=" for k, v in arguments.items() if v is not None]
            if given:  # they would be silently ignored: the settings already hold every value
                raise ConfigError(f"settings= cannot be combined with {', '.join(given)}: pass either settings= "
                                  "or the setting arguments (Settings.resolve(...) takes the same arguments)")
            settings = settings.checked()  # made by dataclasses.replace, say: home='/x', threads=0 went unchecked
        self.settings = settings
        s = self.settings
        try:
            s.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use {s.home} as the platform's home folder: {exc.strerror}") from None
        self.db = Database(
            s.database_url, pool_size=s.db_pool_size, max_overflow=s.db_max_overflow, pool_timeout=s.db_pool_timeout
        )
        try:
            ensure_schema(self.db)
            self.features = FeatureStore(self.db, s, in_use=lambda: self.models.feature_views_in_use())
            self.artifacts = ArtifactStore(s.artifact_root)
            self.runs = RunStore(self.db, self.artifacts, self.features)
            self.models = ModelRegistry(self.db, self.runs, self.artifacts, self.features)
            self.serving = ServingService(self)
            self.monitoring = Monitoring(self)
        except BaseException:
            # a platform that failed to open holds nothing open: the traceback (kept by a notebook as
            # sys.last_traceback) would otherwise keep its pooled connections and database files open
            features = getattr(self, "features", None)
            for release in ((features.close,) if features is not None else ()) + (self.db.dispose,):
                try:
                    release()
                except Exception:  # noqa: BLE001 - the error that stopped the opening is the one to raise
                    pass
            raise

    def close(self) -> None:
        """Write what is buffered (metrics of runs opened through it, served features) and release database,
        online store and server connections.

        Runs are flushed, not ended: a run ends when its ``with`` block ends, at ``run.end()``, or at
        interpreter exit in the process that started it (not one that resumed it). Every part is closed even when one
        fails; then the first failure is raised as an mlplat error (an :class:`~mlplat.errors.StoreError`
        when it was not one already). Closing again is harmless.
        """
        parts: list[tuple[str, Callable[[], None]]] = [
            ("the metrics buffered by open runs", self.runs.flush),
            ("the served-feature log and serving backend", self.serving.close),
            ("the online store", self.features.close),
            ("the database connections", self.db.dispose),
        ]
        failures = [failure for failure in map(_close_part, parts) if failure is not None]
        if failures:
            raise failures[0]

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Close; when the block raised, a failure to close does not replace its exception (that error is
        the one to see): it is added to it as a note, and the block's exception goes on."""
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except MlplatError as failure:
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(f"and then closing the platform failed: {type(failure).__name__}: {failure}")

    def __repr__(self) -> str:
        return f"Platform(home={str(self.settings.home)!r})"


def _close_part(part: tuple[str, Callable[[], None]]) -> MlplatError | None:
    """Close one part of a Platform; the failure as an mlplat error, or None."""
    what, close = part
    try:
        close()
    except MlplatError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - any failure: the other parts must still be closed
        detail = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        error = StoreError(f"closing {what} failed ({type(exc).__name__}: {detail}); the platform's other "
                           "connections were released; fix the cause and call close() again to retry")
        error.__cause__ = exc
        return error
    return None
