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

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from afa_serve.api.state import DEFAULT_MAX_BODY_BYTES, ApiOptions
from afa_serve.engine.draft_vocab import DEFAULT_DRAFT_VOCAB_SIZE
from afa_serve.engine.policy import DEFAULT_CONFIDENCE_THRESHOLD, SpeculationMode

ENV_PREFIX = "AFA_SERVE_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG"
DEFAULT_MODEL = "smollm2-135m-instruct"


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


COMMON_ENGINE_SETTINGS = {
    "target", "draft", "num_speculative_tokens", "served_model_name", "dtype", "device",
    "max_model_len", "max_num_seqs", "max_queue",
}
VLLM_SETTINGS = {
    "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager",
}
TORCH_SETTINGS = {"speculation", "confidence_threshold", "draft_vocab_size"}


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    config: Path | None = Field(None, description="YAML or JSON file with more settings.")
    target: str = Field(DEFAULT_MODEL, description="Target model: HF id, folder or packaged name.")
    draft: str | None = Field(None, description="Draft model; none decodes plainly.")
    num_speculative_tokens: int = Field(
        4, ge=0, le=32, description="k: the most draft tokens per step.")
    speculation: SpeculationMode = Field(
        "adaptive", description="torch engine: adaptive (k per step from measured costs and "
        "acceptance, 0 when drafting would lose), fixed (always k) or off.")
    confidence_threshold: float = Field(
        DEFAULT_CONFIDENCE_THRESHOLD, ge=0.0, lt=1.0,
        description="torch engine: the draft stops when its pick's probability is below this.")
    draft_vocab_size: int = Field(
        DEFAULT_DRAFT_VOCAB_SIZE, ge=0, description="torch engine: the draft's head scores the "
        "N most frequent tokens of its draft_vocab.json (0: the whole vocabulary).")
    engine: Literal["auto", "torch", "vllm"] = Field(
        "auto", description="auto: vLLM when it imports, else the embedded torch engine."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="Require `Bearer KEY` (not on /health).")
    max_model_len: int | None = Field(None, ge=2, description="Context limit; default: model's.")
    max_num_seqs: int = Field(8, ge=1, description="Requests decoded at once.")
    max_queue: int = Field(64, ge=0, description="Requests waiting; beyond it: 429.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    served_model_name: str | None = Field(
        None, min_length=1, description="The `model` clients send; default: the target's name."
    )
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, description="Else 413.")
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: wait this long for requests.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # The vLLM engine's own settings (see VLLM_SETTINGS).
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs the target spans.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM: share of GPU (on CPU: host) memory it may use."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="vLLM: KV cache size in bytes; overrides the utilization."
    )
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs / torch.compile.")

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
        )

    def engine_settings(self, engine: Literal["torch", "vllm"]) -> dict[str, Any]:
        """What `engine`'s config takes: the common settings and the engine's own."""
        own = VLLM_SETTINGS if engine == "vllm" else TORCH_SETTINGS
        return self.model_dump(include=COMMON_ENGINE_SETTINGS | own)

    def ignored_settings(self, engine: Literal["torch", "vllm"]) -> list[str]:
        """The other engine's settings given a value other than their default."""
        fields = type(self).model_fields
        other = TORCH_SETTINGS if engine == "vllm" else VLLM_SETTINGS
        return sorted(name for name in other if getattr(self, name) != fields[name].default)
