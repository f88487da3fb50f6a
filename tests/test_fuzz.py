"""Property-based fuzzing of both JSONL readers (Hypothesis): whatever a line holds, the
readers raise nothing but the project's own `InvalidInput` (naming the line), and an import
either writes the whole line or nothing."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback import db, io, store
from feedback.errors import InvalidInput
from feedback.jsonl import parse_line

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63)
           | st.floats(allow_nan=False) | st.text(max_size=30)
           | st.sampled_from(["", "  ", "\ud800", "x" * 8001, "clear", "too verbose"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
votes = (values | st.sampled_from([1, -1, 0, None, True])
         | st.fixed_dictionaries({}, optional={
             "value": st.sampled_from([1, -1, None, 2]) | values,
             "reasons": st.lists(st.sampled_from(list(store.UP_REASONS + store.DOWN_REASONS)))
             | values,
             "comment": st.text(max_size=20) | values}))
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "bot"]) | values,
     "content": st.text(max_size=40) | values},
    optional={"vote": votes, "rejected": st.lists(st.text(max_size=20)) | values,
              "model_version": st.text(max_size=20) | values, "extra": values})
records = st.fixed_dictionaries(
    {"messages": st.lists(messages, max_size=5) | values},
    optional={"user": st.text(max_size=20) | values, "title": st.text(max_size=20) | values})
lines = records.map(json.dumps) | st.text(max_size=60) | values.map(json.dumps)
fuzz = settings(max_examples=10_000, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@fuzz
@given(lines)
def test_the_import_reader_raises_only_its_own_errors(line):
    try:
        io._parse_line(7, parse_line(7, line))
    except InvalidInput as exc:
        assert str(exc).startswith("line 7")


@fuzz
@given(lines)
def test_the_generate_reader_raises_only_its_own_errors(line):
    from serving.__main__ import InputError, check_row
    try:
        check_row(7, parse_line(7, line))
    except (InvalidInput, InputError) as exc:
        assert str(exc).startswith("line 7")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(records)
def test_an_import_writes_a_whole_line_or_nothing(tmp_path_factory, record):
    src = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    src.write_text(json.dumps(record) + "\n")
    with db.transaction() as s:
        before = io.stats(session=s)
    try:
        with db.transaction(write=True) as s:
            io.import_jsonl(session=s, path=src)
        imported = True
    except InvalidInput:
        imported = False
    with db.transaction() as s:
        after = io.stats(session=s)
    assert (after["conversations"] - before["conversations"]) == (1 if imported else 0)
    if not imported:
        assert after == before
