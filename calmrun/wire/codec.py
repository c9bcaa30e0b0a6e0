"""Wire codec: pydantic records <-> Avro bytes, with the Avro schemas derived from the models.

Records are written as Avro single-object encoding, or in Confluent's wire format (``wire.format:
confluent``, ``calmrun.wire.confluent``) for the records others read; decoding tells the two apart by the
first byte (``C3`` or ``00``).

The pydantic models are the one definition of every record; ``schemas/*.avsc`` are the same contracts
written out for other readers (``python -m calmrun.wire.codec`` rewrites them, a test fails when they drift).
JSON-valued fields (``calmrun.wire.jsonfield``) travel as JSON strings.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from calmrun.errors import CalmrunError, DecodeError, SerializationError
from calmrun.wire.avro import AvroCodec, is_single_object
from calmrun.wire.confluent import FRAMED, ConfluentFraming, is_confluent
from calmrun.wire.jsonfield import AvroJson, loads
from calmrun.wire.settings import WireSettings

NAMESPACE = "io.calmrun"
EARLIER_FIELDS: list[dict[str, set[str]]] = [
    {
        "DlqRecord": {"truncated"},
        "RunCommand": {"step", "comment", "name", "data", "reason", "to_version", "to_digest", "checked_seq"},
        "RunState": {"signals", "digest", "held"},  # people in the loop; pinned versions (0.3)
        "RunRequest": {"version"},
    },
    # loops and maps (0.4)
    {
        "StepState": {"iteration", "map"},
        "StepTask": {"iteration", "element"},
        "StepResultRecord": {"element"},
        "RunState": {"parent"},
        "RunRequest": {"parent"},
    },
    # tool calls that wait for approval inside an agent step
    {
        "StepState": {"tool_approval"},
        "StepTask": {"approvals", "first_issued_ms"},
        "RunCommand": {"tool_call_id"},
    },
    # no run.routed after a step without branches (history 2)
    {
        "RunState": {"history"},
    },
]
"""Fields appended to the models (a nested record's too), one set per release, oldest first: the
records each earlier release wrote must still decode."""
M = TypeVar("M", bound=BaseModel)
Convert = Callable[[Any], Any] | None  # None: the value passes unchanged


def _dumps(v: Any) -> str:
    return to_json(v).decode()


class _Derived:
    """Avro schema and converters for one model, derived from its field annotations."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self.defined: set[str] = set()
        # record full name -> the model and the converters of its fields read from an instance
        self.sources: dict[str, tuple[type, tuple[tuple[str, Convert], ...]]] = {}
        self._conv_cache: dict[str, tuple[Convert, Convert]] = {}
        self.schema, self.to_avro, self.from_avro = self._record(model)

    def _record(self, model: type[BaseModel]) -> tuple[Any, Convert, Convert]:
        name = model.__name__
        if name in self.defined:
            return f"{NAMESPACE}.{name}", *self._conv_cache[name]
        self.defined.add(name)
        fields = []
        to: dict[str, Convert] = {}
        back: dict[str, Convert] = {}
        leaf: dict[str, Convert] = {}
        for fname, info in model.model_fields.items():
            tp = info.annotation
            if info.metadata:
                tp = Annotated[(tp, *info.metadata)]  # type: ignore[assignment]
            schema, t, b = self._type(tp)
            if t is not None and not _holds_model(tp):  # a nested model's writer converts its own fields
                leaf[fname] = t
            field: dict[str, Any] = {"name": fname, "type": schema}
            if info.description:
                field["doc"] = info.description
            if isinstance(schema, list) and schema and schema[0] == "null":
                field["default"] = None
            elif not info.is_required() and info.default_factory is None and _plain_default(info.default):
                field["default"] = _json_default(info.default)
            fields.append(field)
            if t is not None:
                to[fname] = t
            if b is not None:
                back[fname] = b
        doc = (model.__doc__ or "").strip().split("\n")[0]
        schema_out = {"type": "record", "name": name, "namespace": NAMESPACE, "doc": doc, "fields": fields}
        self._conv_cache[name] = (_record_conv(to), _record_conv(back))
        if _dumps_as_fields(model):
            self.sources[f"{NAMESPACE}.{name}"] = (model, tuple(leaf.items()))
        return schema_out, *self._conv_cache[name]

    def _type(self, tp: Any) -> tuple[Any, Convert, Convert]:
        origin = get_origin(tp)
        if origin is Annotated:
            base, *meta = get_args(tp)
            if any(isinstance(m, AvroJson) for m in meta):
                return "string", _dumps, _loads
            return self._type(base)
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"only Optional unions are supported, not {tp}")
            inner, t, b = self._type(args[0])
            return ["null", inner], _optional(t), _optional(b)
        if origin is Literal:
            return "string", None, None
        if origin is list:
            inner, t, b = self._type(get_args(tp)[0])
            return (
                {"type": "array", "items": inner},
                (lambda v, t=t: [t(x) for x in v]) if t else None,
                (lambda v, b=b: [b(x) for x in v]) if b else None,
            )
        if origin is dict:
            inner, t, b = self._type(get_args(tp)[1])
            return (
                {"type": "map", "values": inner},
                (lambda v, t=t: {k: t(x) for k, x in v.items()}) if t else None,
                (lambda v, b=b: {k: b(x) for k, x in v.items()}) if b else None,
            )
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self._record(tp)
        prim = {
            str: "string",
            int: "long",
            float: "double",
            bool: "boolean",
            bytes: "bytes",
            Decimal: "string",
        }
        if tp in prim:
            if tp is float:
                return "double", float, None
            if tp is Decimal:
                return "string", str, None
            return prim[tp], None, None
        raise TypeError(f"no Avro mapping for {tp!r}")


