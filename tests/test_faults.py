"""The fault table (issue 10): bad inputs, templates, options, caches and concurrent writers, each run as
a user would run it (in-process CliRunner, tiny models), with the exit code, a piece of the one stderr
line, and the records left in the output file. Signals during batch runs: tests/test_signals.py.

Placeholders in args, files and env: {tmp} the test's folder, {llama} {gpt2} {t5} a model (all the same
FakeLM: the table checks input and option handling, not the model), {nomodel} a model path that does not
exist (a case using it proves its check runs before model load: otherwise the run would fail with exit 4
on the model instead). Cases with `real` go through llmlab's real loading path (GGUF files, the cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from helpers import invoke, jsonl, read_only
from llmlab.io import locks
from llmlab.backends import models

TOY = """\
name: toy
task: classify
input: "Review: {text}\\nSentiment:"
target: label
labels:
  pos: positive
  neg: negative
examples:
  - {text: great fun, label: pos}
  - {text: so dull, label: neg}
  - {text: loved it, label: pos}
  - {text: awful mess, label: neg}
"""
GEN = 'name: gen\ninput: "Q: {question}\\nA:"\n'
LABELED = "".join(json.dumps({"id": f"r{i}", "text": t, "label": l}) + "\n" for i, (t, l) in
                  enumerate([("great movie", "pos"), ("dull film", "neg"), ("fine", "pos")]))


def rec(index: int, **fields: Any) -> str:
    """One llmlab generate record, as a line of out.jsonl."""
    return json.dumps({"index": index, **fields, "completion": "x", "prompt_tokens": 1, "completion_tokens": 1,
                       "finish_reason": "length", "model": "m"}, ensure_ascii=False) + "\n"


@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    stderr: str  # a piece of stderr ("" = anything; errors must be ONE line either way)
    rows: int | None = None  # records in {tmp}/out.jsonl afterwards; None: no out.jsonl
    files: dict[str, str | bytes] = field(default_factory=dict)
    stdin: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, Any], None] | None = None
    needs: str | None = None  # "branch: what": fails until that helper's branch is merged (strict xfail)
    skip: str | None = None
    real: bool = False  # the real loading path, not the FakeLM
    window: int = 4096  # the FakeLM's context window, in tokens (characters)


G = ["generate", "-m", "{llama}", "--max-new-tokens", "2"]
GI = G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"]
C = ["classify", "-m", "{llama}", "-t", "{tmp}/toy.yaml"]
CI = C + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"]
EV = ["eval", "-m", "{llama}", "-t", "{tmp}/toy.yaml", "--data", "{tmp}/in.jsonl"]
P2 = '{"prompt": "a"}\n{"prompt": "b"}\n'
TWO = rec(0, prompt="a") + rec(1, prompt="b")


def _hold_lock(tmp: Path) -> None:
    lock = locks.OutputLock(str(tmp / "out.jsonl"))
    lock.acquire()  # a real flock: a second open file description conflicts even within this process
    _held.append(lock)


_held: list[locks.OutputLock] = []


def _read_only(name: str) -> Callable[[Path], None]:
    """The case's file or folder `name` read-only during the run, as root too (helpers.read_only)."""
    def setup(tmp: Path) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(read_only(tmp / name))
        _held.append(SimpleNamespace(release=stack.close))  # released after the run, with the locks
    return setup


def _number_used_as_text(tmp: Path, result: Any) -> None:
    rows = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    assert rows[1]["prompt"] == "42" and rows[2]["prompt"] == "2.5"
    assert result.stderr.count("warning:") == 1  # once, however many numbers


def _input_intact(tmp, result):
    assert (tmp / "in.jsonl").read_text() == P2  # refused before opening: the input is untouched


def _null_label_unlabeled(tmp: Path, result: Any) -> None:
    rows = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    assert ["correct" in r for r in rows] == [True, False, True]  # null gold: unlabeled, not "None"


def _one_warning(tmp: Path, result: Any) -> None:
    assert result.stderr.count("--shots 50") == 1


def _bad_gguf(tmp: Path) -> None:
    # the embedded model cut to its first 4 MB: a download or copy that stopped short
    with open(models.embedded_gguf(), "rb") as f:
        (tmp / "bad.gguf").write_bytes(f.read(4_000_000))


def _corrupt_cache(tmp: Path) -> None:
    """A converted-model cache entry for bad.gguf whose model.safetensors was cut short by a crash:
    its header describes 400 bytes of tensor data, and only half of them were written."""
    _bad_gguf(tmp)
    target = models.gguf_cache_dir(models.resolve_model(str(tmp / "bad.gguf")))
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "llama"}')
    (target / "tokenizer_config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    (target / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 200)


def _corrupt_moved_aside(tmp: Path, result: Any) -> None:
    target = models.gguf_cache_dir(models.resolve_model(str(tmp / "bad.gguf")))
    assert not (target / "model.safetensors").exists()


def _stale_staging(tmp: Path) -> None:
    _bad_gguf(tmp)
    target = models.gguf_cache_dir(models.resolve_model(str(tmp / "bad.gguf")))
    staging = target.parent / f"{target.name}.k1ll3d"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 1000)
    old = time.time() - 2 * 3600
    os.utime(staging, (old, old))


def _staging_gone(tmp: Path, result: Any) -> None:
    assert not list((tmp / "cache" / "gguf").glob("*.k1ll3d"))


def _cache_is_a_file(tmp: Path) -> None:
    _bad_gguf(tmp)
    (tmp / "cachefile").write_text("not a folder")


def _says_truncated(tmp: Path, result: Any) -> None:
    assert "truncated" in result.stderr


# ---- issue 27 helpers


