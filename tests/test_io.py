import json
import os
import re
import signal

import pytest

from llmlab.io import records as io
from llmlab.core.errors import DataError, UsageError


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


# ---------------------------------------------------------------- issue 10: lines, text fields, lock, resume


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085", "\x0c", "\x1e"])
def test_only_newline_ends_a_line(tmp_path, sep):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": f"a{sep}b"}, ensure_ascii=False) + "\r\n{\"prompt\": \"c\"}\n", encoding="utf-8")
    assert [i.fields["prompt"] for i in io.read_items(str(path))] == [f"a{sep}b", "c"]
    (tmp_path / "a.txt").write_text(f"one{sep}prompt\r\ntwo\n", encoding="utf-8")
    assert [i.fields["prompt"] for i in io.read_items(str(tmp_path / "a.txt"))] == [f"one{sep}prompt", "two"]
    assert io.lines("x\r\ny\n\nz") == ["x", "y", "", "z"]


def test_resume_reads_its_own_output_holding_u2028(tmp_path):
    out = tmp_path / "out.jsonl"
    with io.Output(str(out)) as writer:
        writer.write({"index": 0, "prompt": "a\u2028b", "completion": "c\u0085d"})
    sink = io.Output(str(out), resume=True)
    assert sink.done == {"index:0"}
    items = [io.Item(0, {"prompt": "a\u2028b"}, "x line 1"), io.Item(1, {"prompt": "e"}, "x line 2")]
    assert [i.index for i in sink.pending(items)] == [1]


@pytest.mark.parametrize("value, kind", [(None, "null"), (True, "true"), ([1], "a list"), ({"a": 1}, "an object"),
                                         (float("nan"), "the number nan")])
def test_non_text_fields_are_errors_naming_line_and_field(value, kind):
    items = [io.Item(0, {"prompt": "ok"}, "in.jsonl line 1"), io.Item(1, {"prompt": value}, "in.jsonl line 2")]
    with pytest.raises(DataError, match=rf"^in.jsonl line 2: field 'prompt' is {kind}, not text; give it a string"):
        io.require_field(items, "prompt")


def test_numbers_are_their_json_text_with_one_warning(capsys):
    items = [io.Item(i, {"q": v, "n": v}, f"in.jsonl line {i + 1}") for i, v in enumerate(["a", 7, 0.5])]
    io.require_text(items, ["q", "n"])
    err = capsys.readouterr().err
    assert err == ("warning: in.jsonl line 2: field 'q' is the number 7, not text; using the text '7' "
                   "(4 numbers in all are used as text)\n")


def test_a_second_writer_fails_at_once(tmp_path):
    out = tmp_path / "out.jsonl"
    first = io.Output(str(out))
    assert (tmp_path / ".out.jsonl.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(DataError, match=rf"^{out} is being written by another llmlab process \(pid {os.getpid()}\); "):
        io.Output(str(out), resume=True)
    first.close()
    assert not (tmp_path / ".out.jsonl.lock").exists()
    with io.Output(str(out)) as writer:  # free again
        writer.write({"index": 0})
    assert io.Output("-").path is None  # stdout: nothing to lock


@pytest.mark.parametrize("done, error", [
    ('{"index": 0, "prompt": "a"}\n{"index": 1, "prompt": "OTHER"}\n',
     "line 2 was written from a different input (its 'prompt' differs from in line 2)"),
    ('{"index": 5, "prompt": "a"}\n', "line 1 was written from a different input (its index 5 is not among the inputs)"),
    ('{"index": 0, "id": "z", "prompt": "a"}\n', "(its id z is not among the inputs)"),
])
def test_resume_refuses_an_output_of_another_input(tmp_path, done, error):
    out = tmp_path / "out.jsonl"
    out.write_text(done)
    items = [io.Item(i, {"prompt": p}, f"in line {i + 1}") for i, p in enumerate("abc")]
    with pytest.raises(DataError, match=re.escape(error) + "; write to a different --output, or drop --resume"):
        io.Output(str(out), resume=True).pending(items)


def test_resume_accepts_its_csv_output(tmp_path):
    out = tmp_path / "out.csv"
    items = [io.Item(0, {"id": 1, "prompt": "a, b", "n": 2.5}, "in line 1"), io.Item(1, {"id": 2, "prompt": "c"}, "in line 2")]
    with io.Output(str(out)) as writer:
        writer.write({"index": 0, **items[0].fields, "completion": "x"})
    assert io.Output(str(out), resume=True).pending(items) == items[1:]


def test_output_path_checked_up_front(tmp_path):
    with pytest.raises(DataError, match="is a directory; give a file name inside it"):
        io.Output(str(tmp_path))
    with pytest.raises(DataError, match=f"folder '{tmp_path}/no' does not exist; create it first"):
        io.Output(str(tmp_path / "no" / "out.jsonl"))
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="is the input file itself"):
        io.check_output_path(str(source), inputs=[str(source)])
    assert source.read_text() == '{"prompt": "a"}\n'


def test_sigterm_stops_a_write_like_ctrl_c(tmp_path):
    out = tmp_path / "out.jsonl"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        with io.Output(str(out)) as writer:
            for n in range(1000):
                writer.write({"index": n})
                if n == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.code == 143
    assert out.read_text() == "".join(json.dumps({"index": n}) + "\n" for n in range(3))
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / ".out.jsonl.lock").exists()


def test_library_warnings_go_to_the_llmlab_log_and_the_cli_shows_them(capsys, monkeypatch):
    import logging

    from llmlab.core import console

    items = [io.Item(0, {"prompt": 42}, "row 1")]
    # A program that imports llmlab and configures no logging sees nothing: library code never prints.
    monkeypatch.setattr(logging.getLogger("llmlab"), "handlers", [logging.NullHandler()])
    io.require_text(items, ["prompt"])
    assert capsys.readouterr().err == ""
    console.configure()  # what every command does: the "llmlab" log is shown on stderr
    io.require_text(items, ["prompt"])
    assert capsys.readouterr().err == "warning: row 1: field 'prompt' is the number 42, not text; using the text '42'\n"