def _holds_model(tp: Any) -> bool:
    """Does a value of ``tp`` hold a pydantic model written as an Avro record (not inside a JSON field)?"""
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        return not any(isinstance(m, AvroJson) for m in meta) and _holds_model(base)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return True
    return any(_holds_model(a) for a in get_args(tp))


def _dumps_as_fields(model: type[BaseModel]) -> bool:
    """Does ``model_dump`` return this model's field values as they are held (no serializer, computed or
    excluded field, or extra), so that a writer may read them from the instance (``wire.avrowrite``)?"""
    decorators = model.__pydantic_decorators__
    return (
        not decorators.model_serializers
        and not decorators.field_serializers
        and not model.model_computed_fields
        and model.model_config.get("extra") != "allow"
        and not any(info.exclude for info in model.model_fields.values())
    )


def _loads(v: Any) -> Any:
    """A JSON field read back: at the ceilings every calmrun writer stays under (see ``jsonfield``)."""
    if not isinstance(v, str):
        raise DecodeError(f"a JSON field holds a {type(v).__name__}, not a string")
    return loads(v, what="a JSON field")


def _optional(f: Convert) -> Convert:
    if f is None:
        return None
    return lambda v: None if v is None else f(v)


def _record_conv(conv: dict[str, Convert]) -> Convert:
    if not conv:
        return None
    items = list(conv.items())

    def apply(d: dict[str, Any]) -> dict[str, Any]:
        for k, f in items:
            if f is not None and k in d:
                d[k] = f(d[k])
        return d

    return apply


def _plain_default(v: Any) -> bool:
    return v is not None and isinstance(v, str | int | float | bool | Decimal)


def _without(schema: Any, added: dict[str, set[str]]) -> Any:
    """``schema`` with the fields in ``added`` (by record name) left out, in nested records too."""
    if isinstance(schema, list):
        return [_without(s, added) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _without(v, added) for k, v in schema.items() if k != "fields"}
    if "fields" in schema:
        drop = added.get(str(schema.get("name", "")).rsplit(".", 1)[-1], set())
        out["fields"] = [_without(f, added) for f in schema["fields"] if f["name"] not in drop]
    return out


def _json_default(v: Any) -> Any:
    return str(v) if isinstance(v, Decimal) else v


