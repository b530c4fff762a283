"""The model registry on SQLite and PostgreSQL: versions, approvals, concurrency, aliases, lineage, CLI."""
from __future__ import annotations

import json
import threading
from datetime import timedelta
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import mlplat as mp
from mlplat.cli import cli


class Scorer(torch.nn.Module):
    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.linear.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


def trained_run(p, bias: float = 0.0, experiment: str = "fraud") -> str:
    with p.runs.start(experiment, params={"bias": bias}) as run:
        run.log_metric("val_auc", 0.9)
        run.log_model(Scorer(bias), "model", example_input=torch.zeros(2, 3))
    return run.id


@pytest.fixture
def p(platform):
    return platform


def test_register_versions_and_load(p):
    v1 = p.models.register("fraud", trained_run(p, 0.0), registered_by="bob")
    v2 = p.models.register("fraud", trained_run(p, 5.0), description="bias 5")
    assert (v1.version, v2.version, v1.stage, v1.registered_by) == (1, 2, "none", "bob")
    x = torch.ones(1, 3)
    assert p.models.load("fraud", version=2)(x).item() > p.models.load("fraud", version=1)(x).item()
    assert p.models.get("fraud").version == 2  # no selector: the latest
    assert [m["name"] for m in p.models.list()] == ["fraud"] and p.models.list()[0]["latest"] == 2
    with pytest.raises(mp.NotFoundError, match="has no model artifact 'weights'"):
        p.models.register("fraud", v1.run_id, artifact="weights")
    with pytest.raises(mp.NotFoundError, match="unknown run"):
        p.models.register("fraud", "nope")
    with pytest.raises(mp.DataError, match="model name"):
        p.models.register("bad name!", v1.run_id)
    with pytest.raises(mp.NotFoundError, match="unknown model 'ghost'; known: fraud$"):
        p.models.get("ghost")
    for typo in ("frad", "Fraud"):  # said only "unknown model 'frad'"
        with pytest.raises(mp.NotFoundError, match=f"unknown model '{typo}'; did you mean 'fraud'\\?"):
            p.models.get(typo)
    with pytest.raises(mp.NotFoundError, match="has no version 9"):
        p.models.load("fraud", version=9)
    with pytest.raises(mp.DataError, match="one of version=, stage= or alias="):
        p.models.get("fraud", version=1, stage="production")


def test_approval_rules(p):
    run_id = trained_run(p)
    v = p.models.register("fraud", run_id, registered_by="bob")
    with pytest.raises(mp.DataError, match="needs an approver"):
        p.models.promote("fraud", v.version, "production")
    assert p.models.promote("fraud", v.version, "staging", notes="try it").stage == "staging"  # no approver needed
    p.models.set_policy("fraud", require_distinct_approver=True)
    with pytest.raises(mp.DataError, match="approver other than the registrant \\('bob'\\)"):
        p.models.promote("fraud", v.version, "production", approved_by="bob")
    assert p.models.get("fraud", stage="staging").version == v.version  # refused: nothing changed
    assert p.models.promote("fraud", v.version, "production", approved_by="alice", actor="carol").stage == "production"
    with pytest.raises(mp.DataError, match="stage 'prod' is not one of"):
        p.models.promote("fraud", v.version, "prod")
    history = p.models.history("fraud")
    assert [(h.from_stage, h.to_stage, h.approved_by) for h in history] == [
        ("", "none", None), ("none", "staging", None), ("staging", "production", "alice")]
    assert history[-1].actor == "carol" and history[1].notes == "try it"


def test_promoting_archives_the_previous_production_version(p):
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias))
    p.models.promote("fraud", 1, "production", approved_by="alice")
    p.models.promote("fraud", 2, "production", approved_by="alice", notes="better")
    assert p.models.get("fraud", version=1).stage == "archived"
    assert p.models.get("fraud", stage="production").version == 2
    moves = [(h.version, h.from_stage, h.to_stage) for h in p.models.history("fraud")]
    assert (1, "production", "archived") in moves and moves[-1] == (2, "none", "production")


