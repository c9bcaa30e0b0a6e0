"""Fuzzing every decoder of a Kafka record: whatever the bytes, a value or a calmrun error, in bounded time.

Hypothesis drives raw bytes, Avro single-object bytes with a known fingerprint and a random body, and
hostile JSON (deep, wide, huge numbers, odd Unicode, lone surrogates, duplicate keys, NaN, BOMs) through
the JSON reader, ``parse_request``, the record codec (every wire model, JSON fields included), the
dead-letter fitting and its views, and the step output check. What a decoder accepts must also encode and
read back the same: accepting a record the worker later fails to write is a crash deferred.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from calmrun.errors import CalmrunError, DecodeError, InvalidOutputError
from calmrun.limits import check_output
from calmrun.settings import LimitsSettings
from calmrun.streams.requests import parse_request
from calmrun.wire.avro import MARKER
from calmrun.wire.codec import RecordCodec, wire_models
from calmrun.wire.dlq import DlqRecord
from calmrun.wire.dlqview import entry_json, entry_line
from calmrun.wire.jsonfield import loads
from calmrun.workflow.events import RunCommand, RunRequest

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # big reprs

CODEC = RecordCodec(wire_models())
LIMITS = LimitsSettings()
FINGERPRINTS = [CODEC.avro._by_name[n][1] for n in CODEC.avro.names]  # marker + fingerprint per schema

# each input must be decided within this (generous for a shared 2-core CI box; typical inputs take < 5 ms)
FUZZ = settings(
    max_examples=int(os.environ.get("CALMRUN_FUZZ_EXAMPLES", "300")),  # more for a deeper local search
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- hostile JSON -------------------------------------------------------------------------------------

lone_surrogate = st.integers(0xD800, 0xDFFF).map(lambda c: f'"\\u{c:04x}"')
odd_text = st.text(
    alphabet=st.characters(codec=None, categories=None, exclude_categories=()), max_size=30
).map(lambda s: json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
huge_number = st.builds(
    lambda sign, n, frac, exp: sign + "9" * n + frac + exp,
    st.sampled_from(["", "-"]),
    st.sampled_from([1, 20, 999, 1000, 1001, 4300, 4301, 5000, 20_000]),
    st.sampled_from(["", ".5", "." + "1" * 5000]),
    st.sampled_from(["", "e5", "e999", "E-99999", "e+400"]),
)
constants = st.sampled_from(["NaN", "Infinity", "-Infinity", "null", "true", "false", "1e999", "-0"])
scalars = st.one_of(lone_surrogate, odd_text, huge_number, constants, st.integers().map(str))


def _obj(items: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"


json_text = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(st.one_of(odd_text, lone_surrogate), inner), max_size=6).map(_obj),
        # duplicate keys
        st.tuples(inner, inner).map(lambda kv: _obj([('"k"', kv[0]), ('"k"', kv[1])])),
    ),
    max_leaves=30,
)


@st.composite
def deep(draw: Any) -> str:
    """Nesting up to far past the recursion limit, arrays or objects, optionally under a request."""
    depth = draw(st.sampled_from([1, 63, 64, 65, 199, 200, 240, 241, 1000, 10_000, 50_000]))
    kind = draw(st.sampled_from(["array", "object", "mixed"]))
    leaf = draw(scalars)
    if kind == "array":
        doc = "[" * depth + leaf + "]" * depth
    elif kind == "object":
        doc = '{"a":' * depth + leaf + "}" * depth
    else:
        doc = '[{"a":' * (depth // 2) + leaf + "}]" * (depth // 2)
    if draw(st.booleans()):
        doc = '{"workflow":"lin","input":{"x":' + doc + "}}"
    return doc


wide = st.builds(
    lambda n, leaf: "[" + ",".join([leaf] * n) + "]",
    st.sampled_from([0, 1, 1_000, 30_000]),
    st.sampled_from(["1", "null", '"x"', "{}", "[[]]", '{"k":1,"k":2}', "-0.0e-0"]),
)
hostile_json = st.one_of(json_text, deep(), wide)
hostile_bytes = st.one_of(
    hostile_json.map(lambda s: s.encode("utf-8", "surrogatepass")),
    hostile_json.map(lambda s: b"\xef\xbb\xbf" + s.encode("utf-8", "replace")),  # UTF-8 BOM
    hostile_json.map(lambda s: s.encode("utf-16", "surrogatepass")),
    st.binary(max_size=2048),
    st.builds(lambda fp, body: fp + body, st.sampled_from(FINGERPRINTS), st.binary(max_size=512)),
    st.builds(lambda body: MARKER + body, st.binary(max_size=64)),
)
request_objects = st.builds(
    lambda wf, inp, extra: '{"workflow":' + wf + ',"input":' + inp + extra + "}",
    st.one_of(st.just('"lin"'), scalars),
    hostile_json,
    st.sampled_from(["", ',"run_id":"\\udc00"', ',"budget_usd":"NaN"', ',"budget_usd":1e999', ',"x":1']),
)


def _total(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a decoder; it returns a value or raises a calmrun error, nothing else."""
    try:
        return fn(*args, **kwargs)
    except CalmrunError:
        return None


