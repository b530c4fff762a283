"""``since`` with nanoseconds (a pandas Timestamp) is not cut down to the log's microseconds: a row logged 1 ns
before it was read as after it (and skew checked a row it had been told to leave out)."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa

from mlplat.serving.served_log import ServedLog


def test_since_keeps_its_nanoseconds(tmp_path):
    log = ServedLog(tmp_path)
    log.add("m", 1, "default", {"k": [1]}, {"f": [1.0]}, {"out": [0.5]}, refs=["v@1:f"],
            types={"model_version": pa.int64(), "f": pa.float64()})
    logged = pd.Timestamp(log.read("m").column("request_time")[0].as_py())
    assert log.read("m", since=logged).num_rows == 1  # at the row's time: in
    assert log.read("m", since=logged + pd.Timedelta(1, "ns")).num_rows == 0  # 1 ns after it: out (was in)
    log.close()
