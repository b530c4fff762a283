"""``p.models``: registered models, versions, stages with approvals, aliases, and lineage.

Stages are ``none``, ``staging``, ``production`` and ``archived``. Promoting a
version to production needs an approver (and, when the model's policy asks
for it, one other than whoever registered the version); the version that was
in production is archived in the same transaction, and a unique index keeps
at most one production version per model even against concurrent promotions.
Every stage and alias change is recorded: who, when, from, to, approved by,
notes.

Usage::

    v = p.models.register("fraud", run_id=run.id, artifact="model")
    p.models.promote("fraud", v.version, stage="production", approved_by="alice", notes="AUC +2 pts")
    model = p.models.load("fraud", stage="production")
    p.models.lineage("fraud", stage="production")
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..db import Database
from ..db.models import (
    ModelAlias,
    ModelPolicyChange,
    ModelTransition,
    ModelVersion,
    RegisteredModel,
    RunArtifact,
    RunInput,
)
from .._checks import check_version, close_names, require_bool, shown, storable
from .._folders import missing_folders, remove_empty
from ..errors import DataError, NotFoundError, StoreError
from ..features.definitions import parse_ref
from ..runs.artifacts import ArtifactStore, check_name, folder_sha256
from ..runs.run import check_text
from ..runs.torch_io import load_torch_model
from ..runs.tracking import RunStore

__all__ = ["ModelRegistry", "ModelVersionInfo", "Transition", "STAGES"]

STAGES = ("none", "staging", "production", "archived")
#: model names and aliases (and Triton model folder names)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-.]{0,254}")  # fullmatch only: "$" lets a trailing newline through
_ALIAS_MAX = 58  # history records an alias move as "alias:<alias>" in a 64-character column
_RUN_ID_MAX = 32  # the runs.id column (run ids are uuid4().hex)
#: ``notes`` and ``description`` (TEXT columns): a paragraph or a review, not a document; a longer write-up
#: belongs in a run artifact or a linked document
_TEXT_MAX = 10_000


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    stage: str
    run_id: str
    artifact: str
    registered_by: str
    created_at: datetime
    description: str
    aliases: tuple[str, ...]
    #: the artifact's sha256 when it was registered; None: unknown (registered before mlplat recorded it)
    artifact_sha256: str | None = None


@dataclass(frozen=True)
class Transition:
    version: int
    from_stage: str
    to_stage: str
    actor: str
    approved_by: str | None
    notes: str
    at: datetime


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DataError(f"model name {name!r} is invalid: letters, digits, '_', '-' and '.', at most 255")
    return name


def _check_person(value: Any, what: str) -> str:
    """A user name (registrant, approver, actor) that fits its column, stripped of surrounding
    whitespace, or DataError (a blank name, or one holding a control character other than
    whitespace, is refused)."""
    name = check_text(value.strip() if isinstance(value, str) else value, what, meaning="a user name")
    if not _person_key(name):  # nothing visible: "", or zero-width spaces, a soft hyphen, U+2800
        raise DataError(f"{what} must be a user name, got the blank {value!r}; give a name "
                        "(or leave it out to record the operating-system user)")
    if any(unicodedata.category(c) == "Cc" and not c.isspace() for c in name):
        raise DataError(f"{what} {shown(name)} holds a control character; give the user name as printable "
                        "text")
    return name


#: Default_Ignorable_Code_Point, which unicodedata does not expose: the ranges of Unicode 15.1's
#: DerivedCoreProperties.txt (https://www.unicode.org/Public/15.1.0/ucd/DerivedCoreProperties.txt), merged.
#: Characters a renderer shows as nothing: soft hyphen, combining grapheme joiner, Hangul fillers, Mongolian
#: and other variation selectors, zero-width spaces and joiners, bidi controls, tags, ...
_DEFAULT_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                      (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
                      (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                      (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def _invisible(c: str) -> bool:
    """A default-ignorable code point, another format character (category Cf), or the blank Braille
    pattern (U+2800: a symbol, not whitespace, that renders as a space)."""
    return (unicodedata.category(c) == "Cf" or c == "\u2800"
            or any(lo <= ord(c) <= hi for lo, hi in _DEFAULT_IGNORABLE))


def _person_key(name: str) -> str:
    """A user name as the distinct-approver policy compares it: Unicode-normalized (NFKC), invisible
    characters (every Default_Ignorable_Code_Point, such as zero-width spaces and joiners, soft hyphen,
    bidi marks, the combining grapheme joiner, variation selectors and Hangul fillers, and other format
    characters) and blank ones (whitespace, the blank Braille pattern U+2800) dropped, case-folded ("Bob ",
    "bob", "BOB", "Dana Smith", "DanaSmith", "b\\u200bob" and "b\\u034fob" are one person). Normalized again
    once they are dropped, as a dropped character may have kept letters and accents apart."""
    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if not _invisible(c))
    return "".join(unicodedata.normalize("NFKC", visible).split()).casefold()


def _check_distinct_approver(name: str, version: int, registrant: str, approver: str, given: Any) -> None:
    """The distinct-approver policy for a promotion to production: the approver may not be the version's
    registrant (names compared as :func:`_person_key` does), else DataError. Whoever carries the
    promotion out (``actor``) may be the registrant, as a pull request's author merges once reviewed."""
    if _person_key(approver) == _person_key(registrant):
        raise DataError(f"model {name!r} requires an approver other than the registrant ({registrant!r}) for "
                        f"production; approved_by={given!r} names the same person (names are compared ignoring "
                        f"case, Unicode width, invisible characters and whitespace): have someone else review and "
                        f"approve v{version}")


