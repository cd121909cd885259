"""Perplexity and KL against independent references: closed forms and slow obvious loops."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.eval import EvalResult, KLResult, evaluate, kl_divergence, perplexity

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- fixed-logit models
class ConstantLogits(torch.nn.Module):
    """Same logits (V,) at every position, whatever the input; returns an object with ``.logits``."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("row", torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids):
        b, length = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, length, -1).clone())


class Bigram(torch.nn.Module):
    """logits[t] = table[x_t]: a model whose every conditional is known. Returns a plain tensor."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return self.table[input_ids]  # (B, L, V)


class Counting:
    """Wraps a model and counts forwards (a plain callable, not an nn.Module)."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, input_ids):
        self.calls += 1
        return self.model(input_ids)


def bigram_nll_reference(table: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean NLL by the definition, in Python floats: -log softmax(table[prev])[next]."""
    t = table.double().tolist()
    total, count = 0.0, 0
    for w in windows.tolist():
        for prev, nxt in zip(w[:-1], w[1:]):
            log_z = math.log(sum(math.exp(v) for v in t[prev]))
            total += log_z - t[prev][nxt]
            count += 1
    return total / count


def kl_reference(p_ref: list[float], p_model: list[float]) -> float:
    return sum(p * math.log(p / q) for p, q in zip(p_ref, p_model) if p > 0)


# ----------------------------------------------------------------------------- tiny Llama
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def llama_nll_reference(model, windows: torch.Tensor) -> float:
    """Mean NLL with a manual loop over windows and F.cross_entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0].float()  # (L, V)
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += w.numel() - 1
    return total / count


