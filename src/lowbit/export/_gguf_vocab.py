"""Tokenizer metadata for GGUF, read from a folder's ``tokenizer.json`` (byte-level BPE only).

llama.cpp re-implements tokenization from metadata: the tokens in id order, their types, the
merges, the special ids, and ``tokenizer.ggml.pre``, the name of its pre-tokenizer (the regex
that splits text before BPE). lowbit names it from the structure of the Hugging Face
pre-tokenizer, so llama.cpp splits text as the folder's tokenizer does:

==============================================  ===========
Hugging Face ``pre_tokenizer``                  ``pre``
==============================================  ===========
ByteLevel (GPT-2 regex)                         gpt-2
Digits(individual) then ByteLevel               smollm
Split(Llama 3 regex) then ByteLevel(no regex)   llama-bpe
Split(Qwen2 regex) then ByteLevel(no regex)     qwen2
==============================================  ===========

Anything else raises ``LowbitError``: a wrong ``pre`` would make llama.cpp tokenize text
differently from the model's own tokenizer without any error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {_LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe", _LETTERS + r"\p{N}" + _TAIL: "qwen2"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a Hugging Face ``pre_tokenizer`` (see the module table)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise LowbitError(f"the tokenizer's pre-tokenizer {' + '.join(map(str, kinds))} has no llama.cpp "
                      "equivalent lowbit knows; supported: ByteLevel (gpt-2), Digits + ByteLevel (smollm), "
                      "the Llama 3 and Qwen2 Split regexes")


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _template_adds(processor: dict | None) -> tuple[bool, bool]:
    """(adds a special token first, adds one last) under the single-sequence template."""
    procs = (processor or {}).get("processors", [processor or {}])
    for p in procs:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            single = p["single"]
            return "SpecialToken" in single[0], "SpecialToken" in single[-1]
    return False, False


def read_vocab(path: Path, config: Any) -> Vocab:
    """The folder's tokenizer as GGUF metadata; ids past the tokenizer up to ``vocab_size`` are UNUSED."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise LowbitError(f"{path} has no tokenizer.json; llama.cpp needs the tokenizer: save the model "
                          "with its tokenizer (lowbit.save(model, out, tokenizer=tok))")
    t = json.loads(file.read_text())
    model = t.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LowbitError(f"{file} is a {model.get('type')} tokenizer; gguf export writes byte-level BPE "
                          "(GPT-2 style) tokenizers only")
    ids = {tok: i for tok, i in model["vocab"].items()}
    ids.update({a["content"]: a["id"] for a in t.get("added_tokens", [])})
    n = config.vocab_size
    if max(ids.values()) >= n:
        raise LowbitError(f"{file} has token id {max(ids.values())} but the model's vocab_size is {n}")
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for tok, i in ids.items():
        tokens[i], types[i] = tok, NORMAL
    for a in t.get("added_tokens", []):
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = Vocab(tokens, types, merges, pre_name(t.get("pre_tokenizer")))
    _read_config(path, config, ids, vocab, t.get("post_processor"))
    return vocab


def _read_config(path: Path, config: Any, ids: dict[str, int], vocab: Vocab, processor: dict | None) -> None:
    """Special ids, add_bos/add_eos and the chat template from tokenizer_config.json (or config.json)."""
    tc_file = path / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(tc.get(f"{role}_token"))
        i = ids.get(text) if text is not None else getattr(config, f"{role}_token_id", None)
        if isinstance(i, int):
            vocab.special[role] = i
    first, last = _template_adds(processor)
    vocab.add_bos = bool(tc.get("add_bos_token", first and "bos" in vocab.special))
    vocab.add_eos = bool(tc.get("add_eos_token", last and "eos" in vocab.special))
    jinja = path / "chat_template.jinja"
    vocab.chat_template = jinja.read_text() if jinja.is_file() else tc.get("chat_template")


def add_vocab(w: Any, vocab: Vocab) -> None:
    """Write ``vocab`` with a ``gguf.GGUFWriter``."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for role, i in vocab.special.items():
        adders[role](i)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if isinstance(vocab.chat_template, str):
        w.add_chat_template(vocab.chat_template)
