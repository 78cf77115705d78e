"""`afa-serve serve` settings: command-line flags, then AFA_SERVE_* environment variables, then
a YAML or JSON config file (`--config FILE` or AFA_SERVE_CONFIG), then the defaults.

The file holds the same names as the flags, in snake_case or kebab-case:

    target: smollm2-135m-instruct
    draft: ./drafts/smollm2-4l
    num_speculative_tokens: 4
    port: 8000

Every value is validated here, whatever its source; an unknown key is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from afa_serve.api.state import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_REQUEST_TIMEOUT_S,
    ApiOptions,
    check_api_key,
)
from afa_serve.config_cli import comma_separated
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.vllm_support import EngineName

ENV_PREFIX = "AFA_SERVE_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG"


def _json_lists(value: Any) -> Any:
    """vLLM's spelling of a list, '["a", "b"]', as its items (among other items or alone)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    items: list[Any] = []
    for item in value:
        is_json = isinstance(item, str) and item.lstrip().startswith("[")
        items += json.loads(item) if is_json else [item]
    return items


# NoDecode: AFA_SERVE_ALLOWED_ORIGINS may be comma-separated too, not only JSON.
Origins = Annotated[comma_separated(str), BeforeValidator(_json_lists), NoDecode]


class ConfigFileError(ValueError):
    """The config file is missing, unreadable or not a mapping of settings."""


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of setting names to values; kebab-case names are accepted."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(f"cannot read config file {path}: {error}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigFileError(f"config file {path} is not valid YAML/JSON: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Settings from the file named by the `config` flag or AFA_SERVE_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | Path | None):
        super().__init__(settings_cls)
        self._path = Path(path) if path else None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        return read_config_file(self._path) if self._path else {}


class ServeConfig(BaseSettings, EngineConfig):
    """The engine's settings (`EngineConfig`) and the HTTP server's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    config: Path | None = Field(
        None, description=f"YAML or JSON file with any of these settings (snake_case keys); "
        f"also ${CONFIG_FILE_ENV}.")
    engine: EngineName = Field(
        "auto", description="auto: vLLM when it imports and finds a device, else the embedded "
        "torch engine.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: SecretStr | None = Field(
        None, description="Require `Authorization: Bearer KEY` on every route but /health; "
        "unset it to serve without a key (an empty key is an error).")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Larger request bodies get 413.")
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES, ge=1024, description="Larger request lines and headers get "
        "431 and a closed connection.")
    request_timeout_s: float = Field(
        DEFAULT_REQUEST_TIMEOUT_S, gt=0, description="Seconds a client has to send a whole "
        "request (headers and body); then 408 or a closed connection.")
    max_connections: int = Field(
        DEFAULT_MAX_CONNECTIONS, ge=1, description="Open connections at most; a new one "
        "beyond them gets 503 and is closed.")
    torch_threads: int = Field(
        1, ge=1, description="Torch engine: CPU threads for one operation (torch's intra-op "
        "threads). 1 measured fastest for one request on a shared 2-core host; raise it on "
        "a dedicated many-core CPU host.")
    allowed_origins: Origins = Field(
        (), description="Origins whose web pages may call the API (CORS), e.g. "
        "https://app.example or *; none by default. Also a JSON list, as vLLM's.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let running requests finish.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and its engine.")

    @field_validator("api_key")
    @classmethod
    def _key_allowed(cls, value: SecretStr | None) -> SecretStr | None:
        check_api_key(None if value is None else value.get_secret_value())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = init_settings.init_kwargs.get("config") or os.environ.get(CONFIG_FILE_ENV)
        return init_settings, env_settings, _ConfigFileSource(settings_cls, config_file)

    def api_options(self) -> ApiOptions:
        return ApiOptions(
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            max_body_bytes=self.max_body_bytes,
            max_header_bytes=self.max_header_bytes,
            request_timeout_s=self.request_timeout_s,
            max_connections=self.max_connections,
            allowed_origins=self.allowed_origins,
        )