def random_windows(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


# ----------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("vocab", [2, 7, 64])
def test_uniform_logits_give_ppl_equal_to_vocab(vocab):
    windows = random_windows(3, 9, vocab)
    r = perplexity(ConstantLogits([0.0] * vocab), windows, progress=False)
    assert isinstance(r, EvalResult)
    assert r.ppl == pytest.approx(vocab, rel=1e-6)
    assert r.nll == pytest.approx(math.log(vocab), rel=1e-6)
    assert r.tokens == 3 * 8
    assert r.seconds >= 0


def test_plain_callable_returning_a_tensor():
    def uniform(ids):
        return torch.zeros(*ids.shape, 5)

    r = perplexity(uniform, random_windows(2, 4, 5), progress=False)
    assert r.ppl == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_bigram_matches_definition(batch_size):
    torch.manual_seed(1)
    vocab = 11
    table = torch.randn(vocab, vocab) * 3
    windows = random_windows(5, 13, vocab, seed=2)
    r = perplexity(Bigram(table), windows, batch_size=batch_size, progress=False)
    expected = bigram_nll_reference(table, windows)
    assert r.nll == pytest.approx(expected, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-6)
    assert r.tokens == 5 * 12


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiny_llama_matches_cross_entropy_loop(tiny_llama, batch_size):
    windows = random_windows(4, 16, 64, seed=3)
    r = perplexity(tiny_llama, windows, batch_size=batch_size, progress=False)
    expected = llama_nll_reference(tiny_llama, windows)
    assert r.nll == pytest.approx(expected, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert r.tokens == 4 * 15


def test_training_mode_is_restored(tiny_llama):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, random_windows(1, 8, 64), progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_progress_bar_does_not_change_result():
    table = torch.randn(6, 6)
    windows = random_windows(3, 5, 6)
    assert perplexity(Bigram(table), windows, progress=True).nll == perplexity(Bigram(table), windows, progress=False).nll


@pytest.mark.parametrize("windows", [torch.zeros(0, 8, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long),
                                     torch.zeros(8, dtype=torch.long), torch.zeros(2, 8)])
def test_bad_windows_are_rejected(windows):
    with pytest.raises(LowbitError):
        perplexity(ConstantLogits([0.0] * 4), windows, progress=False)


def test_bad_batch_size_is_rejected():
    with pytest.raises(LowbitError, match="batch_size 0"):
        perplexity(ConstantLogits([0.0] * 4), random_windows(2, 4, 4), batch_size=0, progress=False)


# ----------------------------------------------------------------------------- KL
def test_kl_of_a_model_with_itself_is_zero(tiny_llama):
    windows = random_windows(3, 16, 64, seed=4)
    r = kl_divergence(tiny_llama, tiny_llama, windows, progress=False)
    assert isinstance(r, KLResult)
    assert abs(r.kl) < 1e-6
    assert r.ppl == r.ref_ppl
    assert r.ppl == pytest.approx(math.exp(llama_nll_reference(tiny_llama, windows)), rel=1e-5)
    assert r.tokens == 3 * 15


def test_kl_closed_form_on_fixed_distributions():
    p_ref, p_model = [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]
    reference = ConstantLogits([math.log(p) for p in p_ref])
    model = ConstantLogits([0.0, 0.0, 0.0, 0.0])  # uniform
    windows = torch.tensor([[0, 1, 2, 3, 3], [3, 3, 2, 0, 1]])
    r = kl_divergence(model, reference, windows, progress=False)
    assert r.kl == pytest.approx(kl_reference(p_ref, p_model), rel=1e-5)
    assert r.ppl == pytest.approx(4.0, rel=1e-6)
    # reference NLL by hand: predicted tokens are windows[:, 1:]
    targets = [1, 2, 3, 3, 3, 2, 0, 1]
    ref_nll = -sum(math.log(p_ref[t]) for t in targets) / len(targets)
    assert r.ref_ppl == pytest.approx(math.exp(ref_nll), rel=1e-6)
    # direction matters: KL(model || ref) is a different number
    swapped = kl_divergence(reference, model, windows, progress=False)
    assert swapped.kl == pytest.approx(kl_reference(p_model, p_ref), rel=1e-5)
    assert swapped.kl != pytest.approx(r.kl, rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_kl_is_non_negative_and_matches_per_position_definition(seed):
    torch.manual_seed(seed)
    vocab = 9
    ta, tb = torch.randn(vocab, vocab) * 2, torch.randn(vocab, vocab) * 2
    windows = random_windows(4, 7, vocab, seed=seed)
    r = kl_divergence(Bigram(ta), Bigram(tb), windows, batch_size=2, progress=False)
    expected = []
    for w in windows.tolist():
        for prev in w[:-1]:
            p = torch.softmax(tb[prev].double(), 0).tolist()
            q = torch.softmax(ta[prev].double(), 0).tolist()
            expected.append(kl_reference(p, q))
    assert r.kl > 0
    assert r.kl == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert r.nll == pytest.approx(bigram_nll_reference(ta, windows), rel=1e-6)
    assert r.ref_ppl == pytest.approx(math.exp(bigram_nll_reference(tb, windows)), rel=1e-6)


def test_evaluate_keys_and_one_forward_per_model_per_window():
    torch.manual_seed(7)
    ta, tb = torch.randn(8, 8), torch.randn(8, 8)
    windows = random_windows(6, 5, 8)
    model, reference = Counting(Bigram(ta)), Counting(Bigram(tb))

    alone = evaluate(model, windows, progress=False)
    assert set(alone) == {"ppl", "nll", "tokens", "seconds"}
    assert model.calls == 6

    model.calls = 0
    both = evaluate(model, windows, reference=reference, progress=False)
    assert set(both) == {"ppl", "nll", "tokens", "seconds", "kl", "ref_ppl"}
    assert (model.calls, reference.calls) == (6, 6)
    assert both["ppl"] == pytest.approx(alone["ppl"], rel=1e-9)
    assert both["tokens"] == alone["tokens"] == 6 * 4
    assert both["ref_ppl"] == pytest.approx(perplexity(Bigram(tb), windows, progress=False).ppl, rel=1e-9)
