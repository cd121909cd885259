"""Corpus split and token windows: deterministic, disjoint, exact sizes, clear errors."""
from __future__ import annotations

import pytest
import torch
from pydoc_data.topics import topics

from lowbit.errors import LowbitError
from lowbit.eval import eval_text, load_text, pydoc_text, split_pydoc, token_windows

BOS = 10_000


class WordTokenizer:
    """Every whitespace-separated word is an integer and becomes that token id.

    Prepends ``BOS`` when asked for special tokens, so tests can see none were added.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        self.calls.append({"add_special_tokens": add_special_tokens})
        ids = [int(w) for w in text.split()]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


def numbers(n: int) -> str:
    return " ".join(str(i) for i in range(n))


def distinct_sorted_documents() -> list[str]:
    """Reference: topic texts by sorted key, a text seen before is skipped (slow and obvious)."""
    docs: list[str] = []
    for key in sorted(topics):
        if topics[key] not in docs:
            docs.append(topics[key])
    return docs


def test_pydoc_text_is_every_document_in_sorted_key_order():
    assert pydoc_text() == "\n\n".join(distinct_sorted_documents())
    for text in topics.values():
        assert text in pydoc_text()


def test_split_is_deterministic():
    assert split_pydoc() == split_pydoc()


def test_split_alternates_sorted_documents():
    cal, ev = split_pydoc()
    docs = distinct_sorted_documents()
    assert cal == "\n\n".join(docs[0::2])
    assert ev == "\n\n".join(docs[1::2])


def test_split_is_disjoint_and_covers_every_document():
    cal, ev = split_pydoc()
    for key, text in topics.items():
        assert (text in cal) != (text in ev), key  # each topic text in exactly one half


def test_eval_text_defaults_to_the_evaluation_half(tmp_path):
    assert eval_text(None) == split_pydoc()[1]
    f = tmp_path / "c.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert eval_text(f) == "héllo wörld\n"
    assert eval_text(str(f)) == "héllo wörld\n"


def test_windows_are_consecutive_non_overlapping_and_exact():
    tok = WordTokenizer()
    w = token_windows(tok, numbers(103), seq_len=10)
    assert w.dtype == torch.long and w.shape == (10, 10)
    assert torch.equal(w.flatten(), torch.arange(100))  # from the start, no overlap, tail dropped
    assert tok.calls == [{"add_special_tokens": False}]  # tokenized once, no BOS


def test_n_windows_keeps_the_first_ones():
    w = token_windows(WordTokenizer(), numbers(100), seq_len=10, n_windows=3)
    assert torch.equal(w, torch.arange(30).view(3, 10))
    w = token_windows(WordTokenizer(), numbers(100), seq_len=10, n_windows=50)
    assert w.shape == (10, 10)


def test_exactly_one_window():
    w = token_windows(WordTokenizer(), numbers(7), seq_len=7)
    assert torch.equal(w, torch.arange(7).view(1, 7))


def test_too_short_text_says_token_count_and_fix():
    with pytest.raises(LowbitError, match=r"has 6 tokens.*seq_len 7.*lower --seq-len to at most 6"):
        token_windows(WordTokenizer(), numbers(6), seq_len=7)


@pytest.mark.parametrize("kwargs", [{"seq_len": 1}, {"seq_len": 4, "n_windows": 0}])
def test_bad_window_arguments(kwargs):
    with pytest.raises(LowbitError):
        token_windows(WordTokenizer(), numbers(20), **kwargs)


def test_missing_file_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LowbitError, match=r"nope\.txt.*does not exist.*--corpus"):
        load_text(missing)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(LowbitError, match="not a regular file"):
        load_text(tmp_path)


def test_non_utf8_file_is_rejected(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match=r"latin1\.txt.*not UTF-8.*offset 3"):
        load_text(f)


def test_empty_file_is_rejected(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n", encoding="utf-8")
    with pytest.raises(LowbitError, match="empty"):
        load_text(f)