class _Planted:
    """Unpickling this makes the folder `path`: proof that a cache file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pool_index(tmp: Path, kind: str = "tfidf") -> Path:
    from llmlab.prompting import retrieval

    retrieval._MEMO.clear()
    texts = ["great fun", "so dull", "loved it", "awful mess"]  # TOY's examples
    path = retrieval.cache_dir() / f"tfidf-{retrieval.pool_hash(texts)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _planted_pickle(tmp: Path) -> None:
    import pickle

    path = _pool_index(tmp)
    payload = pickle.dumps(_Planted(str(tmp / "pwned")))
    path.write_bytes(payload)
    path.with_suffix(".pkl").write_bytes(payload)  # where the old loader looked


def _planted_in_npz(tmp: Path) -> None:
    import numpy as np

    with open(_pool_index(tmp), "wb") as f:
        np.savez(f, meta=np.array([_Planted(str(tmp / "pwned"))], dtype=object))


def _wrong_shape_index(tmp: Path) -> None:
    import numpy as np

    from llmlab.prompting import retrieval

    # a well-formed index of another pool (3 rows) under this pool's name
    retrieval._save(_pool_index(tmp), {"idf": np.ones(2), "data": np.ones(3), "indices": np.array([0, 1, 0]),
                                       "indptr": np.array([0, 1, 2, 3])},
                    {"kind": "tfidf", "shape": [3, 2], "terms": ["a", "b"]})


def _index_rebuilt(tmp: Path, result: Any) -> None:
    from llmlab.prompting import retrieval

    assert not (tmp / "pwned").exists()  # nothing was unpickled
    path = _pool_index(tmp)
    assert retrieval._load(path)[1]["shape"] == [4, 12]  # rebuilt: TOY's 4 examples, 8 words + 4 pairs
    assert len(list(path.parent.glob(path.name + ".bad-*"))) == 1  # the bad file is kept aside
    out = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    assert all(r["prediction"] in ("pos", "neg") for r in out)


def _link_held(kind: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (os.symlink if kind == "symlink" else os.link)(tmp / "out.jsonl", tmp / "link.jsonl")
        _hold_lock(tmp)
    return setup


NOEX = TOY.split("examples:")[0]  # TOY without its examples
EXFILE = TOY.split("examples:")[0] + "examples: {where}\n"
POOL = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [("good", "pos"), ("bad", "neg")])


def _fifo(name: str) -> Callable[[Path], None]:
    return lambda tmp: os.mkfifo(tmp / name)


def _sparse(tmp: Path) -> None:
    with open(tmp / "t" / "big.jsonl", "wb") as f:  # a hole: 257 MiB that take no disk
        f.truncate(257 << 20)


def _listed_without_reading(tmp: Path, result: Any) -> None:
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert "toy" in names and result.stderr == ""


SAME = "".join(json.dumps({"text": "the same words", "label": lab}) + "\n" for lab in ["pos", "neg"] * 6)


def _fits(stderr: str) -> int:
    """How many probe fits a run announced (the one line each, shown even when piped)."""
    return sum(line.startswith("fitting the probe: ") for line in stderr.splitlines())


def _besides_fits(stderr: str) -> str:
    return "".join(line + "\n" for line in stderr.splitlines() if not line.startswith("fitting the probe: "))
# the FakeLM's states count 'good' and 'bad' in the input: a probe learns these
VARIED = "".join(json.dumps({"text": f"{w} film {i}", "label": lab}) + "\n"
                 for i, (w, lab) in enumerate([("good", "pos"), ("bad", "neg")] * 6))


LONG = " ".join(["the film was terrible and boring"] * 40)  # ~240 tokens: over tiny gpt2's 64-token window

CASES = [
    # ---- already right: one clear line, the line number, nothing written
    Case("bad-json-line", GI, 3, "in.jsonl line 2: invalid JSON", files={"in.jsonl": '{"prompt": "a"}\n{"prompt": oops}\n'}),
    Case("not-an-object", GI, 3, "in.jsonl line 1: expected a JSON object", files={"in.jsonl": '["a"]\n'}),
    Case("missing-field", GI, 3, "in.jsonl line 1: no field 'prompt' (fields: text); choose one with --field",
         files={"in.jsonl": '{"text": "x"}\n'}),
    Case("duplicate-ids", GI, 3, "in.jsonl line 3: duplicate id 'a'",
         files={"in.jsonl": '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n'}),
    Case("non-utf8", GI, 3, "in.jsonl line 2: not UTF-8 text", files={"in.jsonl": b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'}),
    Case("empty-file", GI, 3, "in.jsonl holds no inputs", files={"in.jsonl": "\n\n"}),
    Case("missing-input", G + ["-i", "{tmp}/nope.jsonl"], 3, "nope.jsonl' not found"),
    Case("input-is-a-folder", G + ["-i", "{tmp}"], 3, "is a directory, not a file"),
    Case("csv-columns", G + ["-i", "{tmp}/in.csv"], 3, "in.csv line 3: 3 columns but the header has 2",
         files={"in.csv": "id,prompt\n1,a\n2,b,c\n"}),
    Case("csv-quote", G + ["-i", "{tmp}/in.csv"], 3, "in.csv line 2: malformed CSV", files={"in.csv": 'id,prompt\n1,"a"b\n'}),
    Case("batch-size-0", GI + ["--batch-size", "0"], 2, "invalid --batch-size '0'", files={"in.jsonl": P2}),
    Case("resume-needs-output", G + ["-i", "{tmp}/in.jsonl", "--resume"], 2, "--resume needs --output FILE",
         files={"in.jsonl": P2}),
    Case("resume-text-output", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/out.txt", "--resume"], 2,
         "plain text keeps no ids", files={"in.jsonl": P2}),
    Case("input-and-prompt", G + ["-i", "{tmp}/in.jsonl", "hello"], 2, "not both", files={"in.jsonl": P2}),
    Case("no-prompt", G, 2, "no prompt", stdin=""),
    Case("classify-generate-template", C[:3] + ["-t", "{tmp}/gen.yaml", "x"], 2, "is a generate template",
         files={"gen.yaml": GEN}),
    Case("no-such-template", C[:3] + ["-t", "nosuch", "x"], 3, "no template named 'nosuch'"),
    Case("bad-yaml", C[:3] + ["-t", "{tmp}/bad.yaml", "x"], 3, "bad.yaml line 3, column 1: invalid YAML",
         files={"bad.yaml": "name: x\ninput: [unclosed\n"}),
    Case("unknown-template-key", C[:3] + ["-t", "{tmp}/k.yaml", "x"], 3, "unknown key 'inputs'",
         files={"k.yaml": 'input: "{text}"\ninputs: x\n'}),
    Case("template-field-missing", CI, 3, "in.jsonl line 1: no field 'text' for template 'toy'",
         files={"toy.yaml": TOY, "in.jsonl": '{"review": "x"}\n'}),
    Case("eval-unknown-label", EV, 3, "label 'meh' is not one of",
         files={"toy.yaml": TOY, "in.jsonl": '{"text": "x", "label": "meh"}\n'}),
    Case("resume-torn-last-line", GI + ["--resume"], 0, "", rows=2,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a") + '{"index": 1, "prompt": "b", "compl'}),
    Case("resume-all-done", GI + ["--resume"], 0, "", rows=2, files={"in.jsonl": P2, "out.jsonl": TWO}),
    # ---- fixed on this branch (faults)
    Case("u2028-in-json-strings", GI, 0, "", rows=3,
         files={"in.jsonl": '{"prompt": "a\u2028b"}\n{"prompt": "c\u2029d"}\n{"prompt": "e\u0085f"}\n'}),
    Case("resume-own-output-with-u2028", GI + ["--resume"], 0, "", rows=2,
         files={"in.jsonl": '{"prompt": "a\u2028b"}\n{"prompt": "c\u0085d"}\n', "out.jsonl": rec(0, prompt="a\u2028b")}),
    Case("txt-line-with-u2028", G + ["-i", "{tmp}/in.txt", "-o", "{tmp}/out.jsonl"], 0, "", rows=1,
         files={"in.txt": "one\u2028prompt\n"}),
    Case("null-prompt", GI, 3, "in.jsonl line 2: field 'prompt' is null, not text",
         files={"in.jsonl": '{"prompt": "a"}\n{"prompt": null}\n'}),
    Case("list-prompt", GI, 3, "in.jsonl line 1: field 'prompt' is a list, not text", files={"in.jsonl": '{"prompt": ["a"]}\n'}),
    Case("bool-prompt", GI, 3, "in.jsonl line 1: field 'prompt' is true, not text", files={"in.jsonl": '{"prompt": true}\n'}),
    Case("number-prompt-is-its-text", GI, 0, "in.jsonl line 2: field 'prompt' is the number 42, not text; using the "
         "text '42' (2 numbers in all are used as text)", rows=3,
         files={"in.jsonl": '{"prompt": "a"}\n{"prompt": 42}\n{"prompt": 2.5}\n'}, check=_number_used_as_text),
    Case("null-classify-text", CI, 3, "in.jsonl line 2: field 'text' is null, not text",
         files={"toy.yaml": TOY, "in.jsonl": '{"text": "good"}\n{"text": null}\n'}),
    Case("null-eval-text", EV, 3, "in.jsonl line 1: field 'text' is null, not text",
         files={"toy.yaml": TOY, "in.jsonl": '{"text": null, "label": "pos"}\n'}),
    Case("null-template-field", G + ["-t", "{tmp}/gen.yaml", "-i", "{tmp}/in.jsonl"], 3,
         "in.jsonl line 1: field 'question' is null", files={"gen.yaml": GEN, "in.jsonl": '{"question": null}\n'}),
    Case("null-in-template-example", C[:3] + ["-t", "{tmp}/t.yaml", "x"], 3, "example 1 field 'text' is null",
         files={"t.yaml": TOY.replace("{text: great fun, label: pos}", "{text: null, label: pos}")}),
    Case("second-writer", GI, 3, "out.jsonl is being written by another llmlab process (pid ", rows=1,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a")}, setup=_hold_lock),
    Case("second-writer-resume", CI + ["--resume"], 3, "is being written by another llmlab process", rows=None,
         files={"toy.yaml": TOY, "in.jsonl": LABELED}, setup=_hold_lock),
    Case("resume-different-input", GI + ["--resume"], 3, "out.jsonl line 1 was written from a different input "
         "(its 'prompt' differs from ", rows=2,
         files={"in.jsonl": '{"prompt": "c"}\n{"prompt": "d"}\n{"prompt": "e"}\n', "out.jsonl": TWO}),
    Case("resume-different-ids", CI + ["--resume"], 3, "(its id a1 is not among the inputs); write to a different "
         "--output, or drop --resume", rows=1, files={"toy.yaml": TOY, "in.jsonl": LABELED,
                                                      "out.jsonl": json.dumps({"index": 0, "id": "a1", "text": "x"}) + "\n"}),
    Case("duplicate-label", C + ["x"], 3, "label 'pos' is listed twice",
         files={"toy.yaml": 'task: classify\ninput: "{text}"\ntarget: label\nlabels: [pos, neg, pos]\n'}),
    Case("same-verbalizer", C + ["x"], 3, "labels 'pos' and 'good' have the same text 'positive'",
         files={"toy.yaml": TOY.replace("  neg: negative\n", "  neg: negative\n  good: positive\n")}),
    Case("shots-over-pool", CI + ["--shots", "50"], 0, "--shots 50, but template 'toy' has only 4 examples to show: "
         "using 4", rows=3, files={"toy.yaml": TOY, "in.jsonl": LABELED}, check=_one_warning),
    Case("output-is-a-folder", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/sub", "-m", "{nomodel}"], 3,
         "is a directory; give a file name inside it", files={"in.jsonl": P2, "sub/keep": ""}),
    Case("output-folder-missing", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/no/out.jsonl", "-m", "{nomodel}"], 3,
         "folder '{tmp}/no' does not exist; create it first", files={"in.jsonl": P2}),
    Case("null-label-is-unlabeled", CI, 0, "", rows=3, check=_null_label_unlabeled,
         files={"toy.yaml": TOY, "in.jsonl": LABELED.replace('"label": "neg"', '"label": null')}),
    Case("output-is-the-input", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/in.jsonl", "-m", "{nomodel}"], 3,
         "is the input file itself", files={"in.jsonl": P2}, check=_input_intact),
    Case("output-folder-read-only", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/ro/out.jsonl", "-m", "{nomodel}"], 3,
         "error: --output '{tmp}/ro/out.jsonl': folder '{tmp}/ro' is not writable; choose another folder",
         files={"in.jsonl": P2, "ro/keep": ""}, setup=_read_only("ro")),
    Case("output-file-read-only", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl", "-m", "{nomodel}"], 3,
         "error: --output '{tmp}/out.jsonl' is not writable; choose another file or fix its permissions", rows=1,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a")}, setup=_read_only("out.jsonl")),
    # ---- other branches' items: strict xfail here until merged
    Case("shots-negative-before-load", C[:1] + ["-m", "{nomodel}", "-t", "{tmp}/toy.yaml", "--shots", "-1", "x"], 2,
         "invalid --shots -1", files={"toy.yaml": TOY}),
    Case("overflow-bad-before-load", C[:1] + ["-m", "{nomodel}", "-t", "{tmp}/toy.yaml", "--overflow", "BAD", "x"], 2,
         "'BAD' is not one of 'drop-shots', 'truncate', 'error'", files={"toy.yaml": TOY}),
    Case("eval-report-is-a-folder", EV[:1] + ["-m", "{nomodel}"] + EV[3:] + ["--report", "{tmp}"], 3, "is a directory",
         files={"toy.yaml": TOY, "in.jsonl": LABELED}),
    Case("empty-prompt", G + [""], 2, "no prompt"),
    Case("empty-prompt-chat-off", G + ["--chat", "off", ""], 2, "no prompt"),
    Case("plain-prompt-overflow", ["generate", "-m", "{gpt2}", "--max-new-tokens", "2", LONG], 5, "window",
         window=64),
    Case("plain-prompt-overflow-batch", ["generate", "-m", "{gpt2}", "--max-new-tokens", "2", "-i", "{tmp}/in.jsonl",
                                         "-o", "{tmp}/out.jsonl"], 5, "in.jsonl line 2", rows=None,
         files={"in.jsonl": json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": LONG}) + "\n"}, window=64),
    Case("prompts-dir-missing", ["prompt", "list", "--prompts-dir", "{tmp}/nosuchdir"], 2, "nosuchdir"),
    Case("truncated-gguf", ["generate", "-m", "{tmp}/bad.gguf", "hi"], 4, "truncated", setup=_bad_gguf, real=True),
    Case("corrupt-cache-entry", ["generate", "-m", "{tmp}/bad.gguf", "hi"], 4, "corrupt", setup=_corrupt_cache,
         check=_corrupt_moved_aside, real=True),
    Case("stale-staging", ["generate", "-m", "{tmp}/bad.gguf", "hi"], 4, "", setup=_stale_staging, check=_staging_gone,
         real=True),
    # (a bad.gguf keeps it fast: the warning about the cache, then the plain error on the file itself)
    Case("cache-is-a-file", ["generate", "-m", "{tmp}/bad.gguf", "hi"], 4, "warning:", env={"LLMLAB_CACHE": "{tmp}/cachefile"},
         setup=_cache_is_a_file, check=_says_truncated, real=True),
    Case("generate-to-dev-full", GI[:-1] + ["/dev/full"], 3,
         "disk full while writing /dev/full: 0 records kept; free space and rerun with --resume",
         files={"in.jsonl": P2}),
    Case("temperature-tiny", ["generate", "-m", "{nomodel}", "--temperature", "1e-300", "x"], 2,
         "invalid --temperature 1e-300: must be 0 (greedy) or >= 0.01"),
    Case("seed-over-64-bits", ["generate", "-m", "{nomodel}", "--sample", "--seed", str(2**64 + 1), "x"], 2,
         f"invalid --seed {2**64 + 1}: must be an integer from 0 to {2**63 - 1}"),
    Case("temperature-in-preset", ["generate", "-m", "{nomodel}", "--config", "{tmp}/p.yaml", "x"], 2,
         "invalid --temperature 1e-40", files={"p.yaml": "temperature: 1.0e-40\n"}),
    Case("runs-db-a-directory", ["runs", "list"], 3, "the run log {tmp}/home/runs.db is a directory, not a file",
         setup=lambda tmp: (tmp / "home" / "runs.db").mkdir(parents=True)),
    Case("runs-db-a-directory-generate", ["generate", "-m", "{nomodel}", "x"], 3,
         "the run log {tmp}/home/runs.db is a directory, not a file; move it away, set LLMLAB_HOME to another folder, "
         "or turn logging off with --no-log", setup=lambda tmp: (tmp / "home" / "runs.db").mkdir(parents=True)),
    # ---- issue 27: the lock is on the file, not its name (4)
    Case("lock-through-symlink", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/link.jsonl"], 3,
         "link.jsonl is being written by another llmlab process (pid ", rows=1,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a")}, setup=_link_held("symlink")),
    Case("lock-through-hard-link", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/link.jsonl"], 3,
         "link.jsonl is the same file as one another llmlab process is writing (a link to it)", rows=1,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a")}, setup=_link_held("hard link")),
    Case("lock-through-symlink-resume", G + ["-i", "{tmp}/in.jsonl", "-o", "{tmp}/link.jsonl", "--resume"], 3,
         "is being written by another llmlab process", rows=1,
         files={"in.jsonl": P2, "out.jsonl": rec(0, prompt="a")}, setup=_link_held("symlink")),
    # ---- issue 27: templates read examples only from their own regular files (5)
    Case("examples-dev-zero", C + ["--examples", "/dev/zero", "x"], 3,
         "examples '/dev/zero' is not a regular file (a folder, device or pipe)", files={"toy.yaml": NOEX}),
    Case("examples-fifo", C[:3] + ["-t", "{tmp}/t.yaml", "x"], 3, "is not a regular file",
         files={"t.yaml": EXFILE.replace("{where}", "pipe.jsonl")}, setup=_fifo("pipe.jsonl")),
    Case("examples-too-big", C[:3] + ["-t", "{tmp}/t/t.yaml", "x"], 3,
         "big.jsonl' is 257 MiB, over the 256 MiB limit of a demonstration pool",
         files={"t/t.yaml": EXFILE.replace("{where}", "big.jsonl")}, setup=_sparse),
    Case("examples-etc-passwd", C[:1] + ["-m", "{nomodel}", "-t", "{tmp}/t.yaml", "x"], 3,
         "examples file '/etc/passwd' is outside the template's folder; move it beside the template, or give it "
         "with --examples FILE", files={"t.yaml": EXFILE.replace("{where}", "/etc/passwd")}),
    Case("examples-parent-folder", C[:1] + ["-m", "{nomodel}", "-t", "{tmp}/t/t.yaml", "x"], 3,
         "examples file '../pool.jsonl' is outside the template's folder",
         files={"t/t.yaml": EXFILE.replace("{where}", "../pool.jsonl"), "pool.jsonl": POOL}),
    Case("examples-outside-given", C[:3] + ["-t", "{tmp}/t/t.yaml", "--examples", "{tmp}/pool.jsonl", "x"], 0, "",
         files={"t/t.yaml": EXFILE.replace("{where}", "../pool.jsonl"), "pool.jsonl": POOL}),
    Case("examples-in-subfolder", C[:3] + ["-t", "{tmp}/t.yaml", "x"], 0, "",
         files={"t.yaml": EXFILE.replace("{where}", "sub/pool.jsonl"), "sub/pool.jsonl": POOL}),
    Case("prompt-list-reads-no-examples", ["prompt", "list", "--prompts-dir", "{tmp}", "-f", "text"], 0, "",
         files={"toy.yaml": EXFILE.replace("{where}", "broken.jsonl"), "broken.jsonl": "not json\n"},
         check=_listed_without_reading),
    Case("shots-without-examples-classify", C[:1] + ["-m", "{nomodel}", "-t", "{tmp}/toy.yaml", "--shots", "2", "x"],
         3, "template 'toy' has no examples, so --shots 2 has nothing to show", files={"toy.yaml": NOEX}),
    Case("shots-without-examples-eval", EV[:1] + ["-m", "{nomodel}"] + EV[3:] + ["--shots", "0,1"], 2,
         "--shots 1: template 'toy' has no examples to draw demonstrations from", files={"toy.yaml": NOEX, "in.jsonl": LABELED}),
    # ---- issue 27: no cache is unpickled (1); user text is never rich markup (2)
    Case("planted-pickle-index", CI + ["--shots", "2", "--shot-selection", "similar"], 0, "is unusable", rows=3,
         files={"toy.yaml": TOY, "in.jsonl": LABELED}, setup=_planted_pickle, check=_index_rebuilt),
    Case("pickle-inside-npz-index", CI + ["--shots", "2", "--shot-selection", "similar"], 0, "is unusable", rows=3,
         files={"toy.yaml": TOY, "in.jsonl": LABELED}, setup=_planted_in_npz, check=_index_rebuilt),
    Case("wrong-shape-index", CI + ["--shots", "2", "--shot-selection", "similar"], 0, "3 rows for a pool of 4",
         rows=3, files={"toy.yaml": TOY, "in.jsonl": LABELED}, setup=_wrong_shape_index, check=_index_rebuilt),
    Case("markup-in-file-name", G + ["-i", "{tmp}/[/x].jsonl"], 3, "input file '{tmp}/[/x].jsonl' not found"),
    Case("markup-kept-as-text", G + ["-i", "{tmp}/[red]missing.jsonl"], 3, "'{tmp}/[red]missing.jsonl' not found"),
    Case("markup-in-label", EV, 3, "label '[/x]' is not one of",
         files={"toy.yaml": TOY, "in.jsonl": '{"text": "x", "label": "[/x]"}\n'}),
    Case("markup-in-warning", G + ["-i", "{tmp}/[/w].jsonl", "-o", "{tmp}/out.jsonl"], 0,
         "warning: {tmp}/[/w].jsonl line 1: field 'prompt' is the number 7", rows=1, files={"[/w].jsonl": '{"prompt": 7}\n'}),
    Case("markup-template-name", C[:3] + ["-t", "[bold]t[/bold]", "x"], 3, "template file '[bold]t[/bold]' not found"),
    Case("probe-at-chance", CI + ["--calibration", "probe", "--probe-data", "{tmp}/train.jsonl"], 0,
         "warning: the probe scores 43.3% in cross-validation on its 12 rows, not clearly above always answering "
         "the commonest label (50.0%)", rows=3,
         files={"toy.yaml": TOY, "in.jsonl": LABELED, "train.jsonl": SAME}),
]


def _fill(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, sub in subs.items():
            value = value.replace(key, sub)
    return value


def _params():
    params = []
    for case in CASES:
        marks = [pytest.mark.slow] if case.real else []  # the real loading path on a damaged model file
        if case.needs:
            marks.append(pytest.mark.xfail(strict=True, reason=f"needs {case.needs}"))
        if case.skip:
            marks.append(pytest.mark.skip(reason=case.skip))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_fault(case: Case, tmp_path, request):
    subs = {"{tmp}": str(tmp_path), "{nomodel}": str(tmp_path / "no-such-model"),
            **{"{" + k + "}": f"fake-{k}" for k in ("llama", "gpt2", "t5")}}
    fake = None if case.real else request.getfixturevalue("fake_lm")
    if fake is not None:
        fake.window = case.window
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(_fill(content, {"{tmp}": str(tmp_path)}), encoding="utf-8")
    if case.setup:
        case.setup(tmp_path)
    try:
        result = invoke([_fill(a, subs) for a in case.args], input=case.stdin,
                        env={k: _fill(v, subs) for k, v in case.env.items()})
    finally:
        while _held:
            _held.pop().release()
    assert "Traceback" not in result.stderr
    assert result.exit_code == case.code, result.stderr
    if fake is not None and "{nomodel}" in case.args:
        assert fake.loads == [] and fake.requests == [], "a {nomodel} case must fail before any model time"
    assert _fill(case.stderr, subs) in result.stderr
    if case.code:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.stderr.rstrip("\n").endswith(errors[0]), result.stderr
    out = tmp_path / "out.jsonl"
    if case.rows is None:
        assert not out.exists() or out.read_text() == case.files.get("out.jsonl", "")
    else:
        text = out.read_text(encoding="utf-8")
        assert text.endswith("\n")
        rows = [json.loads(line) for line in text.split("\n")[:-1]]  # every line a whole JSON record
        assert len(rows) == case.rows
        assert len({(r.get("id"), r["index"]) for r in rows}) == case.rows  # each input once
    assert not list(tmp_path.glob(".*.lock"))  # the lock file goes with its writer
    if case.check:
        case.check(tmp_path, result)


def test_probe_cache_is_never_unpickled_nor_trusted(fake_lm, tmp_path):
    """A probe cache file replaced by a pickle inside an .npz, then by one of the wrong shape: each is
    refitted with a warning; nothing is unpickled. A probe that learns something gets no chance warning."""
    import numpy as np

    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED)
    (tmp_path / "train.jsonl").write_text(VARIED)
    args = CI + ["--calibration", "probe", "--probe-data", "{tmp}/train.jsonl"]
    args = [a.replace("{tmp}", str(tmp_path)).replace("{llama}", "fake-llama") for a in args]
    first = invoke(args)
    # The only line: the fit announced (once; then cached).
    assert first.exit_code == 0 and _fits(first.stderr) == 1 and _besides_fits(first.stderr) == "", first.stderr
    expected = (tmp_path / "out.jsonl").read_text()  # the refitted probes answer the same
    [cached] = (Path(os.environ["LLMLAB_CACHE"]) / "probes").glob("*.npz")
    with open(cached, "wb") as f:
        np.savez(f, meta=np.array([_Planted(str(tmp_path / "pwned"))], dtype=object))
    again = invoke(args)
    assert again.exit_code == 0 and not (tmp_path / "pwned").exists() and _fits(again.stderr) == 1
    warned = _besides_fits(again.stderr)
    assert warned.startswith(f"warning: the cached probe '{cached}' is unusable (ValueError: ")
    assert warned.endswith("); refitting it\n") and warned.count("\n") == 1
    with np.load(cached) as data:
        arrays = dict(data)
    arrays["coef"] = np.zeros((3, 5))  # three labels' rows of another width
    with open(cached, "wb") as f:
        np.savez(f, **arrays)
    third = invoke(args)
    assert third.exit_code == 0 and "do not fit a probe for ['pos', 'neg']" in third.stderr
    assert (tmp_path / "out.jsonl").read_text() == expected


# ---------------------------------------------------------------- issue 27: a full disk (3)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs at {tmp}/disk, mounted with mount(2) (root only; skipped where that fails).
    disk.resize("1m") grows it: space freed."""
    import ctypes

    disk = tmp_path / "disk"
    disk.mkdir()
    if _libc().mount(b"tmpfs", str(disk).encode(), b"tmpfs", 0, b"size=64k") != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({os.strerror(ctypes.get_errno())}): needs root")

    class Disk(type(disk)):
        def resize(self, size: str) -> None:
            assert _libc().mount(b"tmpfs", str(self).encode(), b"tmpfs", 32, f"size={size}".encode()) == 0  # MS_REMOUNT

        def fill(self, leave: int = 0) -> None:
            """Fill it with a file, leaving about `leave` bytes."""
            stats = os.statvfs(self)
            (self / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))

    yield Disk(disk)
    _libc().umount2(str(disk).encode(), 2)  # MNT_DETACH


