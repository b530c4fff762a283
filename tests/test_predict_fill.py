"""predict fills a missing input value as the model was logged to (``log_model(fill_null=)``), or refuses."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
import torch

import mlplat as mp
from mlplat.db.models import RunArtifact
from mlplat.serving.shaping import check_cast
from test_serving import NOW, served  # noqa: F401 - the session's platform: txn:count, txn:amount of users 1-3

COLUMNS = ["count", "amount", "basket"]  # "basket" is a request-time input
REFS = ["txn:count", "txn:amount"]


class Echo(torch.nn.Module):
    """Gives back what it got: predict's output shows the model's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1


def _train(p) -> pa.Table:
    labels = pa.table({"user_id": [1, 2], "event_timestamp": pa.array([NOW, NOW], pa.timestamp("us", "UTC"))})
    return p.features.get_historical_features(labels, REFS)


def _log(p, name: str, *, dtype=torch.float32, columns=COLUMNS, promote: bool = True, **kwargs) -> int:
    with p.runs.start(name) as run:
        run.log_input(_train(p), "train", feature_refs=REFS)
        run.log_model(Echo(), "model", example_input=torch.zeros(2, len(columns), dtype=dtype), columns=columns,
                      **kwargs)
    version = p.models.register(name, run.id).version
    if promote:
        p.models.promote(name, version, "production", approved_by="reviewer")
    return version


def _logged_rows(p, name: str) -> int:
    p.serving.served_log.flush()
    return p.serving.served_features(name).num_rows


def test_a_number_is_what_the_model_gets_for_every_missing_value(served):  # noqa: F811
    _log(served, "fill_num", fill_null=-1.0)
    rows = [{"user_id": 1, "basket": 2.0}, {"user_id": 42, "basket": None}]  # 42: not in the online store
    out = served.serving.predict("fill_num", rows, backend=served.serving.local_backend())
    assert out["output__0"] == [[3.0, 10.0, 2.0], [-1.0, -1.0, -1.0]]  # it got 0 before
    assert out.features == {"count": [3, None], "amount": [10.0, None]}  # as served, before filling
    log = served.serving.served_features("fill_num")
    assert log.column("count").to_pylist() == [3, None] and log.column("input.basket").to_pylist() == [2.0, None]
    assert served.models.lineage("fill_num")["artifact"]["fill_null"] == -1.0
    _log(served, "fill_int", dtype=torch.int64, fill_null=-7)  # an integer input gets the whole number
    out = served.serving.predict("fill_int", [{"user_id": 42, "basket": 5}], backend=served.serving.local_backend())
    assert out["output__0"] == [[-7, -7, 5]]


def test_a_mapping_fills_the_columns_it_names_and_refuses_the_others(served):  # noqa: F811
    with served.runs.training("fill_map", data=_train(served), features=REFS) as t:  # the helper forwards it
        meta = t.model(Echo(), example_input=torch.zeros(2, 3), columns=COLUMNS,
                       fill_null={"count": -1, "amount": 0.5})
    assert meta["fill_null"] == {"count": -1, "amount": 0.5}
    served.models.register("fill_map", t.id)
    backend = served.serving.local_backend()
    out = served.serving.predict("fill_map", [{"user_id": 42, "basket": 3.0}], version=1, backend=backend)
    assert out["output__0"] == [[-1.0, 0.5, 3.0]]
    before = _logged_rows(served, "fill_map")
    with pytest.raises(mp.DataError, match=r"request-time input 'basket' has no value for 1 of 2 entity rows: "
                                           r"\(user_id=2\).*fill_null="):
        served.serving.predict("fill_map", [{"user_id": 1, "basket": 1.0}, {"user_id": 2, "basket": None}],
                               version=1, backend=backend)
    assert _logged_rows(served, "fill_map") == before


def test_none_refuses_naming_the_model_columns_and_entities_and_serves_nothing(served):  # noqa: F811
    _log(served, "fill_none", fill_null=None)
    backend = served.serving.local_backend()
    ok = served.serving.predict("fill_none", [{"user_id": 1, "basket": 1.0}], backend=backend)  # nothing missing
    assert ok["output__0"] == [[3.0, 10.0, 1.0]]
    before = _logged_rows(served, "fill_none")
    rows = [{"user_id": 1, "basket": 1.0}] + [{"user_id": 100 + i, "basket": 1.0} for i in range(7)]
    with pytest.raises(mp.DataError) as err:
        served.serving.predict("fill_none", rows, backend=backend)
    message = str(err.value)
    assert "fill_none v1" in message and "'count' has no value for 7 of 8 entity rows" in message
    assert "'amount'" in message and "(user_id=100), (user_id=101)" in message and "and 2 more" in message
    assert "p.features.materialize" in message and "fill_null=" in message and "user_id=1)" not in message
    assert _logged_rows(served, "fill_none") == before  # refused before inference: nothing logged