def _check_dest(dest: Any) -> Path:
    """``fetch``'s destination: a folder path (str or os.PathLike) that is new or empty, else DataError."""
    if not isinstance(dest, (str, os.PathLike)) or isinstance(dest, bytes) or not str(os.fspath(dest)).strip():
        raise DataError(f"dest must be a folder path (str or pathlib.Path), got {type(dest).__name__} {dest!r}")
    path = Path(dest)
    if "\x00" in str(path):
        raise DataError(f"dest {shown(str(path))} holds a NUL character; give a folder path without it")
    if path.is_dir() and not path.is_symlink():
        if next(path.iterdir(), None) is not None:  # its files would mix with the model's (and fail its sha256)
            raise DataError(f"dest {str(path)!r} is a folder that holds files already; give a new or empty folder")
    elif path.exists() or path.is_symlink():
        raise DataError(f"dest {str(path)!r} exists already and is not a folder; give a new or empty folder path")
    return path


def _changed(info: ModelVersionInfo, sha: str, where: str) -> StoreError:
    return StoreError(f"model {info.name!r} v{info.version}: artifact {info.artifact!r} of run {info.run_id} "
                      f"changed after registration ({where} sha256 {sha[:16]}..., registered "
                      f"{(info.artifact_sha256 or '')[:16]}...): these are not the files that were registered and "
                      "approved, so they are not used; restore the registered files, or register the run's "
                      "current artifact as a new version and have it approved")


def _check_run_id(run_id: Any) -> str:
    """A run id to look up: a string that could be one (an unknown one is NotFoundError later), else DataError."""
    if not isinstance(run_id, str):
        hint = "; pass run.id, not the run" if hasattr(run_id, "id") else ""
        raise DataError(f"run_id must be a run id, the string run.id of the run that logged the model, got "
                        f"{shown(run_id)} of type {type(run_id).__name__}{hint}")
    if not run_id.strip() or len(run_id) > _RUN_ID_MAX or not run_id.isprintable():
        raise DataError(f"run_id {shown(run_id)} is not a run id: run ids are at most {_RUN_ID_MAX} "
                        "printable characters; pass run.id of the run that logged the model")
    return run_id


def _check_stage(stage: Any) -> str:
    if not isinstance(stage, str) or stage not in STAGES:
        raise DataError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    return stage


