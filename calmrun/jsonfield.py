"""JSON-valued fields: free-form payloads (run input, agent output) carried inside typed records.

On the Avro wire they are strings holding JSON, so the contracts in ``schemas/`` stay fixed while the
payloads are whatever each workflow's agents define.
"""

from __future__ import annotations

from typing import Annotated, Any


class AvroJson:
    """Marker: this field is a JSON document, written to Avro as a JSON string."""


JsonDict = Annotated[dict[str, Any], AvroJson()]
JsonValue = Annotated[Any, AvroJson()]
