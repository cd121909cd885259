"""Build a large random-weight Llama checkpoint on disk, without holding it in memory.

    python3 bench/scale.py build OUT_DIR [--config open_llama_3b] [--seed 0] [--max-shard-size 2GB] [--force]
    python3 bench/scale.py verify OUT_DIR [--rehash 1,7]      # cheap checks; --rehash regenerates shards
    python3 bench/scale.py selftest                           # tiny model: byte-compare with save_pretrained

``build`` writes an HF folder laid out exactly like ``LlamaForCausalLM.save_pretrained`` (fp32
safetensors shards named model-0000k-of-0000n.safetensors, model.safetensors.index.json,
config.json, generation_config.json), plus a byte-level BPE tokenizer trained on
``pydoc_data.topics`` and a small ``scale_build.json`` recording how the folder was made.

The weights are generated one tensor at a time, so peak memory is one shard (~2 GB with the
default ``--max-shard-size``) plus the Python/torch baseline (~0.4 GB). Each tensor has its own
``torch.Generator`` seeded from (seed, tensor name), so the bytes depend only on the seed, the
config and the shard split, never on the order of generation. Initialisation follows
``LlamaPreTrainedModel._init_weights``: normal(0, initializer_range) for linear and embedding
weights, ones for RMSNorm weights. Everything is written into a temporary sibling folder that
is renamed into place at the end, so OUT_DIR is either absent or complete.

``selftest`` builds the tiny preset, loads those weights into a real ``LlamaForCausalLM``,
calls ``save_pretrained`` with the same shard size, and requires every file to be
byte-identical; it also builds twice to check determinism.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SCRIPT_VERSION = 1
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama's tokenizer

PRESETS: dict[str, dict] = {
    # openlm-research/open_llama_3b: ~3.43B parameters, 13.7 GB in fp32
    "open_llama_3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02),
    # openlm-research/open_llama_7b / Llama-1/2 7B shape: ~6.74B parameters, 27 GB in fp32
    "open_llama_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02),
    # for tests: ~10M parameters
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02),
}


# ----------------------------------------------------------------------------- model side

def make_config(preset: str):
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[preset])


def meta_model(config):
    """The model on the meta device: names, shapes and dtypes, no memory."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"lowbit-scale:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_kind(name: str, shape: torch.Size) -> str:
    """'ones' for RMSNorm weights, 'normal' for linear/embedding weights (HF's _init_weights)."""
    if name.endswith("norm.weight") and len(shape) == 1:
        return "ones"
    if name.endswith(".weight") and len(shape) == 2:
        return "normal"
    raise ValueError(f"don't know how to initialise {name} {tuple(shape)}")


def make_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    if init_kind(name, shape) == "ones":
        return t.fill_(1.0)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return t.normal_(0.0, std, generator=g)