class RecordCodec:
    """Encodes pydantic records to Avro single-object bytes and decodes them back.

    Args:
        models: the record types this codec knows; each is written with its own schema fingerprint.
        framing: a Schema Registry: Confluent-framed records decode through it, and with
            ``framing.write`` the records others read (``confluent.FRAMED``) are written that way when
            ``encode`` is told their topic.
    """

    def __init__(self, models: Iterable[type[BaseModel]], framing: ConfluentFraming | None = None) -> None:
        self._derived = {m.__name__: _Derived(m) for m in models}
        self._by_full = {f"{NAMESPACE}.{name}": d for name, d in self._derived.items()}
        sources = {k: v for d in self._derived.values() for k, v in d.sources.items()}
        schemas = (d.schema for d in self._derived.values())
        self.avro = AvroCodec(schemas, readers=self._earlier(), models=sources)
        self.framing = framing
        self._readers = {
            name: (self.avro.schema(name), self.avro.header(name)[2:]) for name in self.avro.names
        }

    def _earlier(self) -> list[dict[str, Any]]:
        """Schemas of records written by earlier calmrun versions that still decode into today's models.

        Each is today's schema without the fields added since (they have defaults): a field appended to
        a model changes its fingerprint, and the records already in a topic must stay readable.
        """
        out, seen = [], {json.dumps(d.schema, sort_keys=True) for d in self._derived.values()}
        for since in range(len(EARLIER_FIELDS)):
            added: dict[str, set[str]] = {}
            for release in EARLIER_FIELDS[since:]:
                for name, fields in release.items():
                    added.setdefault(name, set()).update(fields)
            for d in self._derived.values():
                schema = _without(d.schema, added)
                text = json.dumps(schema, sort_keys=True)
                if text not in seen:
                    seen.add(text)
                    out.append(schema)
        return out

    def schemas(self) -> dict[str, dict[str, Any]]:
        """The Avro schema of each model, by model name."""
        return {name: d.schema for name, d in self._derived.items()}

    def encode(self, record: BaseModel, topic: str | None = None) -> bytes:
        """Encode ``record`` as single-object Avro, or Confluent-framed for ``topic``.

        Args:
            record: a wire record.
            topic: where it is written; with a framing that writes (``wire.format: confluent``), a
                record others read (``confluent.FRAMED``) gets the schema ID of its subject there.

        Raises:
            SerializationError: the record's type is not registered or a value does not fit.
            RegistryError: the registry refused the schema or did not answer (first record per subject).
        """
        name = type(record).__name__
        d = self._derived.get(name)
        if d is None:
            raise SerializationError(f"{name} is not a calmrun wire record")
        full = f"{NAMESPACE}.{name}"
        single = self.avro.encode_model(full, record)  # its fields read as they are (wire.avrowrite)
        if single is None:
            single = self.encode_dumped(record)
        if topic is None or self.framing is None or not self.framing.write or name not in FRAMED:
            return single
        return self.framing.header(topic, full, d.schema) + single[10:]

    def encode_dumped(self, record: BaseModel) -> bytes:
        """``record`` as single-object Avro through ``model_dump`` and the converters (what ``encode`` does
        where the compiled writer does not take the model itself; the reference its bytes are checked
        against)."""
        name = type(record).__name__
        d = self._derived[name]
        data = record.model_dump()  # python mode: bytes stay bytes (json mode would decode them as UTF-8)
        if d.to_avro is not None:
            data = d.to_avro(data)
        return self.avro.encode(f"{NAMESPACE}.{name}", data)

    def decode(self, data: bytes) -> BaseModel:
        """Decode any registered record; total: whatever the bytes, a record or a ``DecodeError``.

        Raises:
            DecodeError: not single-object Avro, unknown fingerprint, corrupt bytes or invalid values
                (``LimitExceededError`` for a JSON field over the ceilings of ``calmrun.wire.jsonfield``).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        name, raw = self.read_avro(bytes(data))
        d = self._by_full[name]
        try:
            if d.from_avro is not None:
                raw = d.from_avro(raw)
            return d.model.model_validate(raw)
        except CalmrunError:
            raise
        except ValidationError as exc:
            raise DecodeError(f"{name} does not validate: {_short(exc)}") from exc
        # Broad on purpose: these are untrusted bytes, and any failure to make a record of them is a
        # decode failure of that record (the caller parks it); nothing here may escape as a crash.
        except Exception as exc:
            raise DecodeError(f"{name} does not decode: {type(exc).__name__}: {exc}") from exc

    def read_avro(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """(full name, Avro record) of single-object or Confluent-framed bytes, before validation.

        Raises:
            DecodeError: neither framing, corrupt bytes, or a schema ID or fingerprint not known; a
                Confluent-framed record without ``wire.registry.url`` says so.
            RegistryError: the registry did not answer or refused us (not the record's fault).
        """
        if data[:1] == b"\x00":
            if self.framing is None:
                raise DecodeError(
                    f"Confluent-framed record (schema ID {int.from_bytes(data[1:5], 'big')}) and no "
                    "Schema Registry configured (wire.registry.url)"
                )
            return self.framing.read(data, self._readers)
        return self.avro.decode(data)

    def decode_as(self, data: bytes, model: type[M]) -> M:
        """Decode and insist on one type."""
        rec = self.decode(data)
        if not isinstance(rec, model):
            raise DecodeError(f"expected {model.__name__}, got {type(rec).__name__}")
        return rec


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
    )


def wire_models() -> list[type[BaseModel]]:
    """Every record calmrun writes to Kafka."""
    from calmrun.wire.dlq import DlqRecord
    from calmrun.workflow.events import RunCommand, RunEvent, RunRequest, StepResultRecord, StepTask
    from calmrun.workflow.state import RunState

    return [RunRequest, RunCommand, RunEvent, StepTask, StepResultRecord, RunState, DlqRecord]


def wire_codec(wire: WireSettings | None = None) -> RecordCodec:
    """A codec for every wire record, with the Schema Registry ``wire`` configures (if any)."""
    framing = ConfluentFraming.from_settings(wire) if wire is not None else None
    return RecordCodec(wire_models(), framing)


def is_avro(data: bytes) -> bool:
    """True when ``data`` starts as Avro single-object bytes or a Confluent-framed record does."""
    return is_single_object(data) or is_confluent(data)


def write_schemas(folder: Path) -> list[Path]:
    """Write ``<Model>.avsc`` for every wire model into ``folder``; returns the paths written."""
    codec = RecordCodec(wire_models())
    out = []
    for name, schema in codec.schemas().items():
        path = folder / f"{_snake(name)}.avsc"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        out.append(path)
    return out


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


if __name__ == "__main__":
    for p in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(p)