BIG = "".join(json.dumps({"id": f"r{i}", "text": f"item {i} " + "x" * 600, "label": "pos"}) + "\n" for i in range(150))


def _whole_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")  # no torn last record
    return text.splitlines()


def test_disk_full_generate_keeps_whole_records_then_resumes(fake_lm, small_disk, tmp_path):
    (tmp_path / "in.jsonl").write_text(BIG.replace('"text"', '"prompt"'))
    out = small_disk / "out.jsonl"
    args = ["generate", "-m", "fake", "--max-new-tokens", "2", "-i", tmp_path / "in.jsonl", "-o", out]
    result = invoke(args)
    lines = _whole_lines(out)
    assert 10 < len(lines) < 150 and all(json.loads(line)["index"] == i for i, line in enumerate(lines))
    assert result.exit_code == 3
    assert result.stderr == (f"error: disk full while writing {out}: {len(lines)} records kept; free space and "
                             "rerun with --resume\n")
    small_disk.resize("1m")
    again = invoke(args + ["--resume"])
    assert again.exit_code == 0, again.stderr
    assert [json.loads(line)["id"] for line in _whole_lines(out)] == [f"r{i}" for i in range(150)]


def test_disk_full_classify_csv_has_no_torn_row(fake_lm, small_disk, tmp_path):
    import csv

    (tmp_path / "in.jsonl").write_text(BIG)
    (tmp_path / "toy.yaml").write_text(TOY)
    out = small_disk / "out.csv"
    result = invoke(["classify", "-m", "fake", "-t", tmp_path / "toy.yaml", "-i", tmp_path / "in.jsonl", "-o", out])
    rows = list(csv.DictReader(_whole_lines(out)))
    assert result.exit_code == 3 and f"{out}: {len(rows)} records kept" in result.stderr
    assert len(rows) > 10 and all(r["model"] == "fake" and r["id"] == f"r{i}" for i, r in enumerate(rows))