def test_a_model_logged_before_fill_null_was_recorded_still_gets_0(served):  # noqa: F811
    _log(served, "fill_legacy", fill_null=-1.0)
    info = served.models.get("fill_legacy", stage="production")
    with served.runs._db.connect(write=True) as conn:  # the metadata as log_model wrote it before: no fill_null
        row = (RunArtifact.run_id == info.run_id) & (RunArtifact.path == info.artifact)
        meta = conn.execute(sa.select(RunArtifact.meta).where(row)).scalar_one()
        del meta["fill_null"]
        conn.execute(sa.update(RunArtifact).where(row).values(meta=meta))
    out = served.serving.predict("fill_legacy", [{"user_id": 42, "basket": None}],
                                 backend=served.serving.local_backend())
    assert out["output__0"] == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("fill_null, message", [
    ("-1", "must be a finite number.*got '-1' \\(str\\)"),
    (True, "got True \\(bool\\)"),
    (math.nan, "is nan: a fill value must be finite"),
    (math.inf, "is inf: a fill value must be finite"),
    ({"count": -1.0, "nope": 0.0}, "names column 'nope', which is not one of the model's columns"),
    ({"count": "x"}, "fill_null\\['count'\\] must be a finite number"),
    ({1: 0.0}, "keys must be column names"),
    (1e39, "beyond what the model's float32 input holds"),
])
def test_bad_values_are_refused_at_log_time_and_nothing_is_stored(served, fill_null, message):  # noqa: F811
    with served.runs.start("fill_bad") as run:
        with pytest.raises(mp.DataError, match=message):
            run.log_model(Echo(), "model", example_input=torch.zeros(2, 3), columns=COLUMNS, fill_null=fill_null)
        with pytest.raises(mp.DataError, match="0.5, which the model's int64 input cannot hold"):
            run.log_model(Echo(), "model", example_input=torch.zeros(2, 3, dtype=torch.int64), fill_null=0.5)
    assert served.runs.get(run.id).artifacts == []


def test_the_plan_holds_each_versions_rule_and_checks_what_log_time_could_not(served):  # noqa: F811
    v1 = _log(served, "fill_plan", fill_null=-1.0)
    v2 = _log(served, "fill_plan", fill_null={"count": -5, "basket": 9.0}, promote=False)
    predictor = served.serving._predictor
    assert predictor.plan("fill_plan", version=v1).fills == (-1.0, -1.0, -1.0)
    assert predictor.plan("fill_plan", version=v2).fills == (-5.0, None, 9.0)  # an int fill for a float input
    backend = served.serving.local_backend()
    for _ in range(2):  # the cached plan serves each version its own rule
        assert served.serving.predict("fill_plan", [{"user_id": 42, "basket": 1.0}], backend=backend,
                                      version=v1)["output__0"] == [[-1.0, -1.0, 1.0]]
        with pytest.raises(mp.DataError, match="'amount' has no value"):
            served.serving.predict("fill_plan", [{"user_id": 42, "basket": None}], backend=backend, version=v2)
    with pytest.raises(mp.DataError, match="names column 'basket'"):  # columns given: checked at log time
        _log(served, "fill_late", columns=["count", "amount"], fill_null={"basket": 1.0}, promote=False)
    # logged without columns=, the mapping cannot be checked until predict knows them (the features' names)
    with served.runs.start("fill_late") as run:
        run.log_input(_train(served), "train", feature_refs=REFS)
        run.log_model(Echo(), "model", example_input=torch.zeros(2, 2), fill_null={"basket": 1.0})
    v = served.models.register("fill_late", run.id).version
    with pytest.raises(mp.ServingError, match="fill_late v1 cannot be served with the fill_null.*'basket'"):
        served.serving.predict("fill_late", [{"user_id": 1}], backend=backend, version=v)


def test_the_training_helper_logs_its_fill_null_and_refuses_a_bad_one_before_the_run(served):  # noqa: F811
    with served.runs.training("fill_helper", data=_train(served), features=REFS, model=Echo(),
                              example_input=torch.zeros(2, 3), columns=COLUMNS, fill_null=-2.0) as t:
        t.epoch(loss=0.5)
    served.models.register("fill_helper", t.id)
    assert served.models.lineage("fill_helper", version=1)["artifact"]["fill_null"] == -2.0  # it logged 0.0
    out = served.serving.predict("fill_helper", [{"user_id": 42, "basket": None}], version=1,
                                 backend=served.serving.local_backend(), log=False)
    assert out["output__0"] == [[-2.0, -2.0, -2.0]]
    runs = len(served.runs.search("fill_helper_bad"))
    with pytest.raises(mp.DataError, match="fill_null names column 'nope'"):  # not after hours of training
        served.runs.training("fill_helper_bad", model=Echo(), columns=COLUMNS, fill_null={"nope": 1.0})
    assert len(served.runs.search("fill_helper_bad")) == runs == 0  # no run was started


