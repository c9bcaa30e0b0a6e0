"""JSON-valued fields: the markers that say "this field is a free-form JSON document".

Below both the records (``calmrun.workflow``) and their encodings (``calmrun.wire``): a record declares a
field ``JsonDict``; the Avro codec (``calmrun.wire.codec``) writes such a field as a JSON string, and
``calmrun.wire.jsonfield`` parses it back within the limits.
"""

from __future__ import annotations

from typing import Annotated, Any


class AvroJson:
    """Marker: this field is a JSON document, written to Avro as a JSON string."""


JsonDict = Annotated[dict[str, Any], AvroJson()]
JsonValue = Annotated[Any, AvroJson()]