def test_lineage_approvals_are_this_versions_production_approvals(p):
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias))
    p.models.promote("fraud", 1, "staging", approved_by="carol")  # not an approval: staging needs none
    p.models.promote("fraud", 1, "production", approved_by="alice")
    p.models.promote("fraud", 2, "production", approved_by="bob")  # archives v1: bob approved v2, not v1
    archived = p.models.history("fraud", version=1)[-1]
    assert (archived.to_stage, archived.approved_by, archived.notes) == ("archived", None, "replaced by version 2")
    approvals = lambda v: [(a["stage"], a["approved_by"]) for a in p.models.lineage("fraud", version=v)["approvals"]]
    assert approvals(1) == [("production", "alice")]
    assert approvals(2) == [("production", "bob")]


def test_re_approving_the_version_in_production_is_recorded_as_an_approval(p):
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias), registered_by="bob")
    p.models.promote("fraud", 1, "production", approved_by="alice", notes="Q1 review")
    again = p.models.promote("fraud", 1, "production", approved_by="carol", actor="dan", notes="Q2 re-review")
    assert again.stage == "production" and p.models.resolve("fraud").version == 1  # nothing moved
    last = p.models.history("fraud", version=1)[-1]
    assert (last.from_stage, last.to_stage, last.approved_by, last.actor, last.notes) == (
        "production", "production", "carol", "dan", "Q2 re-review")
    approvals = lambda v: [(a["stage"], a["approved_by"], a["notes"])
                           for a in p.models.lineage("fraud", version=v)["approvals"]]
    assert approvals(1) == [("production", "alice", "Q1 review"), ("production", "carol", "Q2 re-review")]
    # a re-approval obeys the policy like any promotion, and a refused one records nothing
    p.models.set_policy("fraud", require_distinct_approver=True)
    before = p.models.history("fraud")
    with pytest.raises(mp.DataError, match="approver other than the registrant"):
        p.models.promote("fraud", 1, "production", approved_by="bob")
    with pytest.raises(mp.DataError, match="needs an approver"):
        p.models.promote("fraud", 1, "production")
    assert p.models.history("fraud") == before
    # the next version's approval still does not count as one of v1's
    p.models.promote("fraud", 2, "production", approved_by="erin")
    assert approvals(1) == [("production", "alice", "Q1 review"), ("production", "carol", "Q2 re-review")]
    assert approvals(2) == [("production", "erin", "")]
    # below production too: a repeated promotion moves nothing and is recorded with its notes
    p.models.promote("fraud", 1, "staging")
    p.models.promote("fraud", 1, "staging", notes="retested")
    assert [(h.from_stage, h.to_stage, h.notes) for h in p.models.history("fraud", version=1)][-2:] == [
        ("archived", "staging", ""), ("staging", "staging", "retested")]
    assert p.models.get("fraud", version=1).stage == "staging"


@pytest.mark.parametrize("registrant, approver", [
    ("bob", "bob "), ("bob", "Bob"), ("bob", "\tbob"), ("bob", " BOB\n"), ("bob", "\uff42\uff4f\uff42"),  # fullwidth
    ("Bob ", "bob"), ("ann marie", "Ann  Marie"),
    # invisible format characters: zero-width space, zero-width joiner, word joiner, soft hyphen, bidi mark
    ("bob", "b\u200bob"), ("bob", "bo\u200db"), ("bob", "\u2060bob"), ("bob", "b\u00adob"), ("bob", "\u200ebob"),
])
def test_distinct_approver_policy_ignores_case_and_whitespace(p, registrant, approver):
    p.models.create("fraud", require_distinct_approver=True)
    p.models.register("fraud", trained_run(p), registered_by=registrant)
    before = p.models.history("fraud")
    with pytest.raises(mp.DataError, match="approver other than the registrant .* names the same person"):
        p.models.promote("fraud", 1, "production", approved_by=approver)
    assert p.models.history("fraud") == before and p.models.get("fraud", version=1).stage == "none"


def _refused_without_a_trace(p, message: str, **promote) -> None:
    """promote("fraud", 1, "production", **promote) is a DataError matching ``message`` that changes nothing."""
    before, stages = p.models.history("fraud"), [v.stage for v in p.models.versions("fraud")]
    with pytest.raises(mp.DataError, match=message):
        p.models.promote("fraud", 1, "production", **promote)
    assert p.models.history("fraud") == before and [v.stage for v in p.models.versions("fraud")] == stages