def test_the_training_helper_refuses_a_fill_its_example_inputs_type_cannot_hold_before_the_run(served):  # noqa: F811
    # example_input= gives the input's type at start: a fill the end-of-run log_model refuses (after the training)
    # is refused before the run starts
    with pytest.raises(mp.DataError, match="0.5, which the model's int64 input cannot hold"):
        served.runs.training("fill_helper_int", model=Echo(), example_input=torch.zeros(2, 3, dtype=torch.int64),
                             columns=COLUMNS, fill_null=0.5)
    assert len(served.runs.search("fill_helper_int")) == 0  # no run was started


@pytest.mark.parametrize("basket, message", [
    (2.7, r"column 'basket' of cast_int v1's input is int64 but holds fractions \(e\.g\. 2\.7\)"),
    (-0.9, r"holds fractions \(e\.g\. -0\.9\)"),
    (1e19, r"is int64: its values must lie in \[-9223372036854775808, 9223372036854775807\], got 1\.0 to 1e\+19"),
    (2**70, r"is int64 and cannot hold 1180591620717411303424"),
    (math.inf, r"is int64 but holds NaN or infinity"),  # (a NaN is a missing value: filled, or refused as such)
    ("2", r"must hold numbers \(int64\), got '2'"),
    ([2], r"must hold numbers \(int64\), got \[2\]"),
])
def test_request_time_values_an_integer_input_cannot_hold_are_refused_not_truncated(served, basket,  # noqa: F811
                                                                                     message):
    try:  # one model for every case
        served.models.resolve("cast_int", version=1)
    except mp.NotFoundError:
        _log(served, "cast_int", dtype=torch.int64)
    backend = served.serving.local_backend()
    out = served.serving.predict("cast_int", [{"user_id": 1, "basket": 3.0}], backend=backend)  # a whole float
    assert out["output__0"] == [[3, 10, 3]]
    before = _logged_rows(served, "cast_int")
    with pytest.raises(mp.DataError, match=message):  # the model got 2 for 2.7 and 0 for -0.9 before
        served.serving.predict("cast_int", [{"user_id": 1, "basket": 1}, {"user_id": 1, "basket": basket}],
                               backend=backend)
    assert _logged_rows(served, "cast_int") == before


def test_a_float_input_refuses_strings_rather_than_parsing_them(served):  # noqa: F811
    _log(served, "cast_float")
    backend = served.serving.local_backend()
    with pytest.raises(mp.DataError, match=r"column 'basket' of cast_float v1's input must hold numbers "
                                           r"\(float32\), got '2\.5'"):  # numpy parsed it to 2.5 before
        served.serving.predict("cast_float", {"user_id": [1], "basket": ["2.5"]}, backend=backend)
    out = served.serving.predict("cast_float", {"user_id": [1], "basket": [True]}, backend=backend)
    assert out["output__0"] == [[3.0, 10.0, 1.0]]


def test_an_int_past_a_float_inputs_range_is_refused_by_name(served):  # noqa: F811
    try:
        served.models.resolve("cast_float", version=1)
    except mp.NotFoundError:
        _log(served, "cast_float")
    with pytest.raises(mp.DataError, match=r"column 'basket' of cast_float v1's input is float32 and cannot hold 1"):
        served.serving.predict("cast_float", {"user_id": [1], "basket": [10**400]},
                               backend=served.serving.local_backend())  # a raw OverflowError before


