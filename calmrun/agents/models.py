"""Model aliases from configuration, resolved to pydantic-ai models.

Agents never name a model: a step names an alias (``fast``, ``smart``) and the configuration says what it is.
API keys stay ``SecretStr`` until the provider is built; they are never logged nor shown by ``describe``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel
from pydantic_ai import NativeOutput, PromptedOutput, ToolOutput
from pydantic_ai.exceptions import UserError
from pydantic_ai.models import Model, infer_model
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.settings import ModelSettings

from calmrun.errors import ConfigError, UnknownModelError
from calmrun.settings import ModelAlias

FUNCTION = "function:"
OPENAI = "openai:"


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


def _build(alias: str, cfg: ModelAlias) -> Model:
    spec = cfg.model
    try:
        if spec == "test":
            return TestModel()
        if spec.startswith(FUNCTION):
            return FunctionModel(_import_function(alias, spec[len(FUNCTION) :]), model_name=spec)
        if spec.startswith(OPENAI):
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai import OpenAIProvider

            provider = OpenAIProvider(
                base_url=cfg.base_url,
                api_key=cfg.api_key.get_secret_value() if cfg.api_key is not None else None,
            )
            return OpenAIChatModel(spec[len(OPENAI) :], provider=provider)
        return infer_model(spec)
    except UserError as exc:
        # pydantic-ai's message names the provider and the missing setting; it never contains the key.
        raise ConfigError(f"model alias {alias!r} ({spec}): {exc}") from exc


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
