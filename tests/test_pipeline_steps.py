"""The mission's step cache (`pipeline.WorkDir.step`): a finished step is skipped, a killed one
resumes only with the same inputs, and output of other or unknown inputs is discarded."""

from __future__ import annotations

from pathlib import Path

import pytest

from draft_training.pipeline import WorkDir


class Killed(Exception):
    pass


def run(work: WorkDir, inputs: dict, calls: list[bool], kill: bool = False) -> bool:
    """One step whose action appends to its output; returns whether it ran."""
    output = work.root / "out.txt"

    def action(stale: bool) -> None:
        calls.append(stale)
        if stale:
            output.unlink(missing_ok=True)
        with output.open("a") as handle:
            handle.write(f"{inputs}\n")
        if kill:
            raise Killed

    return work.step("step", inputs, output, action).ran


def test_a_killed_step_resumes_with_its_inputs_and_starts_afresh_with_others(tmp_path: Path):
    work = WorkDir(tmp_path, log=lambda _: None)
    calls: list[bool] = []
    with pytest.raises(Killed):
        run(work, {"prompts": 6}, calls, kill=True)
    assert run(work, {"prompts": 6}, calls)  # resumed: what the killed run wrote stays
    assert (tmp_path / "out.txt").read_text().splitlines() == ["{'prompts': 6}"] * 2
    assert not run(work, {"prompts": 6}, calls)  # finished: skipped
    with pytest.raises(Killed):
        run(work, {"prompts": 8}, calls, kill=True)
    assert run(work, {"prompts": 6}, calls)  # the killed run had other inputs: discarded
    assert (tmp_path / "out.txt").read_text().splitlines() == ["{'prompts': 6}"]
    assert calls == [False, False, True, True]


def test_output_without_a_marker_is_discarded(tmp_path: Path):
    work = WorkDir(tmp_path, log=lambda _: None)
    (tmp_path / "out.txt").write_text("made by hand\n")
    calls: list[bool] = []
    assert run(work, {"prompts": 6}, calls)
    assert calls == [True]
    assert (tmp_path / "out.txt").read_text() == "{'prompts': 6}\n"
