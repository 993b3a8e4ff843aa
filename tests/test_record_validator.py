"""The one check of records read back, shared by the SQLite, Redis and NATS stores."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowdsl._records import NodeRecord, RunRecord, RunStatus
from flowdsl.backends import _validate as v

times = st.floats(allow_nan=False, allow_infinity=False, width=64)
texts = st.text(max_size=20)
json_texts = st.sampled_from(['{"a": 1}', "[1, 2]", '"x"', "null", "3.5"])


@st.composite
def run_records(draw: st.DrawFn) -> RunRecord:
    return RunRecord(
        run_id=draw(texts),
        flow=draw(texts),
        flow_ref=draw(texts),
        fingerprint=draw(texts),
        inputs=draw(json_texts),
        status=draw(st.sampled_from(list(RunStatus))),
        created_at=draw(times),
        updated_at=draw(times),
        result=draw(st.none() | json_texts),
        error=draw(st.none() | texts),
        failed_node=draw(st.none() | texts),
        code=draw(st.dictionaries(texts, texts, max_size=3)),
    )


@given(run_records())
def test_a_run_record_read_back_is_the_record_written(record: RunRecord) -> None:
    fields = attrs.asdict(record)
    fields["status"] = record.status.value
    assert v.run_record(record.run_id, fields) == record


@given(
    st.builds(
        NodeRecord,
        node_id=texts,
        value=json_texts,
        attempts=st.integers(0, 100),
        started_at=times,
        finished_at=times,
        code=texts,
        usage=st.none() | st.dictionaries(texts, st.integers(), max_size=2),
    )
)
def test_a_node_record_read_back_is_the_record_written(record: NodeRecord) -> None:
    assert v.node_record("r1", record.node_id, attrs.asdict(record)) == record


def _run_fields(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "run_id": "r1",
        "flow": "f",
        "flow_ref": "m:f",
        "fingerprint": "x",
        "inputs": "{}",
        "status": "running",
        "created_at": 1.0,
        "updated_at": 2,
        "result": None,
        "error": None,
        "failed_node": None,
        "code": {},
    }
    return {**fields, **changes}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"run_id": "r2"}, "the record is of run 'r2'"),
        ({"flow": b"f"}, "flow is bytes, not text"),
        ({"inputs": "{"}, "the stored inputs is not valid JSON"),
        ({"status": "exploded"}, "status 'exploded' is not a known run status"),
        ({"created_at": "noon"}, "created_at is str, not a timestamp"),
        ({"updated_at": math.inf}, "updated_at is inf, not a timestamp"),
        ({"updated_at": True}, "updated_at is bool, not a timestamp"),
        ({"code": {"a": 1}}, "code is not a mapping of node ids to code hashes"),
    ],
)
def test_a_malformed_run_field_is_named(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(v.Malformed, match=f"^{problem}$"):
        v.run_record("r1", _run_fields(**changes))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"value": "{"}, "the stored value is not valid JSON"),
        ({"attempts": -1}, "attempts is -1, not a count"),
        ({"attempts": 1.0}, "attempts is 1.0, not a count"),
        ({"code": None}, "code is NoneType, not text"),
        ({"usage": [1]}, "usage is not a mapping"),
    ],
)
def test_a_malformed_node_field_is_named(changes: dict[str, object], problem: str) -> None:
    fields = {"value": "1", "attempts": 1, "started_at": 0, "finished_at": 1, "code": "c"}
    with pytest.raises(v.Malformed, match=f"^{problem}$"):
        v.node_record("r1", "n", {"usage": None, **fields, **changes})


def test_corrupted_names_run_node_and_what_to_do() -> None:
    error = v.corrupted("sqlite:///x.db", "r1", "n", "attempts is -1, not a count", "Restore it")
    assert str(error) == (
        "node 'n': run 'r1' in sqlite:///x.db is corrupted: attempts is -1, not a count. Restore it"
    )
