"""JSON-lines files across kills: atomic rewrites; a cut last line is dropped only when allowed."""

import json

import pytest

from ipo_gap import jsonl


def test_rows_round_trip_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "m.jsonl"
    assert jsonl.read_rows(path) == []
    rows = [{"step": 0, "loss": 0.5}, {"step": 1, "loss": 0.25}]
    jsonl.write_rows(path, rows)
    assert jsonl.read_rows(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temporary file left


def test_a_cut_last_line_is_dropped_only_when_allowed(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 0}) + "\n" + '{"step": 1, "lo')
    assert jsonl.read_rows(path, cut_tail_ok=True) == [{"step": 0}]
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a JSON line"):
        jsonl.read_rows(path)


def test_a_bad_line_before_the_last_is_damage_and_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a JSON line"):
        jsonl.read_rows(path, cut_tail_ok=True)


def test_write_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "done.json"
    path.write_text("old and longer content")
    jsonl.write_atomic(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
