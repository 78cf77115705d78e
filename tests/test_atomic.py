"""JSONL artefacts: replaced whole or not at all, appended in whole lines, torn tails cut."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from afa_serve.atomic import append_jsonl, recover_jsonl, write_jsonl


def test_write_jsonl_replaces_the_file_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_jsonl(path, [{"id": "old"}, {"id": "stale"}])
    write_jsonl(path, [{"id": "new", "text": "é ✓"}, {"id": "second"}])
    assert recover_jsonl(path) == [{"id": "new", "text": "é ✓"}, {"id": "second"}]
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]  # no temporary left


def test_write_jsonl_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    write_jsonl(path, [{"id": "kept"}])

    def records() -> Iterator[dict]:
        yield {"id": "half"}
        raise RuntimeError("killed while serialising")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert recover_jsonl(path) == [{"id": "kept"}]
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]


def test_recover_cuts_a_torn_last_line_so_appends_start_fresh(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    append_jsonl(path, [{"id": "whole"}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "to')  # a writer killed mid-line
    assert recover_jsonl(path) == [{"id": "whole"}]
    append_jsonl(path, [{"id": "next"}])
    assert recover_jsonl(path) == [{"id": "whole"}, {"id": "next"}]
