"""Command-line options derived from pydantic config models, so that each setting is written
once: as a field, with its type, default, constraints and description.

As vLLM derives its flags from its config dataclasses, a field `max_new_tokens` becomes
`--max-new-tokens`: its description is the help, its default is shown, a Literal becomes a choice,
a bool a `--x/--no-x` flag, a number's bounds are checked by the parser and shown, a tuple a
repeatable option, and a nested model's fields options of their own (its defaults those of the
parent's default instance). Options not given stay out of the values the model is built from,
so the model's defaults (or, for `ServeConfig`, its environment and config file) apply.

A command may also take `Spelling`s: other ways to write settings (vLLM's `serve MODEL`,
`--speculative-config JSON`), each turned into the fields' values; they define no setting.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, BeforeValidator, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

M = TypeVar("M", bound=BaseModel)
Handler = Callable[..., None]

# One short name and one old spelling per setting, whichever command derives it.
SHORT_NAMES = {"num_speculative_tokens": "-k"}
HIDDEN_ALIASES = {
    "num_speculative_tokens": "--k",
    "max_new_tokens": "--max-tokens",
    "limit": "--num-prompts",
    "drain_timeout_s": "--drain-timeout",
}
_ALIAS_SUFFIX = "__alias"
_SPELLING_SUFFIX = "__spelling"
_SPELLINGS_PANEL = "Other spellings"


@dataclass(frozen=True)
class Spelling:
    """Another way to write settings on the command line: a positional argument (`name` in
    capitals, "MODEL") or an option ("--model") whose value `to_fields` turns into the values of
    the model's fields (raising TypeError or ValueError for a value it cannot take)."""

    name: str
    help: str
    to_fields: Callable[[str], dict[str, Any]]

    @property
    def parameter(self) -> inspect.Parameter:
        declared: Any = typer.Option(self.name, help=self.help, show_default=False,
                                     rich_help_panel=_SPELLINGS_PANEL)
        identifier = self.name.lstrip("-").replace("-", "_")
        if not self.name.startswith("--"):
            declared = typer.Argument(metavar=self.name, help=self.help, show_default=False,
                                      rich_help_panel=_SPELLINGS_PANEL)
            identifier = f"positional_{self.name.lower()}"
        identifier += _SPELLING_SUFFIX
        return inspect.Parameter(identifier, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[str | None, declared])


def spelled_values(
    spellings: Iterable[Spelling], values: Mapping[str, Any], given_names: set[str],
    given: dict[str, Any],
) -> dict[str, Any]:
    """`given` with the fields the spellings on the command line set; a field set twice to
    different values is a usage error naming both."""
    merged = dict(given)
    for spelling in spellings:
        name = spelling.parameter.name
        if name not in given_names:
            continue
        try:
            fields = spelling.to_fields(values[name])
        except (TypeError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint=spelling.name) from None
        for field, value in fields.items():
            if field in merged and merged[field] != value:
                raise typer.BadParameter(
                    f"sets {field} to {value!r}, which is also given as {merged[field]!r}",
                    param_hint=spelling.name)
            merged[field] = value
    return merged


def _split_commas(value: Any) -> Any:
    """"a,b" or ["a,b", "c"] -> ["a", "b", "c"]; anything else as it is."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return [part.strip() for item in value for part in item.split(",") if part.strip()]
    return value


def comma_separated(item: Any) -> Any:
    """A tuple field that also takes comma-separated text: `--schedules linear,cosine`."""
    return Annotated[tuple[item, ...], BeforeValidator(_split_commas)]


def _comma_separated(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_comma_separated(member) for member in get_args(annotation))
    return get_origin(annotation) is Annotated and any(
        getattr(meta, "func", None) is _split_commas for meta in annotation.__metadata__)


@dataclass(frozen=True)
class ConfigOption:
    """One option derived from one field; `path` locates the field in the nested model."""

    path: tuple[str, ...]
    parameter: inspect.Parameter
    alias: inspect.Parameter | None

    @property
    def name(self) -> str:
        return self.parameter.name


def _without_none(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) < len(get_args(annotation)):
            return (members[0] if len(members) == 1 else functools.reduce(operator.or_, members)), True
    return annotation, False


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    annotation, _ = _without_none(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _choices(annotation: Any) -> list[str]:
    """The values of a Literal (or of the Literals in a union), as text."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType):
        return [choice for member in get_args(annotation) for choice in _choices(member)]
    return []