# -- the JSON reader ------------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(hostile_bytes, hostile_json))
def test_json_loads_is_total(data: bytes | str) -> None:
    value = _total(loads, data, max_depth=LIMITS.max_json_depth, max_digits=LIMITS.max_number_digits)
    if value is not None:  # what is accepted can be written back as JSON and reads back equal
        assert loads(to_json(value)) == value


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("[" * 10_000 + "]" * 10_000, "max_json_depth"),
        ('{"a":' * 10_000 + "1" + "}" * 10_000, "max_json_depth"),
        ("9" * 5000, "max_number_digits"),
        ('{"n": 1.' + "0" * 5000 + "}", "max_number_digits"),
        ('"\\ud800"', "lone surrogate"),
        ("NaN", "NaN"),
        ("1e999", "64-bit float"),
        ('\ufeff{"a": 1}', "BOM"),  # what json.loads refuses itself: the decoder made once does not
        ('"\\ud83d\\ude00"', None),  # a proper pair is text
        ('{"a": 1, "a": 2}', None),
    ],
)
def test_json_loads_refuses_before_python_fails(doc: str, error: str | None) -> None:
    if error is None:
        assert loads(doc) is not None
        return
    with pytest.raises(DecodeError, match=error):
        loads(doc, max_depth=64, max_digits=1000)


# -- run requests ---------------------------------------------------------------------------------------

headers = st.lists(
    st.tuples(st.text(max_size=10), st.one_of(st.binary(max_size=40), st.just(b"\xff\xfe"))), max_size=3
)


@FUZZ
@given(
    st.one_of(st.none(), st.binary(max_size=40), st.just(b"\xff"), st.just(b"")),
    st.one_of(st.none(), hostile_bytes, request_objects.map(lambda s: s.encode("utf-8", "surrogatepass"))),
    headers,
)
def test_parse_request_is_total(
    key: bytes | None, value: bytes | None, hdrs: list[tuple[str, bytes]]
) -> None:
    got = _total(parse_request, key, value, CODEC, fallback_id="t-0-1", limits=LIMITS, headers=hdrs)
    if got is not None:
        run_id, body = got
        assert isinstance(run_id, str) and run_id
        run_id.encode("utf-8")  # strict: the run ID becomes a Kafka key and Avro strings
        assert isinstance(body, RunRequest | RunCommand)
        assert CODEC.decode(CODEC.encode(body)) == body


# -- Avro records ---------------------------------------------------------------------------------------


@FUZZ
@given(hostile_bytes)
def test_codec_decode_is_total(data: bytes) -> None:
    rec = _total(CODEC.decode, data)
    if rec is not None:
        assert CODEC.decode(CODEC.encode(rec)) == rec


def _raw(model: str, json_text: str) -> dict[str, Any]:
    """A record of ``model`` as fastavro writes it, with ``json_text`` in its JSON field."""
    base: dict[str, dict[str, Any]] = {
        "io.calmrun.RunRequest": {
            "workflow": "lin",
            "input": json_text,
            "run_id": "r",
            "tenant": "default",
            "budget_usd": None,
        },
        "io.calmrun.StepTask": {
            "run_id": "r",
            "workflow": "lin",
            "version": "1",
            "step": "s1",
            "attempt": 1,
            "kind": "run",
            "agent": "add_one",
            "model": None,
            "input": json_text,
            "tenant": "default",
            "issued_ms": 1,
            "timeout_s": 1.0,
        },
        "io.calmrun.RunEvent": {
            "run_id": "r",
            "seq": 1,
            "type": "run.requested",
            "at_ms": 1,
            "workflow": "lin",
            "version": "1",
            "tenant": "default",
            "step": None,
            "attempt": None,
            "data": json_text,
            "cost": None,
        },
    }
    return base[model]


