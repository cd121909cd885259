"""Calibration data: spec parsing, seeded windows, file sources, mixing, LLM-QAT self-generation."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lowbit.calib import (
    CalibSource,
    allocate,
    calib_source,
    calibration_windows,
    describe_calib,
    parse_calib,
    sample_windows,
    self_generate,
)
from lowbit.calib.cache import model_fingerprint
from lowbit.calib.selfgen import first_token_candidates, sample
from lowbit.calib.text import SHARED_RUN, drop_shared_paragraphs, pydoc_calibration_text
from lowbit.calib.windows import source_text, sub_seed
from lowbit.errors import LowbitError
from lowbit.eval.corpus import split_pydoc


class WordTokenizer:
    """Every whitespace-separated word is an integer and becomes that token id; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [int(w) for w in text.split()]}


def numbers(lo: int, hi: int) -> str:
    return " ".join(str(i) for i in range(lo, hi))


def is_contiguous_run(row: torch.Tensor) -> bool:
    return torch.equal(row, torch.arange(int(row[0]), int(row[0]) + len(row)))


@pytest.fixture
def files(tmp_path):
    """a.txt holds tokens 0..999, b.txt 1000..1999 (for WordTokenizer)."""
    (tmp_path / "a.txt").write_text(numbers(0, 1000), encoding="utf-8")
    (tmp_path / "b.txt").write_text(numbers(1000, 2000), encoding="utf-8")
    return tmp_path


# ----------------------------------------------------------------------------- spec syntax
def test_parse_names_paths_keys_and_weights(files):
    (files / "d.jsonl").write_text('{"body": "1 2"}\n', encoding="utf-8")
    a, d, p, s = parse_calib(f" {files / 'a.txt'}:64 , {files / 'd.jsonl'}#body:32,pydoc:16, self:16")
    assert (a.kind, a.path, a.weight) == ("text", files / "a.txt", 64)
    assert (d.kind, d.key, d.weight) == ("jsonl", "body", 32)
    assert (p.kind, p.path, p.weight) == ("pydoc", None, 16)
    assert (s.kind, s.weight) == ("self", 16)
    assert parse_calib("pydoc:0.25,self") == (CalibSource("pydoc", weight=0.25), CalibSource("self"))
    assert parse_calib(f"{files}") == (CalibSource("folder", files),)


def test_existing_path_with_colon_and_hash_is_taken_whole(tmp_path):
    f = tmp_path / "notes#1:2.txt"
    f.write_text("x", encoding="utf-8")
    assert parse_calib(str(f)) == (CalibSource("text", f),)


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("pydoc,,self", "empty entry at position 2"),
    ("pydoc,", "empty entry at position 2"),
    ("pydocs", "'pydocs' is unknown; use pydoc, self"),
    ("missing/calib.txt", r"calibration file '.*missing/calib\.txt' does not exist"),
    ("pydoc:abc", "weight 'abc'.*not a count"),
    ("pydoc:-3", "weight '-3'"),
    ("pydoc:0", "count 0 of pydoc must be at least 1"),
    ("pydoc:1.5", r"fraction 1\.5 of pydoc is outside \(0, 1\]"),
    ("pydoc:0.5,self:0.4", "fractions sum to 0.9, not 1"),
    ("pydoc:0.7,self:0.6", "fractions sum to 1.3, more than 1"),
    ("pydoc:1.0,self", "already sum to 1, leaving nothing for self"),
    ("pydoc:64,self:0.5", r"mix counts \(64\) and fractions \(0\.5\)"),
    ("pydoc:1,pydoc:2", "pydoc is listed twice"),
    ("x.jsonl#:4", "empty name around '#'"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(LowbitError, match=message):
        parse_calib(spec)


def test_self_without_a_model_is_refused():
    with pytest.raises(LowbitError, match="'self'.*no model was given"):
        parse_calib("pydoc,self", allow_self=False)
    with pytest.raises(LowbitError, match="no model was given"):
        calibration_windows(WordTokenizer(), "pydoc:0.5,self:0.5", 4, 8)


# ----------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("spec, n, counts", [
    ("pydoc", 7, [7]),
    ("pydoc,self", 5, [3, 2]),
    ("pydoc:3,self:5", 8, [3, 5]),
    ("pydoc:3,self", 8, [3, 5]),
    ("pydoc:0.5,self:0.5", 3, [2, 1]),          # tie goes to the earlier entry
    ("pydoc:0.25,self", 10, [3, 7]),            # 2.5 -> 3 (2.5 and 7.5: tie, earlier first)
    ("pydoc:0.1,self:0.9", 1, [0, 1]),
])
def test_allocation(spec, n, counts):
    assert allocate(parse_calib(spec), n) == counts


