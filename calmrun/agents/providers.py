"""How a model alias becomes a pydantic-ai model: providers, API keys, llama.cpp's JSON mode, Retry-After.

``llamacpp:<name>`` is an OpenAI-compatible server of llama.cpp (``llama-server``, ``llama_cpp.server``):
in ``prompted`` output mode its requests carry the output schema in ``response_format: json_object``, which
these servers turn into a grammar, so the reply is JSON of the requested shape (their ``json_schema`` mode
is refused with HTTP 500 by llama-cpp-python 0.3.36). Provider SDK clients are built with
``max_retries=0``: calmrun's retry policy decides what happens after a failed request.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic_ai.exceptions import (
    ModelHTTPError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    UserError,
)
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse, infer_model
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.providers import infer_provider_class
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from calmrun.errors import ConfigError, ProviderError
from calmrun.settings import ModelAlias

FUNCTION = "function:"
OPENAI = "openai:"
LLAMACPP = "llamacpp:"
NO_KEY = "no-key-needed"
"""The placeholder key sent to a ``base_url`` server when the alias configures none (the SDK needs one)."""
REDACTED = "<redacted>"
PROVIDER_KEY_VARS = (
    "OPENAI_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GROQ_API_KEY",
    "MISTRAL_API_KEY",
    "CO_API_KEY",
    "DEEPSEEK_API_KEY",
    "OPENROUTER_API_KEY",
)
"""Environment variables pydantic-ai's providers read keys from; their values are redacted too."""


def _build(alias: str, cfg: ModelAlias) -> Model:
    spec = cfg.model
    try:
        if spec == "test":
            return TestModel()
        if spec.startswith(FUNCTION):
            return FunctionModel(_import_function(alias, spec[len(FUNCTION) :]), model_name=spec)
        if spec.startswith((OPENAI, LLAMACPP)):
            from pydantic_ai.providers.openai import OpenAIProvider

            provider = OpenAIProvider(openai_client=_openai_client(alias, cfg))
            name = spec.split(":", 1)[1]
            if spec.startswith(LLAMACPP):
                return LlamaCppChatModel(name, provider=provider)
            return OpenAIChatModel(name, provider=provider)
        return infer_model(spec, provider_factory=lambda name: _provider(alias, cfg, name))
    except (UserError, ImportError) as exc:
        # pydantic-ai's message names the provider and the missing setting or package; never the key.
        raise ConfigError(f"model alias {alias!r} ({spec}): {exc}") from exc


def _openai_client(alias: str, cfg: ModelAlias) -> Any:
    """An ``AsyncOpenAI`` client for the alias: its key (or a placeholder for a keyless local server), no SDK
    retries, the alias's timeout."""
    from openai import NOT_GIVEN, AsyncOpenAI, OpenAIError

    key = api_key(alias, cfg)
    if key is None and cfg.base_url is not None:
        key = NO_KEY
    try:
        return AsyncOpenAI(
            api_key=key,
            base_url=cfg.base_url,
            max_retries=0,
            timeout=cfg.timeout_s if cfg.timeout_s is not None else NOT_GIVEN,
        )
    except OpenAIError as exc:  # no key given and OPENAI_API_KEY unset
        raise ConfigError(
            f"model alias {alias!r} ({cfg.model}): no API key: set OPENAI_API_KEY, "
            f"CALMRUN_MODELS__{alias.upper()}__API_KEY, or api_key: env:NAME / file:PATH"
        ) from exc


def _provider(alias: str, cfg: ModelAlias, name: str) -> Any:
    """The pydantic-ai provider ``name`` (anthropic, google...) with the alias's key and base URL, if set."""
    kwargs: dict[str, Any] = {}
    key = api_key(alias, cfg)
    if key is not None:
        kwargs["api_key"] = key
    if cfg.base_url is not None:
        kwargs["base_url"] = cfg.base_url
    try:
        return infer_provider_class(name)(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model alias {alias!r} ({cfg.model}): provider {name!r} takes no {sorted(kwargs)}"
        ) from exc


