"""`afa-serve`: serve a model over an OpenAI-compatible API, manage packaged models, benchmark."""

from __future__ import annotations

import logging

import typer
from pydantic import ValidationError

from afa_serve.bench import BenchConfig, bench
from afa_serve.config import ENV_PREFIX, ConfigFileError, ServeConfig
from afa_serve.config_cli import config_command, validation_message
from afa_serve.engine.base import Engine
from afa_serve.engine.vllm_support import require_vllm, resolve_engine
from afa_serve.models.cli import app as models_app
from afa_serve.vllm_spellings import SERVE_SPELLINGS

app = typer.Typer(
    help="LLM serving with lossless speculative decoding and AFA-LoRA-trained draft models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(models_app, name="models")
config_command(app, BenchConfig)(bench)

logger = logging.getLogger(__name__)


def build_engine(config: ServeConfig) -> Engine:
    """The engine `config.engine` names; `auto` is vLLM where it imports and runs, else torch."""
    kind = resolve_engine(config.engine)
    if ignored := config.ignored_by(kind):
        logger.warning("the %s engine ignores the settings %s", kind, ", ".join(ignored))
    if kind == "vllm":
        try:
            require_vllm()
            from afa_serve.engine.vllm_engine import VllmEngine
        except ImportError as error:
            raise SystemExit(f"error: {error}") from None
        return VllmEngine(config.engine_config())
    from afa_serve.engine.torch_engine import TorchEngine

    return TorchEngine(config.engine_config(), torch_threads=config.torch_threads)


def load_serve_config(flags: dict[str, object]) -> ServeConfig:
    """Flags given on the command line over env vars over the config file; exit 2 if invalid."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return ServeConfig(**given)
    except ConfigFileError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None
    except ValidationError as error:
        raise typer.BadParameter(
            f"{validation_message(error)} (from flags, {ENV_PREFIX}* variables or the config file)"
        ) from None


@config_command(app, ServeConfig, build=load_serve_config, spellings=SERVE_SPELLINGS)
def serve(config: ServeConfig) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, /metrics).

    Each setting comes from its flag, else AFA_SERVE_<NAME> (e.g. AFA_SERVE_TARGET,
    AFA_SERVE_API_KEY), else the config file, else its default.
    """
    from afa_serve.api import create_app
    from afa_serve.api.server import serve as run_server

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app_ = create_app(build_engine(config), config.api_options())
    run_server(app_, config.host, config.port, config.drain_timeout_s, config.log_level)
