"""The OpenAI-compatible HTTP API over an engine (knows engines only through engine.base)."""

from afa_serve.api.app import create_app
from afa_serve.api.state import ApiOptions

__all__ = ["ApiOptions", "create_app"]