def test_largest_remainder_adds_up_and_stays_within_one_of_the_quota():
    for weights in ([0.1, 0.2, 0.7], [0.3333, 0.3333, 0.3334], [0.05, 0.95], [0.5, 0.25, 0.125, 0.125]):
        sources = [CalibSource("text", Path(f"f{i}.txt"), weight=w) for i, w in enumerate(weights)]
        for n in range(1, 60):
            counts = allocate(sources, n)
            assert sum(counts) == n
            assert all(abs(c - w * n) < 1 for c, w in zip(counts, weights)), (weights, n, counts)


@pytest.mark.parametrize("spec, n, message", [
    ("pydoc:3,self:5", 10, "counts sum to 8 but n_samples is 10"),
    ("pydoc:10,self", 10, "leaving 0 of n_samples 10 for self"),
    ("pydoc", 0, "n_samples 0 must be a positive integer"),
])
def test_counts_that_do_not_fit_n_samples(spec, n, message):
    with pytest.raises(LowbitError, match=message):
        allocate(parse_calib(spec), n)


def test_describe(files):
    summary = describe_calib(f"{files / 'a.txt'}:64,pydoc:64", 128, 512)
    assert summary.counts == {str(files / "a.txt"): 64, "pydoc": 64}
    assert summary.tokens == 128 * 512
    assert str(summary) == f"{files / 'a.txt'} 64 + pydoc 64 = 128 x 512 = 65,536 tokens"


# ----------------------------------------------------------------------------- window sampling
def test_windows_do_not_overlap_when_the_text_is_long_enough():
    ids = torch.arange(1000)
    for seed in range(20):
        w = sample_windows(ids, 9, 100, torch.Generator().manual_seed(seed))
        assert w.shape == (9, 100) and w.dtype == torch.long
        assert all(is_contiguous_run(row) for row in w)
        assert w.unique().numel() == 900  # no token in two windows


def test_exact_fit_uses_every_token_once():
    w = sample_windows(torch.arange(100), 10, 10, torch.Generator().manual_seed(0))
    assert torch.equal(w.flatten().sort().values, torch.arange(100))


def test_short_text_overlaps_with_distinct_starts_then_repeats():
    w = sample_windows(torch.arange(30), 15, 10, torch.Generator().manual_seed(0))
    assert all(is_contiguous_run(row) for row in w) and w[:, 0].unique().numel() == 15
    w = sample_windows(torch.arange(12), 8, 10, torch.Generator().manual_seed(0))
    assert all(is_contiguous_run(row) for row in w) and int(w[:, 0].max()) <= 2


def test_too_few_tokens_says_how_many_and_what_fits():
    with pytest.raises(LowbitError, match=r"x\.txt has 10 tokens, fewer than seq_len \+ 1 = 11; use seq_len <= 9"):
        sample_windows(torch.arange(10), 1, 10, torch.Generator(), "x.txt")


def test_same_seed_same_windows_other_seed_other_windows(tokenizer):
    a = calibration_windows(tokenizer, "pydoc", 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(tokenizer, "pydoc", 8, 64, seed=1))
    assert not torch.equal(a, calibration_windows(tokenizer, "pydoc", 8, 64, seed=2))


def char_runs(text: str, n: int = SHARED_RUN) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def test_pydoc_windows_never_touch_the_evaluation_half(tokenizer):
    """No 64-character run of any calibration window occurs in the evaluation half."""
    cal, ev = split_pydoc()
    eval_runs = char_runs(ev)
    windows = calibration_windows(tokenizer, "pydoc", 64, 256, seed=0)
    assert not any(char_runs(tokenizer.decode(row)) & eval_runs for row in windows)
    # positive controls: the check sees windows cut from the evaluation half, and from the raw
    # calibration half, which quotes evaluation topics ("compound" holds "if", "try", ...)
    for text in (ev, cal):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        leaked = sample_windows(ids, 64, 256, torch.Generator().manual_seed(0))
        assert any(char_runs(tokenizer.decode(row)) & eval_runs for row in leaked)


