"""The one JSONL reader and writer (causal_attn.data.jsonl) and the commands' use of it."""
from __future__ import annotations

import json

import pytest

from causal_attn.cli import main
from causal_attn.data.jsonl import JsonlError, numbered_jsonl, read_jsonl, write_jsonl
from causal_attn.data.llm import JsonlCache


def _file(tmp_path, data: bytes | str, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_reads_objects_in_order_skipping_blank_lines(tmp_path):
    path = _file(tmp_path, '\ufeff{"a": 1}\n\n   \n{"a": "é"}\r\n{"a": 3}')  # BOM, blanks, CRLF, no final newline
    assert read_jsonl(path) == [{"a": 1}, {"a": "é"}, {"a": 3}]
    read = numbered_jsonl(path)
    assert [n for n, _ in read.records] == [1, 4, 5] and read.skipped == 0 and not read.ends_with_newline
    assert numbered_jsonl(_file(tmp_path, "", "empty.jsonl")).records == []


@pytest.mark.parametrize("text, line, says", [
    ('{"a": 1}\n{"a": \n{"a": 3}\n', 2, "not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', 2, "must be a JSON object, got list"),
    ('"text"\n{"a": 1}\n', 1, "must be a JSON object, got str"),
    ('{"a": 1}\n{"a": 2, "b": "cut', 2, "the last line is cut off"),
    ('{"a": 1}\n[1, 2]', 2, "must be a JSON object"),  # parses: not a torn write
])
def test_bad_line_names_file_and_line(tmp_path, text, line, says):
    path = _file(tmp_path, text)
    with pytest.raises(JsonlError, match=says) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_bad_bytes_and_a_write_cut_inside_a_character(tmp_path):
    with pytest.raises(JsonlError, match=r":2: not UTF-8"):
        read_jsonl(_file(tmp_path, b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}\n'))
    cut = '{"a": 1}\n'.encode() + '{"a": "é"}'.encode()[:-3]  # ends inside the two bytes of é
    with pytest.raises(JsonlError, match=r":2: the last line is cut off"):
        read_jsonl(_file(tmp_path, cut))


def test_skip_bad_counts_instead_of_raising(tmp_path):
    path = _file(tmp_path, '{"a": 1}\nnope\n[1]\n{"a": 2}\n{"a": 3, "b')
    read = numbered_jsonl(path, skip_bad=True)
    assert [r for _, r in read.records] == [{"a": 1}, {"a": 2}] and read.skipped == 3


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")


def test_write_then_read_round_trip_and_whole_or_nothing(tmp_path):
    recs = [{"input": "é ü", "n": i} for i in range(3)]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(recs, path) == 3 and read_jsonl(path) == recs
    assert path.read_text(encoding="utf-8").count("\n") == 3 and "é" in path.read_text(encoding="utf-8")

    def broken():
        yield {"n": 0}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), path)
    assert read_jsonl(path) == recs and sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


def test_cache_skips_torn_and_keyless_lines_and_continues_on_a_fresh_line(tmp_path):
    path = _file(tmp_path, '{"key": "a", "status": "ok"}\n{"status": "ok"}\n{"key": ["x"]}\n{"key": "b", "sta')
    cache = JsonlCache(path)
    assert cache.corrupt_lines == 3 and len(cache) == 1
    cache.put({"key": "c", "status": "ok"})
    again = JsonlCache(path)
    assert sorted(r["key"] for r in again.records()) == ["a", "c"] and again.corrupt_lines == 3


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_commands_report_bad_jsonl_as_one_line_with_file_and_line(tmp_path, capsys):
    torn = _file(tmp_path, json.dumps({"input": "a", "target": "b", "answer": "yes", "generation": "yes"}) +
                 '\n{"input": "a", "tar', "torn.jsonl")
    for argv in (["annotate", "--coverage", str(torn)], ["capt", "score", "--data", str(torn)],
                 ["capt", "symbolize", "--data", str(torn), "--out", str(tmp_path / "o.jsonl")]):
        err = _cli_error(capsys, argv)
        assert f"{torn}:2: the last line is cut off" in err and "Traceback" not in err, argv
    empty = _file(tmp_path, "\n\n", "empty.jsonl")
    assert f"{empty}: no records" in _cli_error(capsys, ["capt", "score", "--data", str(empty)])
    keyless = _file(tmp_path, '{"answer": "yes", "generation": "yes"}\n\n{"answer": "no"}\n', "k.jsonl")
    assert f"{keyless}:3: record has no 'generation' field" in _cli_error(capsys, ["capt", "score", "--data",
                                                                                  str(keyless)])
    assert "cannot read" in _cli_error(capsys, ["capt", "score", "--data", str(tmp_path / "missing.jsonl")])
