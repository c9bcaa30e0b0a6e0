"""JSON-valued fields: free-form payloads (run input, agent output) carried inside typed records.

On the Avro wire they are strings holding JSON, so the contracts in ``schemas/`` stay fixed while the
payloads are whatever each workflow's agents define.

Every JSON document calmrun reads from Kafka goes through ``loads``, which is total: it returns a value or
raises ``DecodeError`` (``LimitExceededError`` for a document over a limit), never ``RecursionError`` or
the ``ValueError`` of a too-long integer. Depth and number length are measured on the text before
``json.loads`` runs, because Python's parser fails on them rather than refusing them.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from calmrun.errors import DecodeError, LimitExceededError
from calmrun.jsontypes import AvroJson, JsonDict, JsonValue

__all__ = [
    "AvroJson",
    "JsonDict",
    "JsonValue",
    "check_text",
    "check_value",
    "json_depth_of_text",
    "loads",
]

JSON_DEPTH_CEILING = 240
"""Deepest JSON a calmrun record may hold (pydantic's serializer refuses 255 levels); what is read back.

Limits on input and output stay at most ``MAX_CONFIGURABLE_DEPTH``, so the records that wrap them (an
event's ``data`` holds a step's output) stay under this ceiling.
"""

MAX_CONFIGURABLE_DEPTH = 200

NUMBER_DIGITS_CEILING = 4000
"""Longest run of digits in a number: CPython refuses to convert integers of more than 4300 digits."""


# A JSON string token (escapes included); in valid JSON each match is exactly one string.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def loads(
    data: bytes | str,
    *,
    max_depth: int = JSON_DEPTH_CEILING,
    max_digits: int = NUMBER_DIGITS_CEILING,
    what: str = "JSON",
) -> Any:
    """Parse one JSON document (UTF-8) after checking its nesting depth and number lengths.

    Refused too: ``NaN``/``Infinity``, numbers that overflow a float, and strings holding lone
    surrogates, since none of them could be written to Avro and read back as the same value. Duplicate
    keys keep the last value (as ``json.loads`` does).

    Raises:
        LimitExceededError: deeper than ``max_depth`` or a number longer than ``max_digits``.
        DecodeError: not UTF-8, not JSON, or a value JSON cannot carry.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        text.encode("utf-8")  # a str may hold lone surrogates already
    except UnicodeError as exc:
        raise DecodeError(f"{what} is not UTF-8 text: {exc}") from exc
    check_text(text, max_depth=max_depth, max_digits=max_digits, what=what)
    try:
        if text.startswith("\ufeff"):  # what json.loads refuses before it decodes; the decoder does not
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise DecodeError(f"invalid {what}: {exc}") from exc
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DecodeError(f"{what} holds a lone surrogate (\\ud800-\\udfff), not text") from exc
    return value


def check_text(text: str, *, max_depth: int, max_digits: int, what: str) -> None:
    """Check JSON text against ``loads``' limits without parsing it.

    Cheap tests on the raw text first: too few brackets or digits anywhere cannot be over a limit. Only a
    suspect text is measured exactly, outside its strings (digits or brackets inside strings count for
    nothing).

    Raises:
        LimitExceededError: deeper than ``max_depth`` or a number longer than ``max_digits``.
    """
    long_digits = len(text) > max_digits and _longest_digits(text, max_digits) > max_digits
    many_brackets = text.count("[") + text.count("{") > max_depth
    if long_digits or many_brackets:
        skeleton = _STRING.sub('""', text)  # what is left outside strings: structure and numbers
        digits = _longest_digits(skeleton, max_digits) if long_digits else 0
        if digits > max_digits:
            raise LimitExceededError(
                "max_number_digits", actual=digits, maximum=max_digits, what=f"a number in {what}"
            )
        depth = json_depth_of_text(skeleton) if many_brackets else 0
        if depth > max_depth:
            raise LimitExceededError("max_json_depth", actual=depth, maximum=max_depth, what=what)


def json_depth_of_text(skeleton: str) -> int:
    """Deepest nesting of ``[``/``{`` in ``skeleton`` (JSON text with its strings removed)."""
    brackets = _NOT_BRACKET.sub("", skeleton)
    if not brackets:
        return 0
    if brackets.count("[") + brackets.count("{") <= 1:
        return 1
    return max(accumulate(_STEP[c] for c in brackets))


def check_value(value: Any, *, max_depth: int, max_digits: int, what: str) -> None:
    """Check an already decoded JSON value against the same limits as ``loads`` (iteratively).

    Raises:
        LimitExceededError: nested deeper than ``max_depth`` or an integer longer than ``max_digits``.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth + 1 > max_depth:
                raise LimitExceededError("max_json_depth", actual=depth + 1, maximum=max_depth, what=what)
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, int) and not isinstance(v, bool):
            digits = int(v.bit_length() * 0.30103) + 1  # at most one more than the decimal digits
            if digits > max_digits + 1:
                raise LimitExceededError("max_number_digits", actual=digits, maximum=max_digits, what=what)


def _longest_digits(skeleton: str, limit: int) -> int:
    m = re.search(f"[0-9]{{{limit + 1},}}", skeleton)
    return 0 if m is None else len(m.group())


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    f = float(s)
    if not math.isfinite(f):
        raise ValueError(f"number {s[:40]} does not fit a 64-bit float")
    return f


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
"""What ``json.loads`` with these hooks builds on every call (a decoder and its scanner): made once."""
