"""Data loading and packing: deterministic, disjoint, exact lengths, clear errors."""

from __future__ import annotations

import json

import pytest

from attn_audit.data import (
    BUNDLED,
    DataSpec,
    build_sequences,
    bundled_texts,
    fortunes_dir,
)
from attn_audit.errors import DatasetError


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer

    from attn_audit.load import resolve_alias

    path, _ = resolve_alias("all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(path)


def test_bundled_corpus_is_real_text_without_offensive_sets():
    texts = bundled_texts()
    assert len(texts) > 10000
    assert (fortunes_dir() / "fortunes-o").exists()  # present on disk, never read
    joined = "\n".join(texts[:200])
    assert sum(c.isalpha() for c in joined) > 0.6 * len(joined.replace(" ", "").replace("\n", ""))


def test_packing_is_exact_deterministic_and_seeded(bert_tok):
    a = build_sequences(DataSpec(BUNDLED), bert_tok, [64], 5, seed=1)
    b = build_sequences(DataSpec(BUNDLED), bert_tok, [64], 5, seed=1)
    c = build_sequences(DataSpec(BUNDLED), bert_tok, [64], 5, seed=2)
    assert [len(s) for s in a[0].sequences] == [64] * 5
    assert a[0].sequences == b[0].sequences
    assert a[0].token_hash() == b[0].token_hash() != c[0].token_hash()


def test_encoder_windows_are_wrapped_in_cls_sep(bert_tok):
    (td,) = build_sequences(DataSpec(BUNDLED), bert_tok, [32], 3, seed=0, encoder=True)
    for seq in td.sequences:
        assert len(seq) == 32 and seq[0] == bert_tok.cls_token_id and seq[-1] == bert_tok.sep_token_id


def test_several_lengths_use_disjoint_tokens(bert_tok):
    short, long = build_sequences(DataSpec(BUNDLED), bert_tok, [32, 64], 4, seed=0, held_out=2)
    stream = [t for s in short.sequences for t in s] + [t for s in long.sequences for t in s]
    held = [t for s in long.held_out for t in s]
    assert len(long.held_out) == 2 and all(len(s) == 64 for s in long.held_out)
    # consecutive windows of one stream: the long ones start where the short ones ended
    assert stream[: 4 * 32] != stream[4 * 32 : 8 * 32]
    assert held[:10] != long.sequences[0][:10]


def test_pretokenized_rows_are_used_as_is(tmp_path, bert_tok):
    f = tmp_path / "ids.jsonl"
    rows = [[101, 2000 + i, 2001, 2002, 102] + list(range(3000, 3000 + i)) for i in range(4)]
    f.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    (td,) = build_sequences(DataSpec(str(f)), bert_tok, [6], 4, seed=0, vocab_size=30522)
    assert td.kind == "input_ids"
    assert td.sequences == [r[:6] for r in rows]


def test_pretokenized_ids_outside_vocab_are_refused(tmp_path, bert_tok):
    f = tmp_path / "ids.jsonl"
    f.write_text(json.dumps({"input_ids": [1, 2, 99999]}) + "\n")
    with pytest.raises(DatasetError, match="outside the vocabulary"):
        build_sequences(DataSpec(str(f)), bert_tok, [3], 1, seed=0, vocab_size=30522)


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        (None, ".txt", "does not exist"),
        ("", ".txt", "is empty"),
        ('{"body": "hello there"}\n', ".jsonl", "no column 'text'"),
        ("a b c\n", ".txt", "fewer than one sequence"),
    ],
)
def test_bad_datasets_raise_clear_errors(tmp_path, bert_tok, content, suffix, match):
    f = tmp_path / f"data{suffix}"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DatasetError, match=match):
        build_sequences(DataSpec(str(f)), bert_tok, [64], 2, seed=0)


def test_csv_and_parquet_text_columns(tmp_path, bert_tok):
    import pandas as pd

    texts = ["the quick brown fox jumps over the lazy dog " * 5] * 4
    pd.DataFrame({"body": texts}).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame({"body": texts}).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        (td,) = build_sequences(DataSpec(str(tmp_path / name), text_column="body"), bert_tok, [16], 3, seed=0)
        assert len(td.sequences) == 3 and all(len(s) == 16 for s in td.sequences)