@pytest.mark.parametrize("leave", [5000, 0])  # room for the lock file only; none at all
def test_disk_full_from_the_start_names_the_file(fake_lm, small_disk, tmp_path, leave):
    (tmp_path / "in.jsonl").write_text(P2)
    small_disk.fill(leave)
    out = small_disk / "out.jsonl"
    result = invoke(["generate", "-m", "fake", "--max-new-tokens", "2", "-i", tmp_path / "in.jsonl", "-o", out])
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    expected = (f"error: disk full while writing {out}: 0 records kept; free space and rerun with --resume\n"
                if leave else f"error: cannot write the lock file '{small_disk}/.out.jsonl.lock' beside the output: "
                "No space left on device; free space or choose another --output\n")
    assert result.stderr == expected
    assert not list(small_disk.glob(".*.lock"))


def _logged_run(home: Path) -> int:
    import runfixtures

    return runfixtures.eval_run(runfixtures.Template("sentiment", "Classify."), 0.6, shots=(0,), seeds=1,
                                calibration=(False,))


@pytest.mark.parametrize("command", [["report", "1"], ["runs", "export", "1"]])
def test_disk_full_keeps_the_previous_report_and_export(home, small_disk, command):
    _logged_run(home)
    out = small_disk / ("report.html" if command[0] == "report" else "items.jsonl")
    out.write_text("the previous good file\n")
    small_disk.fill(2000)
    result = invoke(command + ["-o", out])
    assert result.exit_code == 3 and result.stderr == (
        f"error: disk full while writing {out}: nothing was changed there; free space and rerun\n")
    assert out.read_text() == "the previous good file\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", out.name]  # no temporary file left
    (small_disk / "filler").unlink()
    assert invoke(command + ["-o", out]).exit_code == 0 and out.stat().st_size > 1000


