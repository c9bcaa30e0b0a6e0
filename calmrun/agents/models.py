"""Model aliases from configuration, resolved to pydantic-ai models.

Agents never name a model: a step names an alias (``fast``, ``smart``) and the configuration says what it is.
API keys stay ``SecretStr`` until the provider is built; they are never logged nor shown by ``describe``.

An alias's ``api_key`` is the key itself, ``env:NAME`` (read from that environment variable) or ``file:PATH``
(read from that file, for mounted secrets), so neither the configuration file nor a workflow holds the key.
Aliases with a ``base_url`` and no ``api_key`` send a placeholder, never ``OPENAI_API_KEY``: a key for one
provider is not handed to another server.

Provider SDK clients are built with ``max_retries=0``: calmrun's retry policy, escalation and quarantine
decide what happens after a failed request, and every attempt is recorded (an SDK retrying a 429 or 500
inside one attempt would hide it and stretch the attempt past its timeout).

``llamacpp:<name>`` is an OpenAI-compatible server of llama.cpp (``llama-server``, ``llama_cpp.server``):
in ``prompted`` output mode its requests carry the output schema in ``response_format: json_object``, which
these servers turn into a grammar, so the reply is JSON of the requested shape (their ``json_schema`` mode
is refused with HTTP 500 by llama-cpp-python 0.3.36).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel
from pydantic_ai import NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.exceptions import ModelHTTPError, UserError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse, infer_model
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.providers import infer_provider_class
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from calmrun.errors import ConfigError, UnknownModelError
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


class ModelRegistry:
    """Resolves the model aliases of the configuration; each alias is built once, on first use.

    Args:
        aliases: alias -> configuration, usually ``Settings.models``.
        overrides: alias -> a ready pydantic-ai model, used instead of building one (tests, demos).
    """

    def __init__(
        self, aliases: Mapping[str, ModelAlias], *, overrides: Mapping[str, Model] | None = None
    ) -> None:
        self._aliases = dict(aliases)
        self._cache: dict[str, Model] = dict(overrides or {})

    def __repr__(self) -> str:
        return f"ModelRegistry(aliases={self.aliases})"

    @property
    def aliases(self) -> list[str]:
        """Every known alias, sorted."""
        return sorted(set(self._aliases) | set(self._cache))

    def __contains__(self, alias: object) -> bool:
        return alias in self._aliases or alias in self._cache

    def config(self, alias: str) -> ModelAlias:
        """The configuration of ``alias``.

        Raises:
            UnknownModelError: the alias is not configured (the message lists the known ones).
        """
        try:
            return self._aliases[alias]
        except KeyError:
            if alias in self._cache:
                return ModelAlias(model=f"override:{self._cache[alias].model_name}")
            raise UnknownModelError(alias, self.aliases) from None

    def resolve(self, alias: str) -> Model:
        """The pydantic-ai model of ``alias``, built on first use and cached; building makes no network call.

        Raises:
            UnknownModelError: the alias is not configured.
            ConfigError: the alias is configured but cannot be built (bad ``function:`` path, unknown
                provider, missing API key); the message names the alias.
        """
        cached = self._cache.get(alias)
        if cached is not None:
            return cached
        model = _build(alias, self.config(alias))
        self._cache[alias] = model
        return model

    def model_settings(self, alias: str) -> ModelSettings:
        """The pydantic-ai settings of ``alias`` (temperature, max_tokens, timeout); empty when unset."""
        cfg = self.config(alias)
        settings = ModelSettings()
        if cfg.temperature is not None:
            settings["temperature"] = cfg.temperature
        if cfg.max_tokens is not None:
            settings["max_tokens"] = cfg.max_tokens
        if cfg.timeout_s is not None:
            settings["timeout"] = cfg.timeout_s
        return settings

    def output_type_for(self, alias: str, output_model: type[BaseModel]) -> Any:
        """``output_model`` wrapped for the alias's ``output_mode``: ToolOutput, NativeOutput, PromptedOutput.

        Returns ``output_model`` itself when the alias sets no mode (pydantic-ai's default, tool output).
        """
        mode = self.config(alias).output_mode
        if mode == "tool":
            return ToolOutput(output_model)
        if mode == "native":
            return NativeOutput(output_model)
        if mode == "prompted":
            return PromptedOutput(output_model)
        return output_model

    def provider(self, alias: str) -> str:
        """The provider part of the alias's model (``openai``, ``function``, ``test``...)."""
        return self.config(alias).model.split(":", 1)[0]

    def describe(self, alias: str) -> str:
        """One line for a CLI listing: alias, model, settings; never the API key, only whether one is set."""
        cfg = self.config(alias)
        parts = [f"{alias}: {cfg.model}"]
        if cfg.base_url is not None:
            parts.append(f"base_url={_without_credentials(cfg.base_url)}")
        if cfg.api_key is not None:
            parts.append("api_key=<set>")
        for name in (
            "temperature",
            "max_tokens",
            "timeout_s",
            "output_mode",
            "price_in_per_mtok",
            "price_out_per_mtok",
        ):
            value = getattr(cfg, name)
            if value is not None:
                parts.append(f"{name}={value}")
        return " ".join(parts)

    async def probe(self, alias: str, *, timeout_s: float = 5.0) -> tuple[bool, str]:
        """Whether the alias's model answers, without a model request (no tokens are spent).

        In-process models (``function:``, ``test``, overrides) answer when they build. An OpenAI-compatible
        server (``openai:``, ``llamacpp:``) must answer ``GET /models`` and list the model; other providers
        must answer their model listing. Failures are reported, never raised; the detail never holds a key.

        Returns:
            (answers, detail): detail gives the latency and what was listed, or why it does not answer.

        Raises:
            UnknownModelError: the alias is not configured.
        """
        cfg = self.config(alias)
        try:
            model = self.resolve(alias)
        except ConfigError as exc:
            return False, str(exc)
        if alias not in self._aliases or isinstance(model, FunctionModel | TestModel):
            return True, "in process, no network"
        models_api = getattr(getattr(model, "client", None), "models", None)
        if models_api is None:
            return True, f"built; provider {self.provider(alias)!r} has no model listing to probe"
        where = _without_credentials(cfg.base_url) if cfg.base_url else self.provider(alias)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                page = await models_api.list()
        except TimeoutError:
            return False, f"no answer from {where} within {timeout_s:g}s"
        except Exception as exc:  # a probe reports every failure instead of raising it
            return False, self.redact(f"{where}: {type(exc).__name__}: {exc}")[:300]
        ms = (time.monotonic() - t0) * 1000
        served = [str(getattr(m, "id", "")) for m in getattr(page, "data", [])]
        if isinstance(model, OpenAIChatModel) and model.model_name not in served:
            listed = ", ".join(served[:5]) + (" ..." if len(served) > 5 else "")
            return (
                False,
                f"{where} answers ({ms:.0f} ms) but does not serve {model.model_name!r} (serves: {listed})",
            )
        return True, f"{where} answers in {ms:.0f} ms"

    async def probe_all(self, *, timeout_s: float = 5.0) -> dict[str, tuple[bool, str]]:
        """:meth:`probe` of every alias, concurrently."""
        names = self.aliases
        results = await asyncio.gather(*(self.probe(a, timeout_s=timeout_s) for a in names))
        return dict(zip(names, results, strict=True))

    def redact(self, text: str) -> str:
        """``text`` with every API key this registry knows replaced by ``<redacted>``.

        The keys are those of the aliases (given, ``env:`` or ``file:``) and those in the providers' usual
        environment variables (``OPENAI_API_KEY``...). The executor passes error messages through this before
        they become results, events, dead letters or log lines: a provider may repeat the key it was sent.
        """
        for secret in self._secrets():
            text = text.replace(secret, REDACTED)
        return text

    def _secrets(self) -> list[str]:
        found: set[str] = set()
        for alias, cfg in self._aliases.items():
            try:
                key = api_key(alias, cfg)
            except ConfigError:
                key = None
            if key:
                found.add(key)
        found.update(v for v in (os.environ.get(name) for name in PROVIDER_KEY_VARS) if v)
        # very short values (placeholders such as "x") would mangle text without protecting anything
        return sorted((s for s in found if len(s) >= 8 and s != NO_KEY), key=len, reverse=True)


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