@pytest.mark.parametrize("approver, actor", [("alice", "bob"), ("ALICE ", None), ("al\u200bice", "bob")])
def test_distinct_approver_policy_refuses_the_registrant_as_approver_whoever_promotes(p, approver, actor):
    p.models.create("fraud", require_distinct_approver=True)
    p.models.register("fraud", trained_run(p), registered_by="alice")
    _refused_without_a_trace(p, "approver other than the registrant \\('alice'\\).* names the same person.*"
                                "have someone else review and approve v1", approved_by=approver, actor=actor)


def test_distinct_approver_policy_lets_the_registrant_carry_out_an_approved_promotion(p, monkeypatch):
    monkeypatch.setattr("mlplat.models.registry._user", lambda: "alice")  # the registrant's own shell
    p.models.create("fraud", require_distinct_approver=True)
    p.models.register("fraud", trained_run(p))
    # as a pull request's author merges once reviewed: the approver is the second pair of eyes
    assert p.models.promote("fraud", 1, "production", approved_by="bob").stage == "production"
    p.models.promote("fraud", 1, "production", approved_by="carol", actor="dan", notes="Q2 re-review")
    _refused_without_a_trace(p, "approver other than the registrant", approved_by="Alice", actor="dan")  # re-approval
    assert [(a["approved_by"], a["by"]) for a in p.models.lineage("fraud")["approvals"]] == [
        ("bob", "alice"), ("carol", "dan")]


def test_notes_and_descriptions_up_to_the_limit_are_stored_as_given(p):
    longest = "\u00e9\U0001f642 line\n" * 1250  # 10000 characters, multi-byte in UTF-8
    assert len(longest) == 10_000
    v = p.models.register("fraud", trained_run(p), description=longest)
    p.models.create("other", description=longest)
    p.models.promote("fraud", 1, "staging", notes=longest)
    assert p.models.get("fraud", version=1).description == longest == v.description
    assert p.models.history("fraud")[-1].notes == longest
    assert [m["description"] for m in p.models.list()] == ["", longest]


def test_user_names_are_stored_without_surrounding_whitespace(p):
    v = p.models.register("fraud", trained_run(p), registered_by=" dana\t")
    assert v.registered_by == "dana"
    p.models.promote("fraud", 1, "production", approved_by="  alice ", actor=" carol\n")
    p.models.set_alias("fraud", "champion", 1, actor=" erin ")
    assert [(h.actor, h.approved_by) for h in p.models.history("fraud")] == [
        ("dana", None), ("carol", "alice"), ("erin", None)]
    assert p.models.lineage("fraud")["approvals"][0]["approved_by"] == "alice"
    p.models.promote("fraud", 1, "staging", approved_by="  ")  # a blank approver is no approver
    assert p.models.history("fraud")[-1].approved_by is None


def test_resolve_means_production_for_a_bare_name(p):
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias))
    with pytest.raises(mp.NotFoundError, match="no version in stage 'production'"):
        p.models.resolve("fraud")  # get() would answer the latest, v2
    assert p.models.get("fraud").version == 2
    p.models.promote("fraud", 1, "production", approved_by="alice")
    assert p.models.resolve("fraud").version == 1
    assert p.models.resolve("fraud", version=2).version == 2
    assert p.models.resolve("fraud", stage="none").version == 2