def api_key(alias: str, cfg: ModelAlias) -> str | None:
    """The alias's API key: as given, or read from ``env:NAME`` or ``file:PATH``; None when none is set.

    Raises:
        ConfigError: the named variable is unset or the file unreadable (the message never holds a key).
    """
    if cfg.api_key is None:
        return None
    value = cfg.api_key.get_secret_value()
    if value.startswith("env:"):
        name = value[4:]
        found = os.environ.get(name)
        if not found:
            raise ConfigError(f"model alias {alias!r}: api_key names ${name}, which is not set")
        return found
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        try:
            found = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"model alias {alias!r}: cannot read the api_key file {path}: {exc.strerror}"
            ) from None
        if not found:
            raise ConfigError(f"model alias {alias!r}: the api_key file {path} is empty")
        return found
    return value


class LlamaCppChatModel(OpenAIChatModel):
    """OpenAI chat completions against a llama.cpp server, whose ``json_object`` mode takes a schema.

    In ``prompted`` output mode pydantic-ai puts the schema in the instructions and asks for
    ``response_format: {"type": "json_object"}``; this adds the schema to that response format, so the server
    constrains generation with a grammar built from it. The reply is then well-formed JSON of the requested
    shape; whether its values are right is still up to the model (and to the step's output model).
    """

    @staticmethod
    def _with_schema(
        model_settings: ModelSettings | None, params: ModelRequestParameters
    ) -> ModelSettings | None:
        if params.output_mode != "prompted" or params.output_object is None:
            return model_settings
        settings = ModelSettings(**(model_settings or {}))
        body = dict(settings.get("extra_body") or {})  # type: ignore[call-overload]
        body.setdefault(
            "response_format", {"type": "json_object", "schema": params.output_object.json_schema}
        )
        settings["extra_body"] = body
        return settings

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        settings = self._with_schema(model_settings, model_request_parameters)
        return await super().request(messages, settings, model_request_parameters)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        settings = self._with_schema(model_settings, model_request_parameters)
        async with super().request_stream(messages, settings, model_request_parameters, run_context) as r:
            yield r


def retry_after_ms(exc: BaseException) -> int | None:
    """The wait a provider asked for, from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)
    of the ``ModelHTTPError`` that ``exc`` is or was caused by; None when there is none.

    The executor reports it on the step's result (``StepResult.retry_after_ms``), and the decider waits at
    least that long before the next attempt.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ModelHTTPError) and cur.headers:
            headers = {k.lower(): v for k, v in cur.headers.items()}
            raw_ms = headers.get("retry-after-ms")
            if raw_ms is not None:
                try:
                    return max(0, int(float(raw_ms)))
                except ValueError:
                    pass
            raw = headers.get("retry-after")
            if raw is not None:
                try:
                    return max(0, int(float(raw) * 1000))
                except ValueError:
                    pass
                try:
                    when = parsedate_to_datetime(raw)
                except (TypeError, ValueError):
                    return None
                return max(0, int((when.timestamp() - time.time()) * 1000))
            return None
        cur = cur.__cause__ or cur.__context__
    return None


def rate_limited(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a provider's rate limit: HTTP 429 or pydantic-ai's
    ``ModelRateLimitError`` (also inside a stream). An exhausted quota (``ModelQuotaExceededError``) is not:
    waiting does not help it.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ModelQuotaExceededError):
            return False
        if isinstance(cur, ModelRateLimitError):
            return True
        if isinstance(cur, ModelHTTPError | ProviderError):
            return (cur.status_code if isinstance(cur, ModelHTTPError) else cur.status) == 429
        cur = cur.__cause__ or cur.__context__
    return False


def _import_function(alias: str, path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model alias {alias!r}: expected 'function:module:attr', got 'function:{path}'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model alias {alias!r}: cannot import 'function:{path}': {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"model alias {alias!r}: 'function:{path}' is not callable")
    return obj


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