@FUZZ
@given(st.sampled_from(["io.calmrun.RunRequest", "io.calmrun.StepTask", "io.calmrun.RunEvent"]), hostile_json)
def test_json_inside_avro_is_total(model: str, text: str) -> None:
    try:
        data = CODEC.avro.encode(model, _raw(model, text))
    except CalmrunError:
        return  # fastavro would not even write it (a lone surrogate in a string)
    rec = _total(CODEC.decode, data)
    if rec is not None:
        assert CODEC.decode(CODEC.encode(rec)) == rec
        if isinstance(rec, RunRequest):  # and the request path applies the configured limits on top
            _total(parse_request, b"r", data, CODEC, fallback_id="f", limits=LIMITS)


# -- dead letters and their views ----------------------------------------------------------------------

any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=50)


@FUZZ
@given(
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.one_of(st.none(), st.binary(max_size=200_000), hostile_bytes),
    st.dictionaries(any_text, st.binary(max_size=3000), max_size=40),
    any_text,
    st.sampled_from([1_024, 4_096, 65_536]),
)
def test_dead_letters_always_fit_and_show(
    key: bytes | None, value: bytes | None, hdrs: dict[str, bytes], error: str, budget: int
) -> None:
    rec = DlqRecord(
        reason="poison",
        error_type=error,
        error=error * 1000,
        traceback=error * 1000,
        workflow=error,
        source_topic="t",
        source_partition=0,
        source_offset=1,
        key=key,
        value=value,
        headers=hdrs,
        at_ms=1,
    ).fitted(budget)
    data = CODEC.encode(rec)
    assert len(data) <= budget + 40_000  # payload budget + capped texts (8000 chars, 4 bytes each) + fields
    back = CODEC.decode_as(data, DlqRecord)
    assert back == rec
    kept = (
        len(back.key or b"")
        + len(back.value or b"")
        + sum(len(k.encode()) + len(v) for k, v in back.headers.items())
    )
    assert kept <= budget
    for cut in back.truncated:
        assert cut.size > cut.kept and len(cut.sha256) == 64
    if value is not None and len(value) > budget:
        assert any(c.field == "value" for c in back.truncated)
    json.dumps(entry_json(back, CODEC))
    entry_line(back, CODEC, "now").encode("utf-8")


# -- step outputs ---------------------------------------------------------------------------------------


@FUZZ
@given(hostile_json)
def test_step_output_check_is_total(text: str) -> None:
    value = _total(loads, text)  # any value JSON can carry, within calmrun's ceilings
    if not isinstance(value, dict):
        return
    try:
        check_output(value, LIMITS, "agent")
    except InvalidOutputError:
        return
    task = RunRequest(workflow="lin", input=value)  # an accepted output must be storable and read back
    assert CODEC.decode(CODEC.encode(task)) == task


def test_step_output_over_the_limit_is_an_invalid_output() -> None:
    with pytest.raises(InvalidOutputError, match="max_output_bytes"):
        check_output({"text": "x" * LIMITS.max_output_bytes}, LIMITS, "agent")
    with pytest.raises(InvalidOutputError, match="max_json_depth"):
        check_output({"a": [[[[[[[[[[1]]]]]]]]]]}, LimitsSettings(max_json_depth=5), "agent")
    with pytest.raises(InvalidOutputError, match="max_number_digits"):
        check_output({"n": 10**1500}, LIMITS, "agent")
    with pytest.raises(InvalidOutputError, match="JSON"):
        check_output({"x": float("nan")}, LIMITS, "agent")
    with pytest.raises(InvalidOutputError, match="JSON"):
        check_output({"x": [1, float("-inf")]}, LIMITS, "agent")


def test_a_step_output_is_checked_without_parsing_it_back_unless_it_may_hold_nan() -> None:
    """to_json's text is valid JSON: only its limits are checked, and a text naming NaN or Infinity (as a
    number, or only inside a string) is parsed to tell which."""
    check_output({"note": "NaN and Infinity are words here", "n": [1, 2.5, None]}, LIMITS, "agent")
    with pytest.raises(InvalidOutputError, match="max_json_depth"):
        check_output({"x": "NaN", "a": [[[[[[1]]]]]]}, LimitsSettings(max_json_depth=5), "agent")