def _check_version_info(info: Any) -> None:
    """``info`` is a version as ``p.models.get`` returns it, else DataError (not an AttributeError later)."""
    if not isinstance(info, ModelVersionInfo):
        raise DataError(f"pass a model version as p.models.get(name, ...) returns it (a ModelVersionInfo), got "
                        f"{shown(info)}")


def _check_alias_lookup(alias: Any) -> str:
    """An alias to look up: a string (one that was never set is NotFoundError later), else DataError."""
    if not isinstance(alias, str):
        raise DataError(f"alias must be a string such as 'champion', got {alias!r}")
    if "\x00" in alias:  # never set (set_alias refuses it); PostgreSQL would refuse the query itself
        raise DataError(f"alias {alias!r} holds a NUL character ('\\x00'), which no alias has; remove it")
    return storable(alias, "alias")


def _check_free_text(value: Any, what: str) -> str:
    """``notes`` and ``description``: a string of at most ``_TEXT_MAX`` characters without NUL (which
    PostgreSQL cannot store), else DataError."""
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string (use '' for none), got {shown(value)}")
    if len(value) > _TEXT_MAX:
        raise DataError(f"{what} is {len(value)} characters long, more than the {_TEXT_MAX} allowed: shorten it "
                        "(keep a longer write-up elsewhere, e.g. as a run artifact, and link to it)")
    return storable(value, what)