def test_disk_full_eval_report(fake_lm, small_disk, tmp_path):
    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED)
    report = small_disk / "report.json"
    report.write_text("{}\n")
    small_disk.fill(1000)
    result = invoke(EV[:1] + ["-m", "fake", "-t", tmp_path / "toy.yaml", "--data", tmp_path / "in.jsonl",
                              "--report", report])
    assert result.exit_code == 3, result.stderr
    assert result.stderr.endswith(f"error: disk full while writing {report}: nothing was changed there; "
                                  "free space and rerun\n")
    assert report.read_text() == "{}\n"


@pytest.mark.parametrize("command", [["report", "1"], ["runs", "export", "1"], ["runs", "export", "1", "-f", "csv"]])
def test_dev_full_is_written_in_place_never_replaced(home, command):
    _logged_run(home)
    result = invoke(command + ["-o", "/dev/full"])
    assert result.exit_code == 3
    assert result.stderr == "error: disk full while writing /dev/full: nothing was changed there; free space and rerun\n"
    assert Path("/dev/full").is_char_device()


@pytest.mark.parametrize("where, error", [
    ("{tmp}", "--output '{tmp}' is a directory; give a file name inside it"),
    ("{tmp}/no/x.jsonl", "--output '{tmp}/no/x.jsonl': folder '{tmp}/no' does not exist; create it first"),
])
def test_runs_export_checks_its_output_first(home, tmp_path, where, error):
    _logged_run(home)
    result = invoke(["runs", "export", "1", "-o", where.format(tmp=tmp_path)])
    assert result.exit_code == 3 and result.stderr.startswith(f"error: {error.format(tmp=tmp_path)}")
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------- issue 27: --resume with other settings