def test_pydoc_source_is_the_calibration_half_minus_shared_paragraphs():
    cal, ev = split_pydoc()
    text = pydoc_calibration_text()
    paragraphs = cal.split("\n\n")
    assert all(p in paragraphs for p in text.split("\n\n"))  # only calibration-half paragraphs, in order
    assert not char_runs(text) & char_runs(ev)
    assert 0.6 * len(cal) < len(text) < len(cal)


def test_drop_shared_paragraphs_rechecks_the_joins():
    other = "a|c bbb"
    assert drop_shared_paragraphs("a|b|c", "xyz", run=3, sep="|") == "a|b|c"
    assert drop_shared_paragraphs("a|bbb|d", other, run=3, sep="|") == "a|d"
    assert drop_shared_paragraphs("a|bbb|c", other, run=3, sep="|") == ""  # dropping bbb joins a|c, shared too


# ----------------------------------------------------------------------------- file sources
def test_text_source_is_tokenized_once_and_windows_come_from_it(files):
    tok = WordTokenizer()
    w = calibration_windows(tok, str(files / "b.txt"), 5, 50, seed=3)
    assert tok.calls == 1
    assert w.shape == (5, 50) and bool((w >= 1000).all()) and all(is_contiguous_run(r) for r in w)


def test_mixing_counts_groups_rows_by_source_in_spec_order(files):
    spec = f"{files / 'a.txt'}:3,{files / 'b.txt'}:5"
    w = calibration_windows(WordTokenizer(), spec, 8, 20)
    assert bool((w[:3] < 1000).all()) and bool((w[3:] >= 1000).all())
    w = calibration_windows(WordTokenizer(), f"{files / 'a.txt'}:0.25,{files / 'b.txt'}", 8, 20)
    assert bool((w[:2] < 1000).all()) and bool((w[2:] >= 1000).all())


def test_list_of_sources_equals_the_spec_string(files):
    spec = f"{files / 'a.txt'}:3,{files / 'b.txt'}:5"
    listed = [calib_source(files / "a.txt", 3), f"{files / 'b.txt'}:5"]
    assert torch.equal(calibration_windows(WordTokenizer(), listed, 8, 20, seed=4),
                       calibration_windows(WordTokenizer(), spec, 8, 20, seed=4))


def test_jsonl_records_joined_in_order(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "1 2 3", "id": 0}\n\n{"text": "4 5"}\n', encoding="utf-8")
    assert source_text(calib_source(f)) == "1 2 3\n\n4 5"
    f.write_text('{"body": "7 8"}\n', encoding="utf-8")
    assert source_text(parse_calib(f"{f}#body")[0]) == "7 8"


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"\n', r"d\.jsonl line 2 is not valid JSON"),
    ('{"text": "a"}\n\n[1, 2]\n', r"line 3 holds a JSON list, not an object"),
    ('{"text": "a"}\n{"body": "b", "id": 3}\n', r"line 2 has no 'text' key \(keys found: 'body', 'id'\)"),
    ('{"text": 5}\n', r"line 1: 'text' holds a int, not a string"),
    ("\n  \n", "empty"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(LowbitError, match=message):
        calibration_windows(WordTokenizer(), str(f), 1, 2)


def test_folder_reads_text_files_in_sorted_order_and_never_opens_pickles(tmp_path):
    (tmp_path / "b.txt").write_text("3 4", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "1"}\n{"text": "2"}\n', encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("5", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("99", encoding="utf-8")
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04\x95 not utf-8 \xff")
    assert source_text(calib_source(tmp_path)) == "1\n\n2\n\n3 4\n\n5"


def test_folder_without_text_files_lists_what_it_found(tmp_path):
    (tmp_path / "data.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(LowbitError, match=r"no \.txt, \.md or \.jsonl files \(found: data\.pkl\)"):
        source_text(calib_source(tmp_path))


def test_text_file_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LowbitError, match=r"latin1\.txt.*not UTF-8.*offset 3"):
        calibration_windows(WordTokenizer(), str(bad), 1, 2)


def test_hf_dataset_folder_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LowbitError, match="pip install datasets"):
        source_text(calib_source(tmp_path))


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["1 2", "3"], "n": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    assert source_text(calib_source(tmp_path / "ds")) == "1 2\n\n3"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["4"]})}).save_to_disk(str(tmp_path / "dd"))
    assert source_text(parse_calib(f"{tmp_path / 'dd'}#body")[0]) == "4"
    with pytest.raises(LowbitError, match=r"no 'text' column \(columns: body\)"):
        source_text(calib_source(tmp_path / "dd"))


