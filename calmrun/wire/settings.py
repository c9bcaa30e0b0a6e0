"""The ``wire`` settings: how calmrun frames the Avro records others read, and the Schema Registry.

Here rather than in ``calmrun.settings`` (which includes them as ``Settings.wire``) so that the wire
package depends on no settings but its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

SubjectStrategy = Literal["TopicName", "RecordName", "TopicRecordName"]
"""How a schema's subject is named: ``<topic>-value``, ``<record full name>``, ``<topic>-<record full name>``
(Confluent's TopicNameStrategy, RecordNameStrategy and TopicRecordNameStrategy)."""
WireFormat = Literal["single-object", "confluent"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegistryTls(_Frozen):
    """TLS towards the registry (an ``https://`` URL): whom to trust and, for mTLS, who we are (PEM files;
    without ``ca_file`` the system's trust store)."""

    ca_file: Path | None = None
    cert_file: Path | None = Field(None, description="client certificate for mTLS; needs key_file")
    key_file: Path | None = None
    key_password: SecretStr | None = Field(None, description="the value, env:NAME or file:PATH")
    check_hostname: bool = True

    @model_validator(mode="after")
    def _cert_and_key(self) -> RegistryTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        return self


class RegistrySettings(_Frozen):
    """A Confluent-compatible Schema Registry (Confluent, Apicurio's ``/apis/ccompat/v7``, Karapace)."""

    url: str | None = Field(
        None, pattern=r"^https?://", description="the registry's base URL (Apicurio: .../apis/ccompat/v7)"
    )
    username: str | None = Field(None, description="HTTP basic auth user (Confluent Cloud: the API key)")
    password: SecretStr | None = Field(
        None, description="HTTP basic auth password: the value, env:NAME or file:PATH"
    )
    tls: RegistryTls = Field(default_factory=RegistryTls)
    subject_strategy: SubjectStrategy = "TopicName"
    auto_register: bool = Field(
        True, description="register calmrun's schemas when first written; off: they must be registered"
    )
    timeout_s: float = Field(10.0, gt=0, description="one registry request")

    @model_validator(mode="after")
    def _user_and_password(self) -> RegistrySettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (HTTP basic auth)")
        return self


class WireSettings(_Frozen):
    """How calmrun frames the Avro records others read: requests, commands, tasks, results and events.

    ``single-object``: Avro single-object encoding (``C3 01`` and the schema fingerprint); ``confluent``:
    a zero byte, the registry's 4-byte schema ID, the body (Confluent's serializers). Reading detects
    either (and JSON) by the first byte; a Confluent record needs ``registry.url``. The run state and the
    dead letters stay single-object: calmrun alone reads them.
    """

    format: WireFormat = "single-object"
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @model_validator(mode="after")
    def _registry_for_confluent(self) -> WireSettings:
        if self.format == "confluent" and self.registry.url is None:
            raise ValueError("wire.format confluent needs wire.registry.url")
        return self