@pytest.mark.parametrize("first, other, differs", [
    (GI + ["--limit", "1"], ["--max-new-tokens", "3"], "settings.max_new_tokens 2 there, 3 now"),
    (GI + ["--limit", "1"], ["--sample"], "settings.do_sample false there, true now"),
    (GI + ["--limit", "1"], ["-m", "fake-gpt2"], 'model.spec "fake-llama" there, "fake-gpt2" now'),
    (CI + ["--limit", "1"], ["--calibration", "contextual"], 'calibrate null there, "contextual" now'),
    (CI + ["--limit", "1"], ["--shots", "1"], "prompt.shots null there, 1 now"),
])
def test_resume_refuses_other_settings(fake_lm, tmp_path, first, other, differs):
    (tmp_path / "in.jsonl").write_text(LABELED if first[0] == "classify" else P2)
    (tmp_path / "toy.yaml").write_text(TOY)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{llama}", "fake-llama") for a in first]
    assert invoke(args).exit_code == 0
    done = (tmp_path / "out.jsonl").read_text()
    rest = [a for a in args if a not in ("--limit", "1")] + ["--resume"]
    result = invoke(rest + other)
    assert result.exit_code == 2
    assert result.stderr == (f"error: --resume: {tmp_path}/out.jsonl was written with other settings ({differs}); "
                             "give the same options to resume it, or write to a different --output\n")
    assert (tmp_path / "out.jsonl").read_text() == done
    again = invoke(rest)  # the same options: resumed
    assert again.exit_code == 0, again.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == (3 if first[0] == "classify" else 2)


