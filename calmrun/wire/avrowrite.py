"""Avro binary writers compiled once per schema: the same bytes as fastavro, in a fraction of its time.

fastavro's ``schemaless_writer`` walks the schema dict on every call and validates each branch of a union
before it picks one; a worker encodes about 18 records a run (events, tasks, states), and that walk was
the largest single item of its CPU (docs/performance.md). The schemas calmrun writes use a small part of
Avro: records, maps, arrays, ``null``, ``boolean``, ``long``, ``double``, ``string``, ``bytes`` and
two-branch unions with ``null``. For those a writer is built once from closures; any other schema gets
none (``compile_writer`` returns None) and is written by fastavro.

A writer takes only the values whose bytes it is sure of: exact types (an ``int`` for a long, a ``float``
for a double, a ``list`` for an array), every record field present, a long within 64 bits. Anything else
raises ``Unsure`` and the caller writes that record with fastavro, which then writes or refuses it as
before. So whatever a compiled writer returns equals fastavro's output (tests/wire/test_avrowrite.py).

A record's writer may also take an instance of the pydantic model it was derived from (``models``, given by
``calmrun.wire.codec``), read from the instance's fields as ``model_dump`` would return them, each passed
through its converter to Avro (a JSON field to its string, a float field to float) as ``to_avro`` would: the
same bytes without building the dict first (``model_dump`` and the converters were nearly half of an
encode). Only the exact model class is taken; anything else is ``Unsure``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

Write = Callable[[Any, bytearray], None]
Convert = Callable[[Any], Any] | None
Models = Mapping[str, tuple[type, tuple[tuple[str, Convert], ...]]]
"""Record full name -> (model class, (field, converter to Avro or None) for each field the converter
changes): what a record's writer takes besides a dict (see the module docstring)."""

_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_DOUBLE = struct.Struct("<d").pack


class Unsure(Exception):
    """A value this writer does not take: write the record with fastavro instead."""


class NotCompilable(Exception):
    """A schema using a part of Avro that no writer here covers."""


def write_long(v: Any, out: bytearray) -> None:
    """Zig-zag varint, as fastavro writes a long."""
    if type(v) is not int:
        raise Unsure
    if 0 <= v < 64:  # one byte (sizes, small counters): most longs a worker writes
        out.append(v << 1)
        return
    if not _LONG_MIN <= v <= _LONG_MAX:
        raise Unsure
    n = (v << 1) ^ (v >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_null(v: Any, out: bytearray) -> None:
    if v is not None:
        raise Unsure


def _write_boolean(v: Any, out: bytearray) -> None:
    if type(v) is not bool:
        raise Unsure
    out.append(1 if v else 0)


def _write_double(v: Any, out: bytearray) -> None:
    if type(v) is not float:
        raise Unsure
    out += _DOUBLE(v)


def _write_string(v: Any, out: bytearray) -> None:
    if type(v) is not str:
        raise Unsure
    try:
        b = v.encode()
    except UnicodeEncodeError:  # a lone surrogate: fastavro says what it says
        raise Unsure from None
    n = len(b)
    if n < 64:
        out.append(n << 1)
    else:
        write_long(n, out)
    out += b


def _write_bytes(v: Any, out: bytearray) -> None:
    if type(v) is not bytes:
        raise Unsure
    write_long(len(v), out)
    out += v


_PRIMITIVES: dict[str, Write] = {
    "null": _write_null,
    "boolean": _write_boolean,
    "long": write_long,
    "double": _write_double,
    "string": _write_string,
    "bytes": _write_bytes,
}


def compile_writer(
    schema: Any, named: Mapping[str, Any] | None = None, models: Models | None = None
) -> Write | None:
    """A writer for values of ``schema`` (a parsed or plain schema), or None if it uses what none covers;
    its records also take instances of ``models`` (see the module docstring)."""
    try:
        return _compile(schema, dict(named or {}), "", models or {})
    except NotCompilable:
        return None


def _full(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _compile(schema: Any, named: dict[str, Any], namespace: str, models: Models) -> Write:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        ref = named.get(_full(schema, namespace))
        if ref is None:
            raise NotCompilable(schema)
        return _compile(ref, {k: v for k, v in named.items() if v is not ref}, namespace, models)
    if isinstance(schema, list):
        return _union(schema, named, namespace, models)
    if not isinstance(schema, dict) or "logicalType" in schema:
        raise NotCompilable(str(schema))
    kind = schema.get("type")
    if kind == "record":
        return _record(schema, named, namespace, models)
    if kind == "map":
        return _map(_compile(schema["values"], named, namespace, models))
    if kind == "array":
        return _array(_compile(schema["items"], named, namespace, models))
    if isinstance(kind, str) and kind in _PRIMITIVES and len(schema) == 1:
        return _PRIMITIVES[kind]
    raise NotCompilable(str(kind))


def _union(branches: list[Any], named: dict[str, Any], namespace: str, models: Models) -> Write:
    """``[null, X]`` or ``[X, null]``: fastavro picks null for None, else X (the only other branch)."""
    if len(branches) != 2 or "null" not in branches or branches[0] == branches[1]:
        raise NotCompilable(str(branches))
    null_at = branches.index("null")
    other = _compile(branches[1 - null_at], named, namespace, models)
    if other is _write_null:
        raise NotCompilable(str(branches))
    none_tag, some_tag = (0, 2) if null_at == 0 else (2, 0)  # zig-zag of the branch index

    def write(v: Any, out: bytearray) -> None:
        if v is None:
            out.append(none_tag)
        else:
            out.append(some_tag)
            other(v, out)

    return write


def _record(schema: dict[str, Any], named: dict[str, Any], namespace: str, models: Models) -> Write:
    namespace = schema.get("namespace", namespace)
    full = _full(str(schema["name"]), namespace)
    if full in named:  # defined twice, or a record that contains itself: left to fastavro
        raise NotCompilable(full)
    named[full] = None  # a reference to it from inside it finds no schema: not compilable
    items = tuple((f["name"], _compile(f["type"], named, namespace, models)) for f in schema["fields"])
    named[full] = schema
    model, converts = models.get(full, (None, ()))
    convert = dict(converts)
    from_model = tuple((name, w, convert.get(name)) for name, w in items)

    def write(v: Any, out: bytearray) -> None:
        t = type(v)
        try:
            if t is dict:
                for name, w in items:
                    w(v[name], out)
            elif t is model:
                fields = v.__dict__  # a pydantic model's field values, as model_dump reads them
                for name, w, conv in from_model:
                    w(fields[name] if conv is None else conv(fields[name]), out)
            else:
                raise Unsure
        except KeyError:  # a missing field: fastavro would write its default
            raise Unsure from None

    return write


def _map(values: Write) -> Write:
    def write(v: Any, out: bytearray) -> None:
        if type(v) is not dict:
            raise Unsure
        if v:
            write_long(len(v), out)
            for k, x in v.items():
                _write_string(k, out)
                values(x, out)
        out.append(0)

    return write


def _array(items: Write) -> Write:
    def write(v: Any, out: bytearray) -> None:
        if type(v) is not list:
            raise Unsure
        if v:
            write_long(len(v), out)
            for x in v:
                items(x, out)
        out.append(0)

    return write
