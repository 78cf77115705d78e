"""`afa-serve`: serve a model over an OpenAI-compatible API, manage packaged models, benchmark."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from afa_serve.bench import bench_command
from afa_serve.config import CONFIG_FILE_ENV, ENV_PREFIX, ConfigFileError, ServeConfig
from afa_serve.engine.base import Engine
from afa_serve.engine.vllm_support import require_vllm, vllm_unavailable_reason
from afa_serve.models.cli import app as models_app

app = typer.Typer(
    help="LLM serving with lossless speculative decoding and AFA-LoRA-trained draft models.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
app.command("bench")(bench_command)

logger = logging.getLogger(__name__)


def build_engine(config: ServeConfig) -> Engine:
    """The engine `config.engine` names; `auto` is vLLM where it imports and runs, else torch."""
    kind = config.engine
    if kind == "auto":
        kind = "vllm" if vllm_unavailable_reason() is None else "torch"
    if kind == "vllm":
        try:
            require_vllm()
            from afa_serve.engine.vllm_engine import VllmEngine, VllmEngineConfig
        except ImportError as error:
            raise SystemExit(f"error: {error}") from None
        if ignored := config.ignored_settings("vllm"):
            logger.warning("the vLLM engine ignores the torch-only settings %s",
                           ", ".join(ignored))
        return VllmEngine(VllmEngineConfig(**config.engine_settings("vllm")))
    from afa_serve.engine.torch_engine import TorchEngine, TorchEngineConfig

    if ignored := config.ignored_settings("torch"):
        logger.warning("the torch engine ignores the vLLM-only settings %s", ", ".join(ignored))
    return TorchEngine(TorchEngineConfig(**config.engine_settings("torch")))


def load_serve_config(flags: dict[str, object]) -> ServeConfig:
    """Flags given on the command line over env vars over the config file; exit 2 if invalid."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return ServeConfig(**given)
    except ConfigFileError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
            for e in error.errors()
        )
        raise typer.BadParameter(
            f"{problems} (from flags, {ENV_PREFIX}* variables or the config file)"
        ) from None


@app.command()
def serve(
    target: Annotated[str | None, typer.Option(
        help="Target model: HF id, local folder or packaged name "
             "(default: smollm2-135m-instruct).", show_default=False)] = None,
    draft: Annotated[str | None, typer.Option(
        help="Draft model (same tokenizer as the target); none decodes plainly.",
        show_default=False)] = None,
    num_speculative_tokens: Annotated[int | None, typer.Option(
        "--num-speculative-tokens", "-k", help="The most draft tokens per step (default: 4).",
        show_default=False)] = None,
    speculation: Annotated[str | None, typer.Option(
        help="Torch engine: adaptive | fixed | off (default: adaptive: each step's k, 0 "
             "included, from measured draft/verify costs and live acceptance).",
        show_default=False)] = None,
    confidence_threshold: Annotated[float | None, typer.Option(
        help="Torch engine: the draft stops proposing when its pick's probability is below "
             "this (default: 0.3; 0: never).", show_default=False)] = None,
    draft_vocab_size: Annotated[int | None, typer.Option(
        help="Torch engine: the draft's head scores only the N most frequent tokens listed in "
             "the draft's draft_vocab.json (default: 8192; 0: the whole vocabulary).",
        show_default=False)] = None,
    engine: Annotated[str | None, typer.Option(
        help="auto | torch | vllm (default: auto: vLLM when it imports, else torch).",
        show_default=False)] = None,
    host: Annotated[str | None, typer.Option(
        help="(default: 127.0.0.1)", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="(default: 8000)", show_default=False)] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Require `Authorization: Bearer KEY` on every route but /health.",
        show_default=False)] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Context limit in tokens (default: the model's).", show_default=False)] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        help="Requests decoded at once (default: 8).", show_default=False)] = None,
    max_queue: Annotated[int | None, typer.Option(
        help="Requests that may wait; beyond them 429 (default: 64).",
        show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option(
        help="auto | float32 | bfloat16 | float16 (default: auto: bf16 on CUDA, fp32 on CPU).",
        show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        help="auto | cpu | cuda | cuda:N (default: auto).", show_default=False)] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="The `model` name clients use (default: the target as given).",
        show_default=False)] = None,
    max_body_bytes: Annotated[int | None, typer.Option(
        help="Larger request bodies get 413 (default: 4 MiB).", show_default=False)] = None,
    drain_timeout_s: Annotated[float | None, typer.Option(
        "--drain-timeout", help="On SIGTERM, seconds to let running requests finish "
        "(default: 30).", show_default=False)] = None,
    log_level: Annotated[str | None, typer.Option(
        help="critical | error | warning | info | debug (default: info).",
        show_default=False)] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(
        help="vLLM: GPUs the target is split over (default: 1).", show_default=False)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="vLLM: share of GPU memory it may take (default: vLLM's; on CPU: 0.5 of host "
             "memory).", show_default=False)] = None,
    kv_cache_memory_bytes: Annotated[int | None, typer.Option(
        help="vLLM: KV cache size in bytes, instead of sizing it from free memory.",
        show_default=False)] = None,
    enforce_eager: Annotated[bool | None, typer.Option(
        "--enforce-eager", help="vLLM: skip CUDA graphs and torch.compile (faster start, "
        "slower decode).", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        help=f"YAML or JSON file with any of these settings (snake_case keys); "
             f"also ${CONFIG_FILE_ENV}.", show_default=False)] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, /metrics).

    Each setting comes from its flag, else AFA_SERVE_<NAME> (e.g. AFA_SERVE_TARGET,
    AFA_SERVE_API_KEY), else the config file, else its default.
    """
    settings = load_serve_config(dict(locals()))
    from afa_serve.api import create_app
    from afa_serve.api.server import serve as run_server

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app_ = create_app(build_engine(settings), settings.api_options())
    run_server(app_, settings.host, settings.port, settings.drain_timeout_s, settings.log_level)
