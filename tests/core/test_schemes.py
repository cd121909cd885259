"""Tensor schemes: the string syntax, presets, JSON round trips and the refusals."""
from __future__ import annotations

import json

import pytest

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.scheme import ActSpec, Rule, SparsitySpec, TensorScheme, resolve
from lowbit.schemes import describe_scheme, parse_scheme, parse_tensor_scheme, scheme_presets
from lowbit.spec import PerGroup

STRINGS = ["int8:channel+a=int8:token", "uint4:g128", "s=0.5", "s=2:4", "s=channel:0.3", "int4:g128+s=2:4",
           "fp8_e4m3fn:channel+a=fp8_e4m3fn:tensor:static:mse", "int4:g32+a=int8:g64", "nvfp4:g16+a=nvfp4:g16",
           "uint4_fz:g64:hqq+a=int8:token+s=0.25"]


@pytest.mark.parametrize("text", STRINGS)
def test_strings_round_trip_through_describe_and_json(text):
    scheme = parse_tensor_scheme(text)
    assert parse_tensor_scheme(describe_scheme(scheme)) == scheme
    assert TensorScheme.from_dict(json.loads(json.dumps(scheme.to_dict()))) == scheme


@pytest.mark.parametrize("name", sorted(scheme_presets()))
def test_every_activation_preset_parses_and_round_trips(name):
    scheme = parse_tensor_scheme(name)
    assert scheme.weight is not None and scheme.input is not None
    assert parse_tensor_scheme(describe_scheme(scheme)) == scheme


def test_w8a8_is_int8_channel_weights_and_dynamic_per_token_int8_inputs():
    s = parse_tensor_scheme("w8a8")
    assert s.weight == parse_scheme("int8_narrow:channel")  # codes ±127, scale absmax/127, as vLLM's int8 kernels
    assert s.input == ActSpec(get_format("int8_narrow"), "token", None, True, "minmax")
    assert s.sparsity is None
    static = parse_tensor_scheme("w8a8-static").input
    assert static.granularity == "tensor" and not static.dynamic


def test_sparsity_forms():
    assert parse_tensor_scheme("s=50%").sparsity == SparsitySpec("unstructured", 0.5)
    assert parse_tensor_scheme("s=0.5").sparsity == SparsitySpec("unstructured", 0.5)
    nm = parse_tensor_scheme("s=2:4").sparsity
    assert (nm.kind, nm.n, nm.m, nm.zero_fraction) == ("nm", 2, 4, 0.5)
    assert parse_tensor_scheme("s=channel:30%").sparsity == SparsitySpec("channel", 0.3)
    assert parse_tensor_scheme("s=50%").weight is None  # pruning only: weights stay float


def test_weight_overrides_apply_to_the_weight_part():
    s = parse_tensor_scheme("uint4:g128+a=int8:token", group_size=32)
    assert s.weight.granularity == PerGroup(32) and s.input.granularity == "token"


@pytest.mark.parametrize("text,match", [
    ("int4:g32+a=int99", "unknown activation format"),
    ("int4:g32+a=int8:sideways", "activation option"),
    ("int4:g32+s=lots", "not a ratio"),
    ("int4:g32+s=1.5", "strictly between 0 and 1"),
    ("int4:g32+s=4:2", "0 < n < m"),
    ("int4:g32+int8", "not understood"),
    ("a=int8:token:static", "static activation scales are per tensor"),
    ("int8+a=mxfp4:token", "blocks of 32"),
])
def test_bad_scheme_strings_say_what_is_wrong(text, match):
    with pytest.raises(LowbitError, match=match):
        parse_tensor_scheme(text)


def test_an_empty_scheme_is_refused():
    with pytest.raises(LowbitError, match="empty scheme"):
        TensorScheme()


def test_a_newer_scheme_version_is_refused_naming_it():
    d = parse_tensor_scheme("w8a8").to_dict()
    with pytest.raises(LowbitError, match="version 2"):
        TensorScheme.from_dict({**d, "version": 2})


def test_rules_map_names_to_schemes_and_round_trip():
    rules = [Rule(r".*", parse_tensor_scheme("w8a8")), Rule(r"mlp\.down_proj", parse_scheme("uint4:g64")),
             Rule(r"lm_head", None)]
    back = [Rule.from_dict(json.loads(json.dumps(r.to_dict()))) for r in rules]
    assert back == rules
    assert resolve(back, "model.layers.0.self_attn.q_proj") == parse_tensor_scheme("w8a8")
    assert resolve(back, "model.layers.0.mlp.down_proj") == TensorScheme(parse_scheme("uint4:g64"))
    assert resolve(back, "lm_head") is None  # the last matching rule wins, and None leaves a layer alone
    assert back[1].spec == parse_scheme("uint4:g64")  # a QuantSpec rule is a weight-only scheme
