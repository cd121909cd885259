"""Folders of format version 1 load after the format change; newer folders are refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.hf.quantizer import install_hook
from lowbit.io import read_manifest
from lowbit.manifest import FORMAT_VERSION, migrate

FIXTURES = Path(__file__).parents[1] / "fixtures"
V1 = FIXTURES / "v1-llama"


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURES / "v1-llama-expected.safetensors"))


def test_the_fixture_is_version_1():
    assert json.loads((V1 / "lowbit.json").read_text())["format_version"] == 1


def test_migrate_brings_version_1_to_the_current_format():
    old = json.loads((V1 / "lowbit.json").read_text())
    new = migrate(old)
    assert new["format_version"] == FORMAT_VERSION == 3 and new["masks"] == {}
    assert new["quantized"] == old["quantized"] and old["format_version"] == 1  # the input is left alone
    assert read_manifest(V1) == new


def test_version_1_folder_gives_the_logits_it_was_written_with(expected):
    with torch.no_grad():
        ref = lowbit.load(V1, packed=False)(expected["input_ids"]).logits
        packed = lowbit.load(V1)(expected["input_ids"]).logits
    # the weights are those it was written with; the forward around them is transformers', whose
    # releases round differently in the last bit (5.25.0: 1.2e-7 of logits up to 0.63)
    assert (ref - expected["logits"]).abs().max() <= 1e-5 * expected["logits"].abs().max()
    assert (packed - expected["logits"]).abs().max() <= 0.02 * expected["logits"].abs().max()


def test_version_1_folder_loads_with_from_pretrained(expected):
    from transformers import AutoModelForCausalLM

    from lowbit.hf.quantizer import loading

    install_hook()
    with loading(packed=False), torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(V1)(expected["input_ids"]).logits
    assert torch.equal(got, lowbit.load(V1, packed=False)(expected["input_ids"]).logits)  # the same model
    assert (got - expected["logits"]).abs().max() <= 1e-5 * expected["logits"].abs().max()


def _edited(tmp_path: Path, edit) -> Path:
    out = tmp_path / "f"
    shutil.copytree(V1, out)
    for name in ("lowbit.json", "config.json"):
        d = json.loads((out / name).read_text())
        edit(d if name == "lowbit.json" else d["quantization_config"])
        (out / name).write_text(json.dumps(d))
    return out


def test_a_newer_folder_format_is_refused_naming_the_version(tmp_path):
    def newer(d):
        d["format_version"], d["lowbit_version"] = 4, "0.9.0"

    folder = _edited(tmp_path, newer)
    msg = r"uses folder format 4, written by lowbit 0\.9\.0; this lowbit .* reads folder formats 1 to 3: upgrade lowbit"
    with pytest.raises(LowbitError, match=msg):
        lowbit.load(folder)
    from transformers import AutoModelForCausalLM

    install_hook()
    with pytest.raises(LowbitError, match=msg):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_newer_spec_version_is_refused_naming_the_tensor(tmp_path):
    def newer(d):
        d["quantized"]["model.layers.0.mlp.up_proj.weight"]["spec"]["version"] = 2

    with pytest.raises(LowbitError, match=r"spec version 2 \(for model\.layers\.0\.mlp\.up_proj\.weight\).*upgrade"):
        lowbit.load(_edited(tmp_path, newer))


def test_an_unknown_old_format_is_refused(tmp_path):
    def older(d):
        d["format_version"] = 0

    with pytest.raises(LowbitError, match="folder format 0, which no lowbit reads"):
        lowbit.load(_edited(tmp_path, older))