def _is_tuple(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return _is_tuple(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_tuple(member) for member in get_args(annotation))
    return get_origin(annotation) is tuple


_OPEN_BOUNDS = {"gt": ">", "lt": "<"}


def _bounds(field: FieldInfo) -> tuple[dict[str, float], str]:
    """(ge/le as typer's min/max, which the parser checks and shows; gt/lt as text, which the
    model checks)."""
    checked: dict[str, float] = {}
    shown: list[str] = []
    for constraint in field.metadata:
        for name, bound in (("ge", "min"), ("le", "max")):
            if isinstance(value := getattr(constraint, name, None), int | float):
                checked[bound] = value
        for name, sign in _OPEN_BOUNDS.items():
            if isinstance(value := getattr(constraint, name, None), int | float):
                shown.append(f"x{sign}{value:g}")
    return checked, f"({', '.join(shown)})" if shown else ""


def _option(name: str, field: FieldInfo, default: Any) -> tuple[Any, Any]:
    """(annotation, default) of the typer parameter for field `name`."""
    flag = "--" + name.replace("_", "-")
    annotation, optional = _without_none(field.annotation)
    names = [flag, *([SHORT_NAMES[name]] if name in SHORT_NAMES else [])]
    settings: dict[str, Any] = {"help": field.description}
    if annotation is bool:
        names = [f"{flag}/--no-{flag[2:]}"]
        python_type: Any = bool
        settings["metavar"] = ""  # a flag takes no value: show none
    elif _is_tuple(annotation):
        python_type = list[str]
        settings["metavar"] = "A,B" if _comma_separated(annotation) else "VALUE"
        default = list(default) if isinstance(default, tuple) else default
    elif _choices(annotation) or annotation in (str, Path):
        python_type = annotation
    elif annotation is SecretStr:
        python_type = str
    elif annotation in (int, float):
        python_type = annotation
        checked, shown = _bounds(field)
        settings.update(checked)
        if shown:
            settings["help"] = f"{field.description or ''} {shown}".strip()
    else:
        raise TypeError(f"no command-line form for field {name!r} of type {field.annotation}")
    if default is PydanticUndefined:
        return Annotated[python_type, typer.Option(*names, **settings)], ...
    if optional:
        python_type = python_type | None
    return Annotated[python_type, typer.Option(*names, **settings)], default


def derive_options(
    model: type[BaseModel], defaults: BaseModel | None = None, path: tuple[str, ...] = ()
) -> list[ConfigOption]:
    """One option per leaf field of `model`, nested models flattened; names must not clash."""
    options: list[ConfigOption] = []
    for name, field in model.model_fields.items():
        default = getattr(defaults, name) if defaults is not None else field.default
        if nested := _nested_model(field.annotation):
            if not isinstance(default, BaseModel):
                default = None  # fields of an unset optional model show the class defaults
            options += derive_options(nested, default, (*path, name))
            continue
        annotation, parameter_default = _option(name, field, default)
        parameter = inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=parameter_default
        )
        alias = None
        if name in HIDDEN_ALIASES:
            alias = inspect.Parameter(
                name + _ALIAS_SUFFIX, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[get_args(annotation)[0] | None,
                                     typer.Option(HIDDEN_ALIASES[name], hidden=True)],
            )
        options.append(ConfigOption((*path, name), parameter, alias))
    names = [option.name for option in options]
    if clashes := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"{model.__name__}: fields {clashes} would give the same option")
    return options


def _scalar_or_list(values: list[str], field: FieldInfo) -> str | list[str]:
    """A single value that is one of the field's Literal choices ("all-linear") goes as itself."""
    if len(values) == 1 and values[0] in _choices(field.annotation):
        return values[0]
    return values


def given_values(
    model: type[BaseModel], options: Iterable[ConfigOption], values: Mapping[str, Any],
    given_names: set[str],
) -> dict[str, Any]:
    """The options in `given_names` (those on the command line), nested as the model's fields."""
    given: dict[str, Any] = {}
    for option in options:
        if option.alias is not None and option.alias.name in given_names:
            value = values[option.alias.name]
        elif option.name in given_names:
            value = values[option.name]
        else:
            continue
        field_owner, target = model, given
        for step in option.path[:-1]:
            target = target.setdefault(step, {})
            field_owner = _nested_model(field_owner.model_fields[step].annotation)
        field = field_owner.model_fields[option.path[-1]]
        target[option.path[-1]] = (
            _scalar_or_list(value, field) if isinstance(value, list) else value
        )
    return given


def with_defaults(model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over the default instance's values wherever a nested model was partly given, so
    that `--rank 4` keeps the rest of the default adapter."""
    merged = dict(given)
    for name, value in given.items():
        default = model.model_fields[name].default
        if isinstance(value, dict) and isinstance(default, BaseModel):
            merged[name] = {**default.model_dump(), **with_defaults(type(default), value)}
    return merged


def validation_message(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'config'}: {problem['msg']}"
        for problem in error.errors()
    )


@contextmanager
def usage_errors() -> Iterator[None]:
    """An invalid combination of options is a usage error (exit status 2)."""
    try:
        yield
    except ValidationError as error:
        raise typer.BadParameter(validation_message(error)) from None


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def config_command(
    app: typer.Typer,
    model: type[M],
    *,
    name: str | None = None,
    build: Callable[[dict[str, Any]], M] | None = None,
    errors: Callable[[], AbstractContextManager[None]] = usage_errors,
    spellings: Sequence[Spelling] = (),
) -> Callable[[Handler], Handler]:
    """Register `handler(config, **own_options)` as a command whose options are `model`'s fields
    followed by the handler's own parameters, and `spellings` of the fields.

    `build` turns the given options into the model (default: validated over the defaults),
    inside `errors`, which reports what it raises."""

    def register(handler: Handler) -> Handler:
        options = derive_options(model)
        own = [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for parameter in inspect.signature(handler, eval_str=True).parameters.values()
            if parameter.name != "config"
        ]
        derived = [option.parameter for option in options]
        aliases = [option.alias for option in options if option.alias is not None]

        def command(ctx: typer.Context, **values: Any) -> None:
            given_names = {name for name in values if _on_command_line(ctx, name)}
            given = spelled_values(spellings, values, given_names,
                                   given_values(model, options, values, given_names))
            with errors():
                config = (
                    build(given) if build
                    else model.model_validate(with_defaults(model, given))
                )
            handler(config, **{parameter.name: values[parameter.name] for parameter in own})

        parameters = [*derived, *own, *aliases, *(spelling.parameter for spelling in spellings)]
        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=typer.Context)
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [context, *parameters])
        command.__annotations__ = {p.name: p.annotation for p in [context, *parameters]}
        command.__doc__ = handler.__doc__
        command.__name__ = handler.__name__
        command.config_model = model  # type: ignore[attr-defined]
        command.config_options = options  # type: ignore[attr-defined]
        command.config_spellings = tuple(spellings)  # type: ignore[attr-defined]
        app.command(name or handler.__name__.replace("_", "-"))(command)
        return handler

    return register
