"""Avro binary writers compiled once per schema: the same bytes as fastavro, in a fraction of its time.

fastavro's ``schemaless_writer`` walks the schema dict on every call and validates each branch of a union
before it picks one; a worker encodes about 18 records a run (events, tasks, states), and that walk was
the largest single item of its CPU (docs/performance.md). The schemas calmrun writes use a small part of
Avro: records, maps, arrays, ``null``, ``boolean``, ``long``, ``double``, ``string``, ``bytes`` and
two-branch unions with ``null``. For those a writer is built once (a record's as one generated function);
any other schema gets none (``compile_writer`` returns None) and is written by fastavro.

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
    fields = [(str(f["name"]), f["type"]) for f in schema["fields"]]
    writers = [_compile(t, named, namespace, models) for _, t in fields]
    named[full] = schema
    model, converts = models.get(full, (None, ()))
    return _generated(fields, writers, model, dict(converts), named, namespace)


# A record's writer is generated as one function (``exec``, as ``dataclasses`` makes ``__init__``): a field of
# a primitive type, or null or a primitive, is written inline, with the same checks as the functions above;
# any other calls its compiled writer. A call per field was most of the compiled writers' time.
_INLINE: dict[str, list[str]] = {
    "null": ["if x is not None: raise Unsure"],
    "boolean": ["if type(x) is not bool: raise Unsure", "out.append(1 if x else 0)"],
    "long": [
        "if type(x) is not int: raise Unsure",
        "if 0 <= x < 64: out.append(x << 1)",
        "else: write_long(x, out)",
    ],
    "double": ["if type(x) is not float: raise Unsure", "out += _DOUBLE(x)"],
    "string": [
        "if type(x) is not str: raise Unsure",
        "b = x.encode()",  # a lone surrogate raises UnicodeEncodeError: Unsure (see the function's end)
        "if len(b) < 64: out.append(len(b) << 1)",
        "else: write_long(len(b), out)",
        "out += b",
    ],
    "bytes": ["if type(x) is not bytes: raise Unsure", "write_long(len(x), out)", "out += x"],
}


def _primitive(schema: Any) -> str | None:
    if isinstance(schema, str) and schema in _INLINE:
        return schema
    if isinstance(schema, dict) and len(schema) == 1 and schema.get("type") in _INLINE:
        return str(schema["type"])
    return None


def _field_lines(schema: Any, k: int) -> list[str]:
    """The lines writing ``x`` (a field's value) of ``schema``: inline where it is primitive, or null or a
    primitive (the branches ``_union`` allows); else a call of the field's compiled writer ``w{k}``."""
    kind = _primitive(schema)
    if kind is not None:
        return _INLINE[kind]
    if isinstance(schema, list) and len(schema) == 2 and "null" in schema:
        other = _primitive(schema[1 - schema.index("null")])
        if other is not None and other != "null":
            none_tag, some_tag = (0, 2) if schema[0] == "null" else (2, 0)
            inner = ["    " + line for line in _INLINE[other]]
            return [f"if x is None: out.append({none_tag})", "else:", f"    out.append({some_tag})", *inner]
    return [f"w{k}(x, out)"]


def _generated(
    fields: list[tuple[str, Any]],
    writers: list[Write],
    model: type | None,
    converts: dict[str, Convert],
    named: dict[str, Any],
    namespace: str,
) -> Write:
    """The record's writer: a dict of its fields, or an instance of ``model`` (see the module docstring)."""
    env: dict[str, Any] = {"Unsure": Unsure, "write_long": write_long, "_DOUBLE": _DOUBLE, "model": model}
    from_dict, from_model = [], []
    for k, ((name, schema), w) in enumerate(zip(fields, writers, strict=True)):
        env[f"w{k}"] = w
        lines = _field_lines(schema, k)
        from_dict += [f"x = v[{name!r}]", *lines]
        conv = converts.get(name)
        if conv is not None:
            env[f"c{k}"] = conv
        from_model += [f"x = c{k}(f[{name!r}])" if conv is not None else f"x = f[{name!r}]", *lines]
    src = ["def write(v, out):", "    t = type(v)", "    try:", "        if t is dict:"]
    src += ["            " + line for line in from_dict or ["pass"]]
    if model is not None:
        src += ["        elif t is model:", "            f = v.__dict__  # the field values model_dump reads"]
        src += ["            " + line for line in from_model or ["pass"]]
    src += ["        else:", "            raise Unsure"]
    # a missing field: fastavro would write its default; a lone surrogate: fastavro says what it says
    src += ["    except (KeyError, UnicodeEncodeError):", "        raise Unsure from None"]
    exec("\n".join(src), env)  # the source is built here from the schema's own structure
    write: Write = env["write"]
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