def test_eight_concurrent_promotions_leave_exactly_one_in_production(database_url, tmp_path):
    home = tmp_path / "home"
    with mp.Platform(home, database_url=database_url) as p:
        run_id = trained_run(p)
        for _ in range(8):
            p.models.register("fraud", run_id)
    errors, barrier = [], threading.Barrier(8)

    def promote(version: int) -> None:
        try:
            with mp.Platform(home, database_url=database_url) as other:
                barrier.wait()
                other.models.promote("fraud", version, "production", approved_by=f"approver{version}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with mp.Platform(home, database_url=database_url) as p:
        stages = [v.stage for v in p.models.versions("fraud")]
        assert stages.count("production") == 1 and stages.count("archived") == 7
        promotions = [h for h in p.models.history("fraud") if h.to_stage == "production"]
        archived = [h for h in p.models.history("fraud") if h.to_stage == "archived"]
        assert len(promotions) == 8 and len(archived) == 7  # every step recorded


def _race(count: int, work) -> list:
    """Run ``work()`` in ``count`` threads released together; each one's result or exception."""
    results, barrier = [], threading.Barrier(count)

    def one() -> None:
        barrier.wait()
        try:
            results.append(work())
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_first_registrations_of_a_new_model_each_get_a_version(p):
    run_id = trained_run(p)
    for attempt in range(3):  # the race is narrow: a few new models make it likely to be hit
        versions = _race(6, lambda name=f"new{attempt}": p.models.register(name, run_id).version)
        assert sorted(versions) == [1, 2, 3, 4, 5, 6]
        created = _race(4, lambda name=f"made{attempt}": p.models.create(name))
        refused = [r for r in created if r is not None]
        assert created.count(None) == 1 and len(refused) == 3
        assert all(isinstance(r, mp.DataError) and "already exists" in str(r) for r in refused), refused


@pytest.mark.parametrize("call, message", [
    (lambda m, run_id: m.set_alias("fraud", "a" * 59, 1), "alias 'a{59}' is invalid: .* at most 58"),
    (lambda m, run_id: m.register("fraud", run_id, registered_by="u" * 256), "registered_by must be a user name"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", approved_by="u" * 256), "approved_by must be a user name"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", actor="u" * 256), "actor must be a user name"),
    (lambda m, run_id: m.set_alias("fraud", "champion", 1, actor="u" * 256), "actor must be a user name"),
    (lambda m, run_id: m.promote("fraud", "1", "staging"), "version must be a version number .*got '1'"),
    (lambda m, run_id: m.set_alias("fraud", "champion", True), "version must be a version number"),
    (lambda m, run_id: m.get("fraud", version="1"), "version must be a version number"),
    # beyond the 32-bit version column: an mlplat error on both backends, not OverflowError or a driver error
    (lambda m, run_id: m.promote("fraud", 2**70, "staging"), "version must be a version number .*at most 2147483647"),
    (lambda m, run_id: m.set_alias("fraud", "champion", 2**31), "version must be a version number"),
    (lambda m, run_id: m.get("fraud", version=2**63), "version must be a version number"),
    (lambda m, run_id: m.history("fraud", version=2**70), "version must be a version number"),
    (lambda m, run_id: m.history("fraud", version="1"), "version must be a version number"),
    (lambda m, run_id: m.get("fraud", alias=5), "alias must be a string such as 'champion', got 5"),
    (lambda m, run_id: m.delete_alias("fraud", None), "alias must be a string"),
    (lambda m, run_id: m.get("fraud", stage=["production"]), "stage \\['production'\\] is not one of"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", notes=5), "notes must be a string .*got 5"),
    (lambda m, run_id: m.set_alias("fraud", "champion", 1, notes=b"x"), "notes must be a string"),
    (lambda m, run_id: m.delete_alias("fraud", "champion", notes=5), "notes must be a string"),
    (lambda m, run_id: m.register("fraud", run_id, description=5), "description must be a string .*got 5"),
    (lambda m, run_id: m.create("other", description=None), "description must be a string .*got None"),
    (lambda m, run_id: m.create("other", require_distinct_approver="no"), "require_distinct_approver must be True"),
    (lambda m, run_id: m.set_policy("fraud", require_distinct_approver="yes"), "require_distinct_approver must be"),
    (lambda m, run_id: m.set_policy("fraud", require_distinct_approver=True, actor=" "), "actor must be a user name"),
    (lambda m, run_id: m.set_policy("fraud", require_distinct_approver=True, notes=5), "notes must be a string"),
    (lambda m, run_id: m.promote(None, 1, "staging"), "model name None is invalid"),
    (lambda m, run_id: m.get(5), "model name 5 is invalid"),
    (lambda m, run_id: m.history(["fraud"]), "model name \\['fraud'\\] is invalid"),
    (lambda m, run_id: m.register("fraud", run_id, registered_by="   "), "registered_by must be a user name, got"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", actor=""), "actor must be a user name, got the blank"),
    (lambda m, run_id: m.promote("fraud", 1, "production", approved_by=" \t"), "needs an approver"),
    # a run id is a string such as run.id: anything else is a DataError naming run_id, not "unknown run"
    (lambda m, run_id: m.register("fraud", 5), "run_id must be a run id, the string run.id .*got 5 of type int"),
    (lambda m, run_id: m.register("fraud", None), "run_id must be a run id, .*got None"),
    (lambda m, run_id: m.register("fraud", SimpleNamespace(id=run_id)), "run_id must be .*pass run.id, not the run"),
    (lambda m, run_id: m.register("fraud", [run_id]), "run_id must be a run id"),
    (lambda m, run_id: m.register("fraud", run_id + "0"), "run_id '[0-9a-f]{33}' is not a run id: .*at most 32"),
    (lambda m, run_id: m.register("fraud", run_id[:8] + "\x00"), "run_id .* is not a run id"),
    (lambda m, run_id: m.register("fraud", " "), "run_id ' ' is not a run id"),
    (lambda m, run_id: m.lineage("fraud", version=1, verify="yes"), "verify must be True or False, got 'yes'"),
    (lambda m, run_id: m.lineage("fraud", version=1, verify=None), "verify must be True or False, got None"),
    (lambda m, run_id: m.lineage("fraud", version=1, verify=1), "verify must be True or False, got 1"),
    # notes and descriptions: at most 10000 characters, and no NUL (PostgreSQL cannot store one)
    (lambda m, run_id: m.promote("fraud", 1, "staging", notes="n" * 10_001),
     "notes is 10001 characters long, more than the 10000 allowed: shorten it"),
    (lambda m, run_id: m.promote("fraud", 1, "production", approved_by="alice", notes="n" * 10**6),
     "notes is 1000000 characters long"),
    (lambda m, run_id: m.set_alias("fraud", "champion", 1, notes="n" * 10_001), "notes is 10001 characters long"),
    (lambda m, run_id: m.delete_alias("fraud", "champion", notes="n" * 10_001), "notes is 10001 characters long"),
    (lambda m, run_id: m.register("fraud", run_id, description="d" * 10_001),
     "description is 10001 characters long, more than the 10000 allowed"),
    (lambda m, run_id: m.create("other", description="d" * 10_001), "description is 10001 characters long"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", notes="a\x00b"), "notes holds a NUL character"),
    (lambda m, run_id: m.register("fraud", run_id, description="\x00"), "description holds a NUL character"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", notes=b"x" * 10**6), "notes must be a string .*got b'xx"),
    # user names with control characters (a NUL, an escape, DEL) would also slip past the approver comparison
    (lambda m, run_id: m.promote("fraud", 1, "production", approved_by="ali\x00ce"),
     "approved_by holds a NUL character"),
    (lambda m, run_id: m.register("fraud", run_id, registered_by="bob\x1b"), "registered_by .* holds a control"),
    (lambda m, run_id: m.promote("fraud", 1, "staging", actor="\x7fbob"), "actor .* holds a control character"),
])
def test_values_the_columns_cannot_hold_are_refused_on_both_backends(p, call, message):
    run_id = trained_run(p)
    p.models.register("fraud", run_id)
    before = p.models.history("fraud")
    with pytest.raises(mp.DataError, match=message):
        call(p.models, run_id)
    assert p.models.history("fraud") == before and [v.version for v in p.models.versions("fraud")] == [1]
    assert p.models.get("fraud", version=1).stage == "none" and p.models.get("fraud", version=1).aliases == ()
    assert [m["name"] for m in p.models.list()] == ["fraud"]  # no model created either
    assert p.models.policy("fraud") == {"require_distinct_approver": False, "changes": []}


def test_aliases(p):
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias))
    p.models.set_alias("fraud", "champion", 1)
    p.models.set_alias("fraud", "challenger", 2)
    assert p.models.get("fraud", alias="champion").version == 1
    p.models.set_alias("fraud", "champion", 2, notes="swap")
    assert p.models.get("fraud", alias="champion").aliases == ("challenger", "champion")
    assert p.models.versions("fraud") == [p.models.get("fraud", version=1), p.models.get("fraud", version=2)]
    assert [v.aliases for v in p.models.versions("fraud")] == [(), ("challenger", "champion")]
    assert p.models.load("fraud", alias="champion") is not None
    p.models.delete_alias("fraud", "challenger")
    with pytest.raises(mp.NotFoundError, match="has no alias 'challenger'"):
        p.models.get("fraud", alias="challenger")
    with pytest.raises(mp.DataError, match="alias 'production' is invalid"):
        p.models.set_alias("fraud", "production", 1)
    assert [(h.from_stage, h.to_stage) for h in p.models.history("fraud", version=2)][-2:] == [
        ("", "alias:champion"), ("alias:challenger", "")]


def test_deleting_an_alias_is_recorded_in_history(p):
    p.models.register("fraud", trained_run(p))
    p.models.set_alias("fraud", "champion", 1, actor="alice")
    p.models.delete_alias("fraud", "champion", actor="bob", notes="retired")
    moves = [(h.version, h.from_stage, h.to_stage, h.actor, h.notes) for h in p.models.history("fraud")][1:]
    assert moves == [(1, "", "alias:champion", "alice", ""), (1, "alias:champion", "", "bob", "retired")]
    with pytest.raises(mp.NotFoundError, match="has no alias 'champion'"):
        p.models.delete_alias("fraud", "champion")
    assert len(p.models.history("fraud")) == 3  # the refused call recorded nothing


def test_moving_an_alias_records_its_loss_in_the_history_of_the_version_that_held_it(p):
    """The version losing an alias had no record of it: its history still ended holding the alias."""
    for bias in (0.0, 1.0):
        p.models.register("fraud", trained_run(p, bias))
    p.models.set_alias("fraud", "champion", 1, actor="alice")
    p.models.set_alias("fraud", "champion", 1, actor="alice")  # again at the same version: no loss to record
    p.models.set_alias("fraud", "champion", 2, actor="bob", notes="better auc")
    moves = [(h.version, h.from_stage, h.to_stage, h.actor, h.notes) for h in p.models.history("fraud")
             if "alias" in h.from_stage + h.to_stage]
    assert moves == [(1, "", "alias:champion", "alice", ""), (1, "", "alias:champion", "alice", ""),
                     (1, "alias:champion", "", "bob", "moved to version 2: better auc"),
                     (2, "", "alias:champion", "bob", "better auc")]


@pytest.mark.parametrize("name", ["\u200b", "\u2800", "\xad", "\u200b\u200d", " \u2060 "])
def test_a_person_named_by_invisible_characters_only_is_no_person(p, name):
    """Zero-width spaces, a soft hyphen or a blank Braille pattern passed "production needs an approver" (and
    the distinct-approver policy compares names without them: an approver of nothing)."""
    p.models.create("fraud", require_distinct_approver=True)
    with pytest.raises(mp.DataError, match="registered_by must be a user name, got the blank"):
        p.models.register("fraud", trained_run(p), registered_by=name)
    p.models.register("fraud", trained_run(p), registered_by="bob")
    _refused_without_a_trace(p, "needs an approver", approved_by=name)
    with pytest.raises(mp.DataError, match="actor must be a user name, got the blank"):
        p.models.promote("fraud", 1, "staging", actor=name)


def test_policy_changes_are_recorded_who_when_why_and_shown_in_lineage(p):
    # turning the distinct-approver rule off left no trace: anyone could, unseen, before approving their own model
    p.models.create("fraud", require_distinct_approver=True)
    v = p.models.register("fraud", trained_run(p), registered_by="bob")
    p.models.set_policy("fraud", require_distinct_approver=True, actor="carol")  # already so: nothing recorded
    p.models.set_policy("fraud", require_distinct_approver=False, actor="bob", notes="hotfix")
    p.models.promote("fraud", v.version, "production", approved_by="bob")  # allowed now, and visibly why
    policy = p.models.policy("fraud")
    assert policy["require_distinct_approver"] is False
    assert [(c["require_distinct_approver"], c["by"], c["notes"]) for c in policy["changes"]] == [
        (True, policy["changes"][0]["by"], "created"), (False, "bob", "hotfix")]
    assert policy["changes"][0]["at"] <= policy["changes"][1]["at"]
    assert p.models.lineage("fraud")["policy"] == policy
    with pytest.raises(mp.NotFoundError):
        p.models.policy("nope")
    p.models.register("plain", trained_run(p))  # created by register: the default, no change recorded
    assert p.models.policy("plain") == {"require_distinct_approver": False, "changes": []}


def test_a_lookup_by_an_alias_holding_nul_is_a_data_error_on_every_backend(p):
    p.models.register("fraud", trained_run(p))
    with pytest.raises(mp.DataError, match="NUL"):  # PostgreSQL refused the query; SQLite said "no alias"
        p.models.get("fraud", alias="champ\x00ion")
    with pytest.raises(mp.DataError, match="NUL"):
        p.models.delete_alias("fraud", "champ\x00ion")


@pytest.mark.parametrize("info", ["fraud", 1, None, {"run_id": "x", "artifact": "model"}])
def test_artifact_meta_and_training_features_name_a_wrong_argument(p, info):
    for call in (p.models.artifact_meta, p.models.training_features):
        with pytest.raises(mp.DataError, match="ModelVersionInfo"):  # was AttributeError: no attribute 'run_id'
            call(info)


@pytest.fixture
def lineage_setup(p, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ts = pa.timestamp("us", "UTC")
    pq.write_table(pa.table({"user_id": [1, 2, 3], "event_timestamp": pa.array([0, 0, 0], ts),
                             "txn_count": [5, 6, 7]}), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    view = mp.FeatureView("user_txn", entities=[user], ttl=timedelta(days=1), schema=[mp.Field("txn_count", mp.Int64)],
                          source=mp.ParquetSource(src))
    p.features.apply([user, view])
    labels = pa.table({"user_id": [1, 2, 3, 4], "event_timestamp": pa.array([10, 10, 10, 10], ts),
                       "label": [0, 1, 0, 1]})
    train = p.features.get_historical_features(labels, ["user_txn:txn_count"])
    with p.runs.training("fraud", config={"lr": 0.01}, data=train, features=["user_txn:txn_count"],
                         model=Scorer(), example_input=torch.zeros(1, 3)) as t:
        t.epoch(val_auc=0.93)
    v = p.models.register("fraud", t.id, registered_by="bob")
    p.models.promote("fraud", v.version, "production", approved_by="alice", notes="passes review")
    return src, train, t.id


def test_lineage_answers_in_one_call(p, lineage_setup):
    _, train, run_id = lineage_setup
    info = p.models.lineage("fraud", stage="production")
    assert (info["model"], info["version"], info["stage"], info["registered_by"]) == ("fraud", 1, "production", "bob")
    assert info["run"]["id"] == run_id and info["run"]["experiment"] == "fraud"
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["params"] == {"lr": "0.01"} and info["metrics"] == {"val_auc": 0.93}
    [data] = info["data"]
    assert data["content_hash"] == mp.runs.table_hash(train) and data["row_count"] == 4
    assert data["feature_refs"] == ["user_txn@1:txn_count"] and data["feature_views"] == {"user_txn": [1]}
    assert data["schema"]["fields"][-1]["name"] == "txn_count"
    assert info["approvals"] == [{"stage": "production", "approved_by": "alice", "by": info["history"][-1]["by"],
                                  "at": info["history"][-1]["at"], "notes": "passes review"}]
    assert [h["to"] for h in info["history"]] == ["none", "production"]
    assert info["artifact"]["torch_version"] == torch.__version__ and len(info["artifact"]["sha256"]) == 64
    json.dumps(info)  # plain JSON all the way
    assert p.models.training_features(p.models.resolve("fraud")) == (data["feature_refs"], False)
    p.models.register("fraud", trained_run(p))  # a run that logged no input
    assert p.models.training_features(p.models.get("fraud", version=2)) == ([], False)


def test_lineage_names_every_version_of_a_view_an_input_used(p, lineage_setup, tmp_path):
    """feature_views was a dict of view -> one version: the last ref's won and user_txn@1 was dropped."""
    ts = pa.timestamp("us", "UTC")
    (tmp_path / "src2").mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "event_timestamp": pa.array([0, 0], ts), "txn_count": [5, 6],
                             "amount": [1.5, 2.5]}), tmp_path / "src2" / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    p.features.apply([mp.FeatureView("user_txn", entities=[user], ttl=timedelta(days=1),
                                     source=mp.ParquetSource(tmp_path / "src2"),
                                     schema=[mp.Field("txn_count", mp.Int64), mp.Field("amount", mp.Float64)])])
    refs = ["user_txn@2:amount", "user_txn@1:txn_count"]
    labels = pa.table({"user_id": [1, 2], "event_timestamp": pa.array([10, 10], ts)})
    with p.runs.start("fraud") as run:
        run.log_input(p.features.get_historical_features(labels, refs), "train", feature_refs=refs)
        run.log_model(Scorer(), "model", example_input=torch.zeros(1, 3))
    p.models.register("fraud", run.id)
    [data] = p.models.lineage("fraud", version=2, verify=True)["data"]
    assert data["feature_views"] == {"user_txn": [1, 2]} and data["verification"]["matches"]


def test_lineage_verify_rebuilds_the_training_data(p, lineage_setup):
    src, _, _ = lineage_setup
    check = p.models.lineage("fraud", verify=True)["data"][0]["verification"]
    assert check["checked"] and check["matches"] and check["rows"] == 4
    # the offline data changes under the model: a newer row for user 2
    pq.write_table(pa.table({"user_id": [2], "event_timestamp": pa.array([5], pa.timestamp("us", "UTC")),
                             "txn_count": [60]}), src / "b.parquet")
    check = p.models.lineage("fraud", verify=True)["data"][0]["verification"]
    assert check["checked"] and not check["matches"]


def _one_view(p, tmp_path, view: str, field, values: list, unit: str):
    """A view of one feature of users 1 and 2 (a row each at time 0, in ``unit``), applied; its source folder."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "event_timestamp": pa.array([0, 0], pa.timestamp(unit, "UTC")),
                             field.name: values}), src / "a.parquet")
    user = mp.Entity("user", join_keys=["user_id"])
    p.features.apply([user, mp.FeatureView(view, entities=[user], ttl=timedelta(days=1), schema=[field],
                                           source=mp.ParquetSource(src))])
    return src


def test_lineage_verify_matches_unchanged_data_laid_out_otherwise_than_retrieval(p, tmp_path):
    """A label appended after retrieval (retrieval puts the entity columns first), entity times in seconds
    (Parquet reads them back as milliseconds) and a column named with "__" that is no feature: the data is
    as logged, so verify says it matches (it said MISMATCH, and `lineage --verify` exited 3)."""
    src = _one_view(p, tmp_path, "user_txn", mp.Field("txn_count", mp.Int64), [5, 6], "s")
    entity = pa.table({"user_id": [1, 2], "event_timestamp": pa.array([10, 10], pa.timestamp("s", "UTC")),
                       "label__v2": [0.5, 0.25]})
    train = p.features.get_historical_features(entity, ["user_txn:txn_count"])
    train = train.append_column("label", pa.array([0, 1]))
    assert train.column_names == ["user_id", "event_timestamp", "label__v2", "txn_count", "label"]
    with p.runs.start("fraud") as run:
        run.log_input(train, feature_refs=["user_txn:txn_count"])
        run.log_model(Scorer(), "model", example_input=torch.zeros(1, 3))
    p.models.register("fraud", run.id)
    check = p.models.lineage("fraud", version=1, verify=True)["data"][0]["verification"]
    assert check["checked"] and check["matches"], check
    pq.write_table(pa.table({"user_id": [2], "event_timestamp": pa.array([5], pa.timestamp("s", "UTC")),
                             "txn_count": [60]}), src / "b.parquet")  # the data changes: a mismatch
    assert not p.models.lineage("fraud", version=1, verify=True)["data"][0]["verification"]["matches"]


def test_a_feature_named_with_a_double_underscore_is_logged_with_plain_names(p, tmp_path):
    """log_input recorded full_feature_names=True for the plain-named column of feature 'amt__7d', and verify
    rebuilt 'txn__amt__7d': a false mismatch."""
    _one_view(p, tmp_path, "txn", mp.Field("amt__7d", mp.Float64), [1.5, 2.5], "us")
    train = p.features.get_historical_features(pa.table({"user_id": [1, 2], "event_timestamp": pa.array(
        [10, 10], pa.timestamp("us", "UTC"))}), ["txn:amt__7d"])
    with p.runs.start("fraud") as run:
        run.log_input(train, feature_refs=["txn:amt__7d"])
        run.log_model(Scorer(), "model", example_input=torch.zeros(1, 3))
    p.models.register("fraud", run.id)
    assert p.models.training_features(p.models.get("fraud", version=1)) == (["txn@1:amt__7d"], False)
    assert p.models.lineage("fraud", version=1, verify=True)["data"][0]["verification"]["matches"]


def test_lineage_cli(p, lineage_setup, database_url):
    home = str(p.settings.home)
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", home, "--database-url", database_url, "models", "lineage", "fraud",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["approvals"][0]["approved_by"] == "alice"
    human = runner.invoke(cli, ["--home", home, "--database-url", database_url, "models", "lineage", "fraud",
                                "--verify"], env={"COLUMNS": "200"})
    assert human.exit_code == 0, human.output
    for text in ("fraud v1 (production)", "alice", "user_txn@1:txn_count", "blake2b-256:", "matches"):
        assert text in human.output
    missing = runner.invoke(cli, ["--home", home, "--database-url", database_url, "models", "lineage", "ghost"])
    assert missing.exit_code == 1 and missing.stderr == "mlplat: error: unknown model 'ghost'; known: fraud\n"