def shard_plan(model, max_shard_size):
    """The same split save_pretrained computes (huggingface_hub.split_torch_state_dict_into_shards)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from transformers.utils import SAFE_WEIGHTS_NAME

    state = model.state_dict()
    pattern = SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    return state, split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size)


def write_shard(path: Path, names, state, seed: int, std: float, progress=None) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name in names:
        meta = state[name]
        tensors[name] = make_tensor(name, meta.shape, meta.dtype, seed, std)
        if progress is not None:
            progress.update(tensors[name].numel() * tensors[name].element_size())
    save_file(tensors, str(path), metadata={"format": "pt"})  # same metadata save_pretrained writes
    del tensors


# ----------------------------------------------------------------------------- tokenizer

def topics_text() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on pydoc_data.topics, wrapped as a transformers fast tokenizer.

    The topics text (~465k characters) only supports ~9.2k tokens; the trainer stops there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tok.train_from_iterator(topics_text(), trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    # Llama prepends <s>, no </s>
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ----------------------------------------------------------------------------- build

def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def build_into(tmp: Path, preset: str, seed: int, max_shard_size, show_progress: bool = True) -> dict:
    """Write the whole checkpoint into the (existing, empty) folder ``tmp``."""
    from tqdm.auto import tqdm

    config = make_config(preset)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(config.vocab_size)
    if len(tokenizer) > config.vocab_size:  # cannot happen with a vocab_size-capped trainer, but be explicit
        config.vocab_size = len(tokenizer)
    tokenizer.save_pretrained(tmp)
    t_tok = time.perf_counter() - t0

    model = meta_model(config)
    state, split = shard_plan(model, max_shard_size)
    n_params = model.num_parameters()
    # what save_pretrained records in config.json before writing it
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)

    std = config.initializer_range
    total = split.metadata["total_size"]
    shards = list(split.filename_to_tensors.items())
    with tqdm(total=total, unit="B", unit_scale=True, desc="weights", disable=not show_progress,
              file=sys.stderr, mininterval=1.0) as bar:
        for i, (fname, names) in enumerate(shards, 1):
            bar.set_postfix_str(f"shard {i}/{len(shards)}")
            write_shard(tmp / fname, names, state, seed, std, bar)
    if split.is_sharded:
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

        index = {"metadata": {"total_parameters": n_params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    info = {
        "script": "bench/scale.py", "script_version": SCRIPT_VERSION, "preset": preset, "seed": seed,
        "max_shard_size": str(max_shard_size), "parameters": n_params, "tensor_bytes": total,
        "shards": len(shards), "dtype": "float32", "init": f"normal(0, {std}) for weights, ones for norms; "
        "one torch.Generator per tensor seeded from sha256(seed, name)",
        "tokenizer": {"kind": "byte-level BPE on pydoc_data.topics", "size": len(tokenizer),
                      "python": sys.version.split()[0]},
        "config_vocab_size": config.vocab_size,
    }
    (tmp / "scale_build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    info["tokenizer_seconds"] = round(t_tok, 2)
    return info


def build(out: Path, preset: str, seed: int, max_shard_size, force: bool, show_progress: bool = True) -> dict:
    import resource

    out = out.resolve()
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    t0 = time.perf_counter()
    try:
        info = build_into(tmp, preset, seed, max_shard_size, show_progress)
        for p in tmp.iterdir():  # make sure the bytes are on disk before the rename publishes them
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / out.name)
            os.rename(tmp, out)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["disk_bytes"] = folder_size(out)
    info["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return info


# ----------------------------------------------------------------------------- verify

def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(out: Path, rehash: list[int] | None = None, load_meta: bool = True) -> dict:
    """Checks that need no more than headers: config, tokenizer, key set and shapes vs a meta model.

    ``rehash``: 1-based shard numbers to regenerate (into a temp file beside OUT) and byte-compare.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    report: dict = {}
    info = json.loads((out / "scale_build.json").read_text())
    config = AutoConfig.from_pretrained(out)
    report["config"] = f"{type(config).__name__} {config.model_type} vocab={config.vocab_size} dtype={config.dtype}"
    expected = make_config(info["preset"])
    for k in PRESETS[info["preset"]]:
        assert getattr(config, k) == getattr(expected, k) or k == "vocab_size", (k, getattr(config, k))

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):\n    return x ** 2  # The quick brown fox")["input_ids"]
    assert ids[0] == tok.bos_token_id == config.bos_token_id == 1 and tok.eos_token_id == config.eos_token_id == 2
    assert len(tok) <= config.vocab_size, (len(tok), config.vocab_size)
    report["tokenizer"] = f"{type(tok).__name__} len={len(tok)} sample={len(ids)} ids, max id {max(ids)}"

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert index["metadata"]["total_parameters"] == model.num_parameters()
    else:
        weight_map = {k: "model.safetensors" for k in want}
    files = sorted(set(weight_map.values()))
    got, total = {}, 0
    for fname in files:
        with safe_open(out / fname, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, f.metadata()
            for k in f.keys():
                assert weight_map[k] == fname, (k, fname)
                sl = f.get_slice(k)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                got[k] = (shape, {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype])
                total += torch.Size(shape).numel() * 4
    assert set(got) == set(want), (set(got) ^ set(want))
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, [(k, got[k], want[k]) for k in bad[:5]]
    if index_path.exists():
        assert index["metadata"]["total_size"] == total
    report["tensors"] = f"{len(got)} keys, shapes and dtypes match the meta model; {model.num_parameters():,} parameters"
    report["files"] = len(files)
    report["disk_bytes"] = folder_size(out)

    if load_meta:
        # the loading path the benchmarks will use, with no weight data read
        import resource

        with torch.device("meta"):
            t0 = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(out, device_map="meta")
        assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: v[0] for k, v in want.items()}
        report["from_pretrained_meta"] = (f"ok in {time.perf_counter() - t0:.1f}s, "
                                          f"process maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    if rehash:
        state, split = shard_plan(model, info["max_shard_size"])
        shards = list(split.filename_to_tensors.items())
        report["rehash"] = {}
        for i in rehash:
            fname, names = shards[i - 1]
            with tempfile.TemporaryDirectory(prefix=".rehash-", dir=out.parent) as td:
                write_shard(Path(td) / fname, names, state, info["seed"], config.initializer_range)
                a, b = sha256_file(Path(td) / fname), sha256_file(out / fname)
            assert a == b, f"{fname}: regenerated {a} != on disk {b}"
            report["rehash"][fname] = a
    return report


# ----------------------------------------------------------------------------- selftest

def selftest(max_shard_size: str = "8MB") -> None:
    """Tiny preset: identical bytes to save_pretrained, and to a second build."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        a = build(td / "a", "tiny", 0, max_shard_size, force=False, show_progress=False)
        build(td / "b", "tiny", 0, max_shard_size, force=False, show_progress=False)
        build(td / "c", "tiny", 1, max_shard_size, force=False, show_progress=False)
        names = sorted(p.name for p in (td / "a").iterdir())
        assert names == sorted(p.name for p in (td / "b").iterdir())
        for n in names:
            assert (td / "a" / n).read_bytes() == (td / "b" / n).read_bytes(), f"not deterministic: {n}"
        first = "model-00001-of-%05d.safetensors" % a["shards"]
        assert (td / "a" / first).read_bytes() != (td / "c" / first).read_bytes(), "seed ignored"

        # a real model holding the same weights, saved by transformers
        model = LlamaForCausalLM(make_config("tiny"))
        sd = {}
        for n in names:
            if n.endswith(".safetensors"):
                sd.update(load_file(td / "a" / n))
        model.load_state_dict(sd, strict=True)
        model.save_pretrained(td / "ref", max_shard_size=max_shard_size)
        ref = sorted(p.name for p in (td / "ref").iterdir())
        weights = [n for n in names if n.startswith("model")] + ["config.json", "generation_config.json"]
        assert sorted(n for n in ref) == sorted(weights), (ref, weights)
        for n in ref:
            assert (td / "a" / n).read_bytes() == (td / "ref" / n).read_bytes(), f"differs from save_pretrained: {n}"
        # init statistics look like HF's
        w = sd["model.layers.0.mlp.up_proj.weight"]
        assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
        assert torch.equal(sd["model.norm.weight"], torch.ones_like(sd["model.norm.weight"]))
        rep = verify(td / "a")
        print(f"selftest ok: {a['shards']} shards + index/config/generation_config byte-identical to "
              f"save_pretrained; deterministic; seed-dependent. verify: {rep}")


# ----------------------------------------------------------------------------- cli

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build OUT_DIR")
    b.add_argument("out", type=Path)
    b.add_argument("--config", default="open_llama_3b", choices=sorted(PRESETS))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-shard-size", default="2GB", help="as save_pretrained's max_shard_size (default 2GB)")
    b.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    b.add_argument("--no-progress", action="store_true")
    v = sub.add_parser("verify", help="check OUT_DIR without loading the weights")
    v.add_argument("out", type=Path)
    v.add_argument("--rehash", default="", help="comma-separated 1-based shard numbers to regenerate and compare")
    v.add_argument("--no-load", action="store_true", help="skip from_pretrained(device_map='meta')")
    sub.add_parser("selftest", help="tiny model vs save_pretrained, determinism")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        info = build(args.out, args.config, args.seed, args.max_shard_size, args.force, not args.no_progress)
        print(json.dumps(info, indent=2))
        print(f"built {args.out}: {info['parameters']:,} parameters, {info['shards']} shards, "
              f"{human(info['disk_bytes'])} on disk in {info['seconds']:.0f}s, peak RSS {info['maxrss_mb']:.0f} MiB")
    elif args.cmd == "verify":
        rehash = [int(x) for x in args.rehash.split(",") if x]
        print(json.dumps(verify(args.out, rehash, load_meta=not args.no_load), indent=2))
    else:
        selftest()


if __name__ == "__main__":
    main()
