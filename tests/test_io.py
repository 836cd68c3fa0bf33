import json

import pytest

from llmlab import io
from llmlab.errors import DataError, UsageError


def test_jsonl_csv_and_text_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "prompt": "x"}\n\n{"id": 2, "prompt": "y"}\n')
    (tmp_path / "a.csv").write_text('id,prompt\n1,"x, with comma"\n2,y\n')
    (tmp_path / "a.txt").write_text("first prompt\n\nsecond prompt\n")
    assert [i.fields for i in io.read_items(str(tmp_path / "a.jsonl"))] == [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}]
    assert [i.fields["prompt"] for i in io.read_items(str(tmp_path / "a.csv"))] == ["x, with comma", "y"]
    items = io.read_items(str(tmp_path / "a.txt"), text_field="text")
    assert [(i.index, i.fields) for i in items] == [(0, {"text": "first prompt"}), (1, {"text": "second prompt"})]
    assert items[1].source.endswith("a.txt line 3")


@pytest.mark.parametrize(
    "name, content, error",
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n', "bad.jsonl line 2: invalid JSON"),
        ("list.jsonl", '["a"]\n', "list.jsonl line 1: expected a JSON object"),
        ("bad.csv", 'id,prompt\n1,a\n2,b,c\n', "bad.csv line 3: 3 columns but the header has 2"),
        ("quote.csv", 'id,prompt\n1,"a"b\n', "quote.csv line 2: malformed CSV"),
        ("empty.jsonl", "\n\n", "empty.jsonl holds no inputs"),
        ("dup.csv", "a,a\n1,2\n", "dup.csv line 1: the header needs unique"),
    ],
)
def test_malformed_inputs_name_the_line(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        io.read_items(str(path))
    assert error in str(exc.value)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin.txt line 2: not UTF-8 text \(byte 6\)"):
        io.read_items(str(path))
    with pytest.raises(DataError, match="input file 'nope.jsonl' not found"):
        io.read_items("nope.jsonl")


def test_missing_field_lists_the_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x", "label": "y"}\n')
    with pytest.raises(DataError, match=r"line 1: no field 'prompt' \(fields: text, label\); choose one with --field"):
        io.require_field(io.read_items(str(path)), "prompt")


def test_duplicate_ids(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"line 3: duplicate id 'a' \(first at .*line 1\)"):
        io.check_unique_ids(io.read_items(str(path)))


def test_resume_keys_and_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "id": "a"}) + "\n" + json.dumps({"index": 1}) + "\n" + '{"index": 2, "comp')
    sink = io.Output(str(out), resume=True)
    assert sink.done == {"id:a", "index:1"}
    assert out.read_text().endswith('{"index": 1}\n')  # the torn line is gone, to be redone


def test_resume_needs_a_file():
    with pytest.raises(UsageError, match="--resume needs --output FILE"):
        io.Output(None, resume=True)


def test_writers_flush_each_record(tmp_path):
    path = tmp_path / "o.csv"
    with io.Output(str(path)) as writer:
        writer.write({"index": 0, "completion": "a,b", "completions": ["x", "y"]})
        assert path.read_text() == 'index,completion,completions\n0,"a,b","[""x"", ""y""]"\n'