def test_a_value_a_float32_input_would_make_infinite_is_refused_and_an_infinity_passes(served):  # noqa: F811
    """1e300 went to a float32 model as infinity, unasked (the docs: a number the input type holds as it is)."""
    try:
        served.models.resolve("cast_float", version=1)
    except mp.NotFoundError:
        _log(served, "cast_float")
    backend = served.serving.local_backend()
    served.serving.predict("cast_float", {"user_id": [1], "basket": [3e38]}, backend=backend)  # it holds that
    before = _logged_rows(served, "cast_float")
    with pytest.raises(mp.DataError, match=r"column 'basket' of cast_float v1's input is float32 but holds 1e\+300, "
                                           r"past its largest value"):
        served.serving.predict("cast_float", {"user_id": [1, 1], "basket": [1.0, 1e300]}, backend=backend)
    assert _logged_rows(served, "cast_float") == before
    with pytest.raises(mp.DataError, match=r"input 'input__0' of model 'cast_float' is FP32 but holds -1e\+39"):
        backend.infer("cast_float", {"input__0": np.array([[1.0, 2.0, -1e39]])})  # float64 given
    out = served.serving.predict("cast_float", {"user_id": [1], "basket": [math.inf]}, backend=backend)
    assert out["output__0"] == [[3.0, 10.0, math.inf]]  # an infinity given is what the model gets
    largest = float(np.finfo(np.float32).max)  # and a value that rounds to float32's largest is that value
    out = served.serving.predict("cast_float", {"user_id": [1, 1], "basket": [largest * (1 + 2**-26), math.inf]},
                                 backend=backend)
    assert out["output__0"][0][2] == largest
    check_cast("x", "FP16", np.array([60000, 1]), np.dtype(np.float16))
    with pytest.raises(mp.DataError, match="x is FP16 but holds 70000, past its largest value"):
        check_cast("x", "FP16", np.array([70000, 1]), np.dtype(np.float16))  # an int became infinity too


def test_a_nan_or_a_left_out_request_input_is_missing_however_the_rows_come(served):  # noqa: F811
    """pandas turned a NaN into a null (filled, or refused) while a list of dicts gave the model the NaN; a row
    leaving the input out (as JSON leaves out a null field) was refused as if no row held the column."""
    pd = pytest.importorskip("pandas")
    _log(served, "fill_nan", fill_null=-1.0)
    _log(served, "fill_nan_strict", fill_null=None)
    backend = served.serving.local_backend()
    nan = float("nan")
    forms = {"list": [{"user_id": 1, "basket": nan}, {"user_id": 2, "basket": 2.0}],
             "left out": [{"user_id": 1}, {"user_id": 2, "basket": 2.0}],
             "columns": {"user_id": [1, 2], "basket": [np.float32(nan), 2.0]},
             "pandas": pd.DataFrame({"user_id": [1, 2], "basket": [nan, 2.0]}),
             "arrow": pa.table({"user_id": [1, 2], "basket": [nan, 2.0]}),  # a NaN in Arrow is no null
             "polars": pytest.importorskip("polars").DataFrame({"user_id": [1, 2], "basket": [nan, 2.0]})}
    for form, rows in forms.items():
        out = served.serving.predict("fill_nan", rows, backend=backend)
        assert out["output__0"] == [[3.0, 10.0, -1.0], [7.0, 99.5, 2.0]], form
        with pytest.raises(mp.DataError, match=r"'basket' has no value for 1 of 2 entity rows: \(user_id=1\)"):
            served.serving.predict("fill_nan_strict", rows, backend=backend)
    log = served.serving.served_features("fill_nan")
    assert log.column("input.basket").to_pylist() == [None, 2.0] * len(forms)  # logged as missing, not NaN
    with pytest.raises(mp.DataError, match="the model needs a column 'basket'"):  # no row holds it
        served.serving.predict("fill_nan", [{"user_id": 1}], backend=backend)


@pytest.mark.parametrize("call, message", [
    ({"variant": 0}, "variant must be a string.*got int 0"),  # the served log's flush dropped its batch
    ({"variant": None}, "variant must be a string.*got NoneType"),
    ({"variant": "a\x00b"}, "variant holds a NUL"),
    ({"backend": object()}, "backend must be a serving backend.*got object"),  # AttributeError
])
def test_a_variant_or_backend_of_the_wrong_kind_is_refused_and_nothing_is_logged(served, call, message):  # noqa: F811
    if not any(m["name"] == "fill_kinds" for m in served.models.list()):
        _log(served, "fill_kinds", fill_null=0.0)
    served.serving.predict("fill_kinds", [{"user_id": 1, "basket": 1.0}], backend=served.serving.local_backend())
    before = _logged_rows(served, "fill_kinds")
    with pytest.raises(mp.DataError, match=message):
        served.serving.predict("fill_kinds", [{"user_id": 1, "basket": 1.0}],
                               **{"backend": served.serving.local_backend(), **call})
    assert _logged_rows(served, "fill_kinds") == before


def test_outputs_given_as_one_string_are_refused_naming_the_fix(served):  # noqa: F811
    _log(served, "fill_outputs", fill_null=0.0)
    backend = served.serving.local_backend()
    with pytest.raises(mp.DataError, match=r"outputs must be a list of output names.*\['output__0'\]"):
        backend.infer("fill_outputs", {"input__0": np.zeros((1, 3), np.float32)}, outputs="output__0")
    out = backend.infer("fill_outputs", {"input__0": np.zeros((1, 3), np.float32)}, outputs=["output__0"])
    assert list(out) == ["output__0"]