class ModelRegistry:
    """The model registry. Reach it as ``Platform(...).models``."""

    def __init__(self, db: Database, runs: RunStore, artifacts: ArtifactStore, features: Any = None) -> None:
        self._db = db
        self._runs = runs
        self._artifacts = artifacts
        self._features = features

    # ------------------------------------------------------------ writing
    def create(self, name: str, *, description: str = "", require_distinct_approver: bool = False) -> None:
        """Create a registered model with a policy (``register`` creates one with defaults on first use)."""
        _check_model_name(name)
        _check_free_text(description, "description")
        require_bool("require_distinct_approver", require_distinct_approver)
        exists = DataError(f"model {name!r} already exists; use set_policy to change its policy")
        try:
            with self._db.connect(write=True) as conn:
                if conn.scalar(sa.select(RegisteredModel.id).where(RegisteredModel.name == name)):
                    raise exists
                model_id = conn.scalar(sa.insert(RegisteredModel).values(
                    name=name, description=description, require_distinct_approver=require_distinct_approver)
                    .returning(RegisteredModel.id))
                if require_distinct_approver:  # off is the default every model starts from
                    conn.execute(sa.insert(ModelPolicyChange).values(
                        model_id=model_id, require_distinct_approver=True, actor=_user(), notes="created"))
        except sa.exc.IntegrityError:  # created by someone else meanwhile
            raise exists from None

    def set_policy(self, name: str, *, require_distinct_approver: bool, actor: str | None = None,
                   notes: str = "") -> None:
        """Whether production approvals must come from someone other than the version's registrant. A
        change is recorded (to what, who, when, why: :meth:`policy`); setting what is already set records
        nothing.

        Usage::

            p.models.set_policy("fraud", require_distinct_approver=True, actor="carol", notes="SOX review")
            p.models.policy("fraud")["changes"][-1]["by"]   # 'carol'
        """
        require_bool("require_distinct_approver", require_distinct_approver)
        who = _check_person(_user() if actor is None else actor, "actor")
        _check_free_text(notes, "notes")
        with self._db.connect(write=True) as conn:
            model_id = self._model_id(conn, name)
            if self._lock(conn, model_id) == require_distinct_approver:
                return
            conn.execute(sa.update(RegisteredModel).where(RegisteredModel.id == model_id).values(
                require_distinct_approver=require_distinct_approver))
            conn.execute(sa.insert(ModelPolicyChange).values(
                model_id=model_id, require_distinct_approver=require_distinct_approver, actor=who, notes=notes))

    def register(self, name: str, run_id: str, artifact: str = "model", *, description: str = "",
                 registered_by: str | None = None) -> ModelVersionInfo:
        """A new version of ``name`` from a run's model artifact (the model is created on first use).

        The artifact's sha256 is recorded with the version: from then on the run cannot log over that
        artifact, and ``load`` refuses files that no longer hash to it."""
        _check_model_name(name)
        _check_run_id(run_id)
        check_name(artifact)
        _check_free_text(description, "description")
        who = _check_person(_user() if registered_by is None else registered_by, "registered_by")
        self._runs.get(run_id)  # NotFoundError for an unknown run
        with self._db.connect(write=True) as conn:
            # FOR UPDATE (PostgreSQL; SQLite's write transaction already serializes): a log_model/log_artifact
            # of this run locks the row before its checks, so it either comes first (and this reads the sha256
            # of the files it stored) or waits for this registration and is refused
            sha = conn.scalar(sa.select(RunArtifact.sha256).where(
                RunArtifact.run_id == run_id, RunArtifact.path == artifact, RunArtifact.kind == "model")
                .with_for_update())
            if sha is None:
                raise NotFoundError(f"run {run_id} has no model artifact {artifact!r}; log it with run.log_model")
            model_id = self._model_id_created(conn, name)
            self._lock(conn, model_id)
            version = (conn.scalar(sa.select(sa.func.max(ModelVersion.version)).where(
                ModelVersion.model_id == model_id)) or 0) + 1
            vid = conn.scalar(sa.insert(ModelVersion).values(
                model_id=model_id, version=version, run_id=run_id, artifact=artifact, artifact_sha256=sha,
                stage="none", description=description, registered_by=who).returning(ModelVersion.id))
            conn.execute(sa.insert(ModelTransition).values(version_id=vid, from_stage="", to_stage="none",
                                                           actor=who, notes="registered"))
        return self.get(name, version=version)

    def promote(self, name: str, version: int, stage: str, *, approved_by: str | None = None, notes: str = "",
                actor: str | None = None) -> ModelVersionInfo:
        """Move a version to ``stage``; production needs ``approved_by`` and archives the previous one.

        Promoting a version to the stage it is already in moves nothing but is still recorded in its
        history (``stage -> stage``): for production that is a re-approval, and it shows in lineage's
        approvals. The policy checks apply to it as to any other promotion.

        ``actor`` is who promotes (default: the operating-system user); it may be the registrant even
        under the model's distinct-approver policy, which holds the approver to be someone else.
        """
        _check_model_name(name)
        _check_stage(stage)
        version = check_version(version)
        _check_free_text(notes, "notes")
        who = _check_person(_user() if actor is None else actor, "actor")
        given_approver = approved_by
        if isinstance(approved_by, str) and not _person_key(approved_by):
            approved_by = None  # blank, or nothing visible ('\u200b'): no approver (production refuses it below)
        if approved_by is not None:
            approved_by = _check_person(approved_by, "approved_by")  # stored stripped
        with self._db.connect(write=True) as conn:
            model_id = self._model_id(conn, name)
            distinct = self._lock(conn, model_id)
            row = conn.execute(sa.select(ModelVersion.id, ModelVersion.stage, ModelVersion.registered_by).where(
                ModelVersion.model_id == model_id, ModelVersion.version == version)).first()
            if row is None:
                raise NotFoundError(f"model {name!r} has no version {version}")
            if stage == "production":
                if approved_by is None:
                    raise DataError(f"promoting {name!r} v{version} to production needs an approver: "
                                    "approved_by= (on the command line, --approved-by)")
                if distinct:
                    _check_distinct_approver(name, version, row.registered_by, approved_by, given_approver)
                previous = conn.execute(sa.select(ModelVersion.id, ModelVersion.version).where(
                    ModelVersion.model_id == model_id, ModelVersion.stage == "production",
                    ModelVersion.id != row.id)).all()
                for prev in previous:
                    conn.execute(sa.update(ModelVersion).where(ModelVersion.id == prev.id).values(stage="archived"))
                    conn.execute(sa.insert(ModelTransition).values(
                        version_id=prev.id, from_stage="production", to_stage="archived", actor=who,
                        notes=f"replaced by version {version}"))  # the approval was of that version, not this one
            if row.stage != stage:
                conn.execute(sa.update(ModelVersion).where(ModelVersion.id == row.id).values(stage=stage))
            # recorded even when the stage does not change: a re-approval (or a re-review's notes) is an event
            conn.execute(sa.insert(ModelTransition).values(version_id=row.id, from_stage=row.stage, to_stage=stage,
                                                           actor=who, approved_by=approved_by, notes=notes))
        return self.get(name, version=version)

    def set_alias(self, name: str, alias: str, version: int, *, actor: str | None = None, notes: str = "") -> None:
        """Point an alias (e.g. "champion") at a version; if another version held it, history records its
        loss there (``alias:<alias>`` to nothing, "moved to version N"), as :meth:`delete_alias` does."""
        _check_model_name(name)
        if (not isinstance(alias, str) or not NAME_PATTERN.fullmatch(alias) or len(alias) > _ALIAS_MAX
                or alias.lower() in STAGES):  # "fraud@Production" would read as the stage and serve the alias
            raise DataError(f"alias {alias!r} is invalid: letters, digits, '_', '-' and '.', at most {_ALIAS_MAX}, "
                            "and not a stage name (in any case)")
        version = check_version(version)
        _check_free_text(notes, "notes")
        who = _check_person(_user() if actor is None else actor, "actor")
        with self._db.connect(write=True) as conn:
            model_id = self._model_id(conn, name)
            self._lock(conn, model_id)
            vid = conn.scalar(sa.select(ModelVersion.id).where(ModelVersion.model_id == model_id,
                                                               ModelVersion.version == version))
            if vid is None:
                raise NotFoundError(f"model {name!r} has no version {version}")
            held = conn.scalar(sa.delete(ModelAlias).where(ModelAlias.model_id == model_id, ModelAlias.alias == alias)
                               .returning(ModelAlias.version_id))
            if held is not None and held != vid:  # the version that held it loses it, as delete_alias records
                conn.execute(sa.insert(ModelTransition).values(
                    version_id=held, from_stage=f"alias:{alias}", to_stage="", actor=who,
                    notes=f"moved to version {version}" + (f": {notes}" if notes else "")))
            conn.execute(sa.insert(ModelAlias).values(model_id=model_id, alias=alias, version_id=vid))
            conn.execute(sa.insert(ModelTransition).values(version_id=vid, from_stage="", to_stage=f"alias:{alias}",
                                                           actor=who, notes=notes))

    def delete_alias(self, name: str, alias: str, *, actor: str | None = None, notes: str = "") -> None:
        """Remove an alias; history records it as a move from ``alias:<alias>`` to nothing."""
        _check_model_name(name)
        _check_alias_lookup(alias)
        _check_free_text(notes, "notes")
        who = _check_person(_user() if actor is None else actor, "actor")
        with self._db.connect(write=True) as conn:
            model_id = self._model_id(conn, name)
            self._lock(conn, model_id)
            vid = conn.scalar(sa.delete(ModelAlias).where(ModelAlias.model_id == model_id, ModelAlias.alias == alias)
                              .returning(ModelAlias.version_id))
            if vid is None:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            conn.execute(sa.insert(ModelTransition).values(version_id=vid, from_stage=f"alias:{alias}", to_stage="",
                                                           actor=who, notes=notes))

    def _model_id(self, conn, name: str) -> int:
        _check_model_name(name)
        model_id = conn.scalar(sa.select(RegisteredModel.id).where(RegisteredModel.name == name))
        if model_id is None:
            known = list(conn.scalars(sa.select(RegisteredModel.name).order_by(RegisteredModel.name)))
            raise NotFoundError(f"unknown model {name!r}{close_names(name, known, 'no model is registered yet')}")
        return model_id

    def _model_id_created(self, conn, name: str) -> int:
        """The model's id, creating it with the default policy if needed; a concurrent creation of the
        same name waits for the other transaction and then uses its row."""
        insert = (postgresql.insert if self._db.dialect == "postgresql" else sqlite.insert)(RegisteredModel)
        conn.execute(insert.values(name=name).on_conflict_do_nothing(index_elements=["name"]))
        return self._model_id(conn, name)

    def _lock(self, conn, model_id: int) -> bool:
        """Serialize changes to one model (row lock on PostgreSQL; SQLite's write lock is already held)."""
        q = sa.select(RegisteredModel.require_distinct_approver).where(RegisteredModel.id == model_id)
        if self._db.dialect == "postgresql":
            q = q.with_for_update()
        return bool(conn.scalar(q))

    # ------------------------------------------------------------ reading
    def list(self) -> list[dict[str, Any]]:
        """Every registered model with its latest version and what is in production."""
        with self._db.connect() as conn:
            rows = conn.execute(sa.select(
                RegisteredModel.name, RegisteredModel.description,
                sa.func.max(ModelVersion.version).label("latest"),
                sa.func.max(sa.case((ModelVersion.stage == "production", ModelVersion.version))).label("production"),
            ).outerjoin(ModelVersion).group_by(RegisteredModel.id).order_by(RegisteredModel.name)).all()
        return [dict(r._mapping) for r in rows]

    def versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of the model, oldest first (two queries, whatever their number)."""
        with self._db.connect() as conn:
            model_id = self._model_id(conn, name)
            rows = conn.execute(sa.select(*ModelVersion.__table__.c).where(ModelVersion.model_id == model_id)
                                .order_by(ModelVersion.version)).all()
            aliases: dict[int, list[str]] = {}
            for version_id, alias in conn.execute(
                    sa.select(ModelAlias.version_id, ModelAlias.alias).where(ModelAlias.model_id == model_id)
                    .order_by(ModelAlias.alias)):
                aliases.setdefault(version_id, []).append(alias)
        return [_version_info(name, row, aliases.get(row.id, ())) for row in rows]

    def get(self, name: str, *, version: int | None = None, stage: str | None = None,
            alias: str | None = None) -> ModelVersionInfo:
        """One version, chosen by exactly one of ``version``, ``stage`` or ``alias`` (none: the latest)."""
        if sum(x is not None for x in (version, stage, alias)) > 1:
            raise DataError("choose a model version by one of version=, stage= or alias= (on the command line, "
                            "one of --version, --stage or --alias), not several")
        if version is not None:
            version = check_version(version)
        if stage is not None:
            _check_stage(stage)
        if alias is not None:
            _check_alias_lookup(alias)
        with self._db.connect() as conn:
            model_id = self._model_id(conn, name)
            q = sa.select(*ModelVersion.__table__.c).where(ModelVersion.model_id == model_id)
            if version is not None:
                q = q.where(ModelVersion.version == version)
            elif stage is not None:
                q = q.where(ModelVersion.stage == stage)
            elif alias is not None:
                q = q.join(ModelAlias, ModelAlias.version_id == ModelVersion.id).where(ModelAlias.alias == alias)
            row = conn.execute(q.order_by(ModelVersion.version.desc()).limit(1)).first()
            if row is None:
                what = (f"version {version}" if version is not None else f"version in stage {stage!r}"
                        if stage is not None else f"alias {alias!r}" if alias is not None else "any version")
                raise NotFoundError(f"model {name!r} has no {what}")
            aliases = conn.scalars(sa.select(ModelAlias.alias).where(ModelAlias.version_id == row.id)
                                   .order_by(ModelAlias.alias)).all()
        return _version_info(name, row, aliases)

    def history(self, name: str, *, version: int | None = None) -> list[Transition]:
        """Every recorded transition of the model (or of one version), oldest first."""
        if version is not None:
            version = check_version(version)
        with self._db.connect() as conn:
            model_id = self._model_id(conn, name)
            q = (sa.select(ModelVersion.version, ModelTransition.from_stage, ModelTransition.to_stage,
                           ModelTransition.actor, ModelTransition.approved_by, ModelTransition.notes,
                           ModelTransition.at)
                 .join(ModelVersion, ModelVersion.id == ModelTransition.version_id)
                 .where(ModelVersion.model_id == model_id).order_by(ModelTransition.at, ModelTransition.id))
            if version is not None:
                if conn.scalar(sa.select(ModelVersion.id).where(ModelVersion.model_id == model_id,
                                                                ModelVersion.version == version)) is None:
                    raise NotFoundError(f"model {name!r} has no version {version}")
                q = q.where(ModelVersion.version == version)
            return [Transition(*r) for r in conn.execute(q)]

    def policy(self, name: str) -> dict[str, Any]:
        """The model's approval policy now, and every change of it, oldest first.

        >>> p.models.policy("fraud")  # doctest: +SKIP
        {'require_distinct_approver': True, 'changes': [{'require_distinct_approver': True, 'by': 'carol',
         'at': '2026-11-27T02:00:00+00:00', 'notes': 'SOX review'}]}
        """
        with self._db.connect() as conn:
            model_id = self._model_id(conn, name)
            now = bool(conn.scalar(sa.select(RegisteredModel.require_distinct_approver)
                                   .where(RegisteredModel.id == model_id)))
            rows = conn.execute(sa.select(ModelPolicyChange).where(ModelPolicyChange.model_id == model_id)
                                .order_by(ModelPolicyChange.at, ModelPolicyChange.id)).all()
        return {"require_distinct_approver": now,
                "changes": [{"require_distinct_approver": r.require_distinct_approver, "by": r.actor,
                             "at": r.at.isoformat(), "notes": r.notes} for r in rows]}

    def resolve(self, name: str, *, version: int | None = None, stage: str | None = None,
                alias: str | None = None) -> ModelVersionInfo:
        """Like :meth:`get`, but a bare name means the production version (what serving, lineage and
        monitoring act on), not the latest.

        Usage::

            p.models.resolve("fraud")             # the production version
            p.models.resolve("fraud", version=3)  # as get()
        """
        if version is None and stage is None and alias is None:
            stage = "production"
        return self.get(name, version=version, stage=stage, alias=alias)

    def load(self, name: str, *, version: int | None = None, stage: str | None = None,
             alias: str | None = None) -> Any:
        """The torch model of a version (TorchScript when it was scriptable), in eval mode; StoreError if its
        files changed after registration (see :meth:`fetch`)."""
        info = self.get(name, version=version, stage=stage, alias=alias)
        with tempfile.TemporaryDirectory() as tmp:
            return load_torch_model(self.fetch(info, Path(tmp) / "model"))

    def fetch(self, info: ModelVersionInfo, dest: str | Path) -> Path:
        """Copy a version's model artifact folder to the local folder ``dest`` and return it, once its files
        are checked against the sha256 recorded at registration: StoreError if they differ (the artifact
        changed after registration; ``dest`` is then left as it was), unchecked where none was recorded
        (registered before mlplat kept it and its artifact row gone by then). ``dest`` must be a new or an empty
        folder (DataError otherwise).

        >>> p.models.fetch(p.models.resolve("fraud"), "/tmp/fraud-model")  # doctest: +SKIP
        PosixPath('/tmp/fraud-model')
        """
        _check_version_info(info)
        dest = _check_dest(dest)
        made = missing_folders(dest)
        staged = dest / f".fetching-{uuid.uuid4().hex[:12]}"  # checked files leave it; refused ones never show
        moved: list[Path] = []
        try:
            staged.mkdir(parents=True)
            self._artifacts.get_dir(info.run_id, info.artifact, staged)
            if info.artifact_sha256 is not None:
                sha = folder_sha256(staged)
                if sha != info.artifact_sha256:
                    raise _changed(info, sha, "its files have")
            for entry in sorted(staged.iterdir()):
                entry.rename(dest / entry.name)
                moved.append(dest / entry.name)
            staged.rmdir()
        except BaseException as exc:  # dest is left as it was: new or empty
            for path in (staged, *moved):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            remove_empty(made)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot write model {info.name!r} v{info.version} into {str(dest)!r}: "
                                 f"{exc.strerror or exc}") from None
            raise
        return dest

    def artifact_meta(self, info: ModelVersionInfo, *, check: bool = True) -> dict[str, Any]:
        """A version's model artifact metadata: its sha256 and size, and what log_model recorded (files,
        signature, torch version); empty if the artifact row is gone. StoreError if the artifact's record
        no longer holds the sha256 registered (it changed after registration), unless ``check=False``."""
        _check_version_info(info)
        require_bool("check", check)
        with self._db.connect() as conn:
            row = conn.execute(sa.select(RunArtifact.sha256, RunArtifact.size, RunArtifact.meta).where(
                RunArtifact.run_id == info.run_id, RunArtifact.path == info.artifact)).first()
        if row is None:
            return {}
        if check and info.artifact_sha256 is not None and row.sha256 != info.artifact_sha256:
            raise _changed(info, row.sha256, "its record has")
        return {"sha256": row.sha256, "size": row.size, **row.meta}

    def training_features(self, info: ModelVersionInfo) -> tuple[list[str], bool]:
        """The feature refs ("view@version:feature") the version was trained on, from its run's first input
        logged with feature refs, and whether that table named them ``view__feature``; ([], False) when
        no input was logged with refs. (An input a resumed run logged after the registration counts when
        none came before: lineage lists it under ``data_after_registration``, by the two hosts' clocks,
        which serving does not rely on.)"""
        _check_version_info(info)
        with self._db.connect() as conn:
            inp = _trained_on(conn, [info.run_id]).get(info.run_id)
        return (inp["refs"], bool(inp.get("full_feature_names"))) if inp else ([], False)

    def feature_views_in_use(self) -> list[tuple[str, int]]:
        """The feature view versions, as (view, definition version), that the model versions in staging or
        production, or with an alias, were trained on: what predict reads online for them, and what
        ``p.features.materialize()`` keeps fresh besides each view's latest version.

        >>> p.models.feature_views_in_use()  # doctest: +SKIP
        [('user_txn', 1), ('user_txn', 2)]
        """
        live = sa.or_(ModelVersion.stage.in_(("staging", "production")),
                      ModelVersion.id.in_(sa.select(ModelAlias.version_id)))
        with self._db.connect() as conn:
            trained_on = _trained_on(conn, sa.select(ModelVersion.run_id).where(live).scalar_subquery())
        used = {(ref.view, ref.version) for inp in trained_on.values() for ref in map(parse_ref, inp["refs"])
                if ref.version is not None}
        return sorted(used)

    def lineage(self, name: str, *, version: int | None = None, stage: str | None = None,
                alias: str | None = None, verify: bool = False) -> dict[str, Any]:
        """Which version, trained by which run on what data: everything in one dict (see ``lineage.py``)."""
        from .lineage import build_lineage

        require_bool("verify", verify)
        return build_lineage(self, self._runs, self._features, self._artifacts,
                             self.resolve(name, version=version, stage=stage, alias=alias), verify=verify)


def _trained_on(conn: Any, run_ids: Any) -> dict[str, dict[str, Any]]:
    """Per run of ``run_ids`` (a list or a subquery), the feature_refs record of its first input logged with feature
    refs: the training data of the versions registered from it."""
    first: dict[str, dict[str, Any]] = {}
    for run_id, refs in conn.execute(sa.select(RunInput.run_id, RunInput.feature_refs)
                                     .where(RunInput.run_id.in_(run_ids)).order_by(RunInput.id)):
        if run_id not in first and refs.get("refs"):
            first[run_id] = refs
    return first


def _version_info(name: str, row: Any, aliases: Sequence[str]) -> ModelVersionInfo:
    """A ModelVersion row (all its columns) and its aliases as the public record."""
    return ModelVersionInfo(name, row.version, row.stage, row.run_id, row.artifact, row.registered_by,
                            row.created_at, row.description, tuple(aliases), row.artifact_sha256)
