"""Dataset files as a careless or hostile user gives them: typed records, encoding errors named
with file and line, no FIFO or directory read, bounded pieces for the tokenizer, a notice when
the data holds fewer sequences than asked, a real tokenizer, a per-user cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attn_audit import data
from attn_audit.data import DataSpec, build_sequences, load_records, read_text_documents
from attn_audit.errors import DatasetError, ModelLoadError


class Tok:
    eos_token_id = 1

    def __call__(self, batch, add_special_tokens=False):
        return {"input_ids": [[5 + (ord(c) % 100) for c in t] for t in batch]}


def test_bad_utf8_is_named_with_file_and_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"fine line\nsecond\n\xff third\n")
    with pytest.raises(DatasetError, match=r"d.txt, line 3: not UTF-8"):
        load_records(DataSpec(str(p)))
    j = tmp_path / "d.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl, line 2: not UTF-8"):
        load_records(DataSpec(str(j)))


@pytest.mark.parametrize("line,needle", [
    ('{"input_ids": [true, false, 7]}', "list of integer token ids"),
    ('{"input_ids": [1.5, 2.0]}', "list of integer token ids"),
    ('{"text": 12}\n{"text": 13}', "holds int, not text"),
])
def test_records_are_typed_per_column(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(DatasetError, match=needle):
        load_records(DataSpec(str(p)))


def test_a_long_single_line_is_read_and_tokenized_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DOC_CHARS", 1000)
    monkeypatch.setattr(data, "_READ_CHUNK", 4096)
    words = [f"w{i}" for i in range(20_000)]
    p = tmp_path / "one.txt"
    p.write_text(" ".join(words))  # ~130 KB, no newline at all
    docs = read_text_documents(p)
    assert len(docs) > 100 and max(map(len, docs)) <= 1000
    assert " ".join(docs).split() == words  # nothing lost or split inside a word
    seen = []

    class Spy(Tok):
        def __call__(self, batch, add_special_tokens=False):
            seen.append(sum(map(len, batch)))
            return super().__call__(batch, add_special_tokens)

    monkeypatch.setattr(data, "BATCH_CHARS", 5000)
    build_sequences(DataSpec(str(p)), Spy(), (64,), 4, seed=0)
    assert seen and max(seen) <= 5000 + 1000


def test_paragraphs_stay_documents(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first para\nline two\n\n\nsecond para\n\nthird")
    assert read_text_documents(p) == ["first para\nline two", "second para", "third"]


def test_fewer_sequences_than_asked_give_a_notice(capsys):
    out = build_sequences(DataSpec("<mem>"), Tok(), (32,), 50, seed=0, records=("text", ["abcdefgh" * 20]))
    assert len(out[0].sequences) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives 5 sequence(s) of 32 tokens, fewer than --num-sequences 50" in err[0]


def test_fallback_tokenizer_is_refused():
    from attn_audit.load import check_tokenizer

    class Fallback:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [[2] * len(t) for t in text]}

    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        check_tokenizer(Fallback(), "dir")
    check_tokenizer(Tok(), "dir")


def test_dataset_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTN_AUDIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.dataset_cache() == tmp_path / "attn-audit" / "datasets"


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "unknown"])
def test_bad_dataset_paths_fail_before_the_model_loads(tmp_path, kind):
    path = tmp_path / "d.txt"
    needle = {"missing": "does not exist", "directory": "is a directory", "fifo": "not a regular file",
              "unknown": "unknown suffix"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "unknown":
        path = tmp_path / "d.xyz"
        path.write_text("x")
    code = ("import sys; from attn_audit.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "smollm2-135m-instruct", "--dataset", str(path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "False" and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_model_directory_without_tokenizer_is_refused(tmp_path):
    from attn_audit.load import load_model
    from tests.conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)  # weights and config, no tokenizer files
    with pytest.raises(ModelLoadError, match="tokenizer|cannot read"):
        load_model(str(tmp_path))


def test_model_directory_with_a_bad_config_names_the_directory(tmp_path):
    from attn_audit.load import load_model

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the model in directory"):
        load_model(str(tmp_path))


def test_a_cut_off_utf8_character_at_the_end_is_named(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"words here\n\xc2")
    with pytest.raises(DatasetError, match=r"line 2: not UTF-8 text \(cut-off character"):
        load_records(DataSpec(str(p)))