# ----------------------------------------------------------------------------- self-generation
@pytest.fixture
def llama(tiny_llama_dir, monkeypatch, tmp_path):
    """The tiny random Llama, with the calibration cache pointed at a fresh folder."""
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_self_generation_is_seeded(llama, tokenizer):
    a = self_generate(llama, tokenizer, 5, 24, seed=0, batch_size=2, use_cache=False, progress=False)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert torch.equal(a, self_generate(llama, tokenizer, 5, 24, seed=0, batch_size=2, use_cache=False,
                                        progress=False))
    assert not torch.equal(a, self_generate(llama, tokenizer, 5, 24, seed=1, batch_size=2, use_cache=False,
                                            progress=False))


def test_greedy_prefix_then_sampling(llama, tokenizer):
    tokens = self_generate(llama, tokenizer, 6, 16, seed=0, batch_size=4, prefix_lengths=(3, 4, 5),
                           use_cache=False, progress=False)
    special = set(tokenizer.all_special_ids)
    sampled_argmax = []
    with torch.no_grad():
        for i, row in enumerate(tokens):
            assert int(row[0]) not in special
            argmax = llama(row[None]).logits[0].argmax(-1)  # (L,): argmax[t] predicts row[t + 1]
            k = (3, 4, 5)[i % 3]
            assert torch.equal(row[1:k], argmax[: k - 1]), (i, k)  # tokens 2..k are top-1 given the prefix
            sampled_argmax.extend((row[k:] == argmax[k - 1 : -1]).tolist())
    assert sum(sampled_argmax) < len(sampled_argmax) / 2  # the rest is sampled, not greedy


def test_cache_hit_returns_the_same_tokens_without_running_the_model(llama, tokenizer, tmp_path, monkeypatch):
    a = self_generate(llama, tokenizer, 3, 12, seed=5, progress=False)
    files = list((tmp_path / "cache" / "selfgen").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp file left behind

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran on a cache hit")

    monkeypatch.setattr(llama, "forward", refuse)
    assert torch.equal(a, self_generate(llama, tokenizer, 3, 12, seed=5, progress=False))


def test_cache_key_follows_the_weights(llama, tokenizer, tmp_path):
    import copy

    twin = copy.deepcopy(llama)
    assert model_fingerprint(twin) == model_fingerprint(llama)
    with torch.no_grad():
        twin.model.norm.weight[0] += 1e-3
    assert model_fingerprint(twin) != model_fingerprint(llama)
    self_generate(llama, tokenizer, 2, 8, progress=False)
    self_generate(twin, tokenizer, 2, 8, progress=False)
    assert len(list((tmp_path / "cache" / "selfgen").iterdir())) == 2


def test_mix_with_self_uses_the_model_and_the_source_seed(llama, tokenizer):
    w = calibration_windows(tokenizer, "pydoc:0.5,self:0.5", 4, 16, seed=2, model=llama, progress=False)
    assert w.shape == (4, 16) and w.dtype == torch.long
    assert torch.equal(w[2:], self_generate(llama, tokenizer, 2, 16, sub_seed(2, "self"), progress=False))
    assert torch.equal(w, calibration_windows(tokenizer, "pydoc:0.5,self:0.5", 4, 16, seed=2, model=llama,
                                              progress=False))


def test_first_tokens_skip_special_ids(llama, tokenizer):
    ids = first_token_candidates(llama, tokenizer)
    assert set(ids.tolist()) == set(range(len(tokenizer))) - set(tokenizer.all_special_ids)


def test_inverse_cdf_sampling_follows_the_probabilities():
    logits = torch.tensor([0.1, 0.0, 0.2, 0.7]).log().expand(6, 4)  # token 1 has probability 0
    u = torch.tensor([0.0, 0.05, 0.1, 0.25, 0.31, 0.999])
    assert sample(logits, u).tolist() == [0, 0, 2, 2, 3, 3]
