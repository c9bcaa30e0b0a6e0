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
import os
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_ai import NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.models import Model
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.settings import ModelSettings

from calmrun.agents.providers import (
    FUNCTION,
    LLAMACPP,
    NO_KEY,
    OPENAI,
    PROVIDER_KEY_VARS,
    REDACTED,
    _build,
    _without_credentials,
    api_key,
    retry_after_ms,
)
from calmrun.errors import ConfigError, UnknownModelError
from calmrun.settings import ModelAlias

__all__ = ["FUNCTION", "LLAMACPP", "NO_KEY", "OPENAI", "ModelRegistry", "api_key", "retry_after_ms"]


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