def test_resume_of_an_output_without_settings_beside_it(fake_lm, tmp_path):
    """A file written by hand (or by an older llmlab) is resumed as it is."""
    (tmp_path / "in.jsonl").write_text(P2)
    (tmp_path / "out.jsonl").write_text(rec(0, prompt="a"))
    args = [a.replace("{tmp}", str(tmp_path)).replace("{llama}", "fake-llama") for a in GI + ["--resume"]]
    result = invoke(args)
    assert result.exit_code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------- issue 27: the run log


def test_runs_rm_refuses_a_running_run_and_the_run_survives_a_forced_one(home):
    from llmlab.runs import runlog

    said: list[str] = []
    with runlog.open_run("generate", ["llmlab", "generate"], on_warn=said.append) as run:
        run.item(0, "p", "o")
        with runlog.connect() as db:  # the run belongs to a live process other than this one
            db.execute("UPDATE runs SET pid = ? WHERE id = ?", (os.getppid(), run.id))
        refused = invoke(["runs", "rm", str(run.id)])
        assert refused.exit_code == 2 and refused.stderr == (
            f"error: run {run.id} is still running (pid {os.getppid()}); wait for it to end, or stop it first "
            "(or give --force)\n")
        forced = invoke(["runs", "rm", str(run.id), "--force"])
        assert forced.exit_code == 0, forced.stderr
        run.item(1, "p", "o")  # the run goes on: one warning, no FOREIGN KEY text
    assert said == [f"run {run.id} was deleted from the run log while it ran (llmlab runs rm); the rest of it is "
                    "not logged"]


def test_a_finished_or_dead_run_is_removed_without_force(home):
    from llmlab.runs import runlog

    with runlog.open_run("generate", ["llmlab", "generate"]) as run:
        pass
    assert invoke(["runs", "rm", str(run.id)]).exit_code == 0


def test_the_run_log_on_read_only_media_can_be_read(small_disk, monkeypatch):
    from llmlab.runs import runlog

    monkeypatch.setenv("LLMLAB_HOME", str(small_disk))
    small_disk.resize("4m")  # room for the log, then read-only
    with runlog.open_run("generate", ["llmlab", "generate", "hello"]) as run:
        run.item(0, "hello", "world")
    assert _libc().mount(b"tmpfs", str(small_disk).encode(), b"tmpfs", 32 | 1, b"") == 0  # MS_REMOUNT | MS_RDONLY
    listed = invoke(["runs", "list", "--json"])
    assert listed.exit_code == 0, listed.stderr
    assert [(r["id"], r["command"], r["items"]) for r in jsonl(listed.stdout)] == [(run.id, "generate", 1)]
    shown = invoke(["runs", "export", str(run.id)])
    assert shown.exit_code == 0 and jsonl(shown.stdout)[0]["output"] == "world"
    removed = invoke(["runs", "rm", str(run.id)])
    assert removed.exit_code == 3 and removed.stderr.startswith(f"error: cannot open the run log {small_disk}/runs.db: ")
    assert removed.stderr.count("\n") == 1


