"""The CLIs' options are derived from the config models: one option per field, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from afa_serve.cli import app as serve_app
from afa_serve.config_cli import HIDDEN_ALIASES, config_command, derive_options
from draft_training.cli import app as train_app
from draft_training.compare import COMPARE_MISSION, CompareConfig


def leaf_fields(model: type[BaseModel]) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        nested = [arg for arg in (field.annotation, *getattr(field.annotation, "__args__", ()))
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
        names += leaf_fields(nested[0]) if nested else [name]
    return names


def config_commands() -> list[tuple[typer.Typer, str, type[BaseModel], list[str]]]:
    found = []
    for app in (serve_app, train_app):
        for info in app.registered_commands:
            model = getattr(info.callback, "config_model", None)
            if model is not None:
                own = [name for name in info.callback.__signature__.parameters
                       if name not in {o.name for o in info.callback.config_options}
                       and not name.endswith(("__alias", "__spelling")) and name != "ctx"]
                found.append((app, info.name, model, own))
    return found


def typer_command(app: typer.Typer, name: str):
    return next(info.callback for info in app.registered_commands if info.name == name)


def test_every_config_backed_command_is_found():
    names = sorted(name for _, name, _, _ in config_commands())
    assert names == ["bench", "compare", "eval", "fit", "generate", "init-draft", "mission", "score", "serve"]


@pytest.mark.parametrize("app, name, model, own", config_commands(),
                         ids=[name for _, name, _, _ in config_commands()])
def test_each_field_has_exactly_one_option_and_each_option_a_field(app, name, model, own):
    command = typer.main.get_command(app).commands[name]
    spellings = typer_command(app, name).config_spellings
    spelled = {spelling.parameter.name for spelling in spellings}
    visible = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    derived = [p for p in visible if p.name not in own and p.name not in spelled]
    # other spellings (vLLM's) are declared as such: no field of their own
    assert spelled == {p.name for p in visible if p.name.endswith("__spelling")}
    fields = leaf_fields(model)
    assert sorted(p.name for p in derived) == sorted(fields)  # no field twice, none missing
    for parameter in derived:
        assert f"--{parameter.name.replace('_', '-')}" in parameter.opts
    hidden = [p for p in command.params if getattr(p, "hidden", False)]
    assert {p.opts[0] for p in hidden} == {HIDDEN_ALIASES[f] for f in fields if f in HIDDEN_ALIASES}


class Inner(BaseModel):
    rank: int = 16
    names: tuple[str, ...] = ("a", "b")


class Outer(BaseModel):
    inner: Inner = Inner(rank=8)
    eager: bool = False
    limit: int | None = None


def run(*args: str) -> Outer:
    app = typer.Typer()
    seen: list[Outer] = []

    @config_command(app, Outer)
    def show(config: Outer) -> None:
        seen.append(config)

    @app.command()
    def other() -> None:  # a second command, so that `show` is invoked by name
        pass

    result = CliRunner().invoke(app, ["show", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_options_not_given_keep_the_default_instance_and_given_ones_replace_it():
    assert run() == Outer()
    assert run("--names", "x", "--names", "y").inner == Inner(rank=8, names=("x", "y"))
    assert run("--eager").eager and not run("--no-eager").eager
    assert run("--num-prompts", "3").limit == 3  # the hidden old spelling of --limit


def test_nested_defaults_are_the_parents_default_instance():
    options = {o.name: o for o in derive_options(CompareConfig)}
    assert options["num_prompts"].parameter.default == COMPARE_MISSION.num_prompts == 120
    assert options["steps"].parameter.default == COMPARE_MISSION.steps == 150  # not mission's
    assert CompareConfig.model_fields["mission"].default is COMPARE_MISSION
    assert options["work_dir"].parameter.default == Path("afa-train-work-compare")


def test_mission_profiles_and_compare_keep_their_steps_in_separate_folders():
    from draft_training.pipeline import FULL_PROFILE, MissionConfig

    folders = {MissionConfig().work_dir, FULL_PROFILE["work_dir"], COMPARE_MISSION.work_dir}
    assert len(folders) == 3


def test_fit_method_full_trains_without_an_adapter(tmp_path):
    from draft_training.run import FitConfig

    given = {"draft": "d", "data": tmp_path, "out": tmp_path, "adapter": {"method": "full"}}
    assert FitConfig.model_validate(given).adapter is None