# ---------------------------------------------------------------- issue 27: a killed conversion's leftovers


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_models_shows_a_killed_conversions_leftover_and_cleans_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    gguf = Path(os.environ["LLMLAB_CACHE"]) / "gguf"
    killed = gguf / f"model-0123456789ab.staging-{_dead_pid()}-x1y2"  # SIGKILLed a minute ago
    running = gguf / f"model-0123456789ab.staging-{os.getpid()}-z3"  # a conversion still going on
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 5000)
    listed = invoke(["models", "-f", "jsonl"])
    rows = {r["name"]: r for r in jsonl(listed.stdout)}
    assert rows[killed.name] == {"name": killed.name, "kind": "leftover", "size": 5000, "offline": False,
                                 "where": str(killed),
                                 "note": "left by a stopped conversion; llmlab models --clean removes it"}
    assert rows[running.name]["note"] == "a conversion in progress"
    cleaned = invoke(["models", "--clean", "-f", "jsonl"])
    assert cleaned.exit_code == 0 and cleaned.stderr == f"removed {killed}\n"
    assert not killed.exists() and running.exists()
    assert killed.name not in {r["name"] for r in jsonl(cleaned.stdout)}


# ---------------------------------------------------------------- issue 27: --processes capped


GiB = 1 << 30


@pytest.mark.parametrize("asked, items, cores, gpus, memory, expected", [
    (64, 10, 2, 0, 64 * GiB, (2, "--processes 64: starting 2 (2 CPU cores)")),
    (8, 3, 16, 0, 64 * GiB, (3, "--processes 8: starting 3 (3 items)")),
    (4, 100, 16, 0, 5 * GiB, (2, "--processes 4: starting 2 (memory for 2 model copies of ~1.0 GiB)")),
    (4, 100, 16, 2, 64 * GiB, (2, "--processes 4: starting 2 (2 GPUs)")),
    (2, 100, 16, 0, 64 * GiB, (2, "")),
    ("auto", 10, 2, 0, 64 * GiB, (2, "")),
    ("auto", 1, 16, 0, 64 * GiB, (1, "")),
    ("auto", 100, 16, 0, 1 * GiB, (1, "")),  # not even one copy fits besides: one process, never none
])
def test_processes_plan(asked, items, cores, gpus, memory, expected):
    from llmlab.orchestration import parallel

    assert parallel.plan(asked, items, GiB, cores=cores, gpus=gpus, memory=memory) == expected


@pytest.mark.parametrize("asked, started, said", [
    ("64", 3, "warning: --processes 64: starting 3 (3 items)\n"),
    ("auto", 3, ""),
    ("2", 2, ""),
])
def test_eval_processes_capped_before_any_launch(fake_lm, tmp_path, monkeypatch, asked, started, said):
    from llmlab.orchestration import parallel

    launched = []
    monkeypatch.setattr(parallel, "launch", lambda args, n, *rest: launched.append(n) or 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(parallel, "available_memory", lambda: 64 * GiB)
    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED)
    result = invoke(["eval", "-m", "fake-llama", "--device", "cpu", "-t", tmp_path / "toy.yaml", "--data",
                     tmp_path / "in.jsonl", "--processes", asked])
    assert result.exit_code == 0 and result.stderr == said
    assert launched == [started] and fake_lm.loads == []


def test_processes_auto_with_one_item_runs_here(fake_lm, tmp_path, monkeypatch):
    from llmlab.orchestration import parallel

    monkeypatch.setattr(parallel, "launch", lambda *a: pytest.fail("one item: no processes to start"))
    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED.splitlines(keepends=True)[0])
    result = invoke(["eval", "-m", "fake-llama", "--device", "cpu", "-t", tmp_path / "toy.yaml", "--data",
                     tmp_path / "in.jsonl", "--processes", "auto"])
    assert result.exit_code == 0, result.stderr
    assert len(fake_lm.loads) == 1  # loaded here, once


def test_processes_not_a_number(no_model, tmp_path):
    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED)
    result = invoke(["eval", "-t", tmp_path / "toy.yaml", "--data", tmp_path / "in.jsonl", "--processes", "many"])
    assert (result.exit_code, result.stderr) == (2, "error: invalid --processes 'many': give a count >= 1, or auto\n")


@pytest.mark.slow
def test_a_workers_error_with_markup_in_it_is_one_plain_line(tiny_models, tmp_path):
    """--processes 2: each worker prints its own error; a model folder named like rich markup is text there."""
    import shutil
    import subprocess
    import sys

    broken = tmp_path / "[/x]model"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "config.json").write_text('{"model_type": "llama",')  # cut short: fails in each worker
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    (tmp_path / "toy.yaml").write_text(TOY)
    (tmp_path / "in.jsonl").write_text(LABELED)
    result = subprocess.run([sys.executable, "-m", "llmlab", "eval", "-t", str(tmp_path / "toy.yaml"), "--data",
                             str(tmp_path / "in.jsonl"), "--model", str(broken), "--processes", "2", "-q"],
                            capture_output=True, text=True, env=env, timeout=600)
    lines = result.stderr.splitlines()
    assert result.returncode == 4 and len(lines) == 1, result.stderr  # ModelError, from the workers
    assert lines[0].startswith("error: ") and "[/x]model" in lines[0] and "Traceback" not in result.stderr


def test_a_multi_line_exception_is_one_error_line(fake_lm, monkeypatch):
    """The last line of defence (an unexpected exception): its text joined onto one line."""
    from llmlab.scoring import generation

    def boom(*args, **kwargs):
        raise RuntimeError("first line\n    second line\n")

    monkeypatch.setattr(generation, "run_single", boom)
    result = invoke(["generate", "-m", "fake-llama", "hi"])
    assert result.exit_code == 1
    assert result.stderr == "error: RuntimeError: first line second line (set LLMLAB_DEBUG=1 for the traceback)\n"
