"""Recipes from Python, ``a+b`` and YAML; method options from dataclass fields; the plan checks."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.models.targets import default_plan
from lowbit.modifiers import available, make, modifier_class
from lowbit.recipe.options import describe_options, parse_options
from lowbit.recipe.plan import plan_recipe
from lowbit.recipe.recipe import Recipe, Stage, from_dict, from_methods, load_recipe
from lowbit.scheme import Rule
from lowbit.schemes import parse_scheme, parse_tensor_scheme

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402


def test_registry_names_every_method_and_builds_it():
    assert {"rtn", "hqq", "nupes", "gptq"} <= set(available())
    for name in available():
        assert modifier_class(name).name == name
        assert make(name).name == name
    with pytest.raises(LowbitError, match="unknown method 'awq'; available: rtn"):
        make("awq")


def test_method_string_gives_one_stage_per_method_with_its_options():
    r = from_methods("hqq+gptq", {"damp": 0.1})
    assert r.name == "hqq+gptq" and [s.modifier.name for s in r.stages] == ["hqq", "gptq"]
    assert r.stages[1].modifier.damp == 0.1 and r.needs_data and not r.float_targets
    assert Recipe.of("rtn") == Recipe((Stage(make("rtn")),))
    assert Recipe.of(make("gptq", damp=0.5)).stages[0].modifier.damp == 0.5


@pytest.mark.parametrize("text,options,match", [
    ("rtn+", {}, "empty part"),
    ("rtn", {"damp": 0.1}, "option damp belongs to none of the methods 'rtn'"),
    ("gptq", {"dampp": 0.1}, "option dampp belongs to none of the methods 'gptq'"),
    ("obc", {}, "unknown method 'obc'"),
])
def test_method_string_refusals(text, options, match):
    with pytest.raises(LowbitError, match=match):
        from_methods(text, options)


def test_recipe_mapping_round_trips():
    d = {"stages": [{"method": "hqq", "targets": "mlp", "scheme": "uint4_fz:g64"},
                    {"method": "gptq", "damp": 0.1, "act_order": False}]}
    r = from_dict(d)
    assert r.stages[0].targets == "mlp" and r.stages[0].scheme == parse_tensor_scheme("uint4_fz:g64")
    assert r.stages[1].modifier == make("gptq", damp=0.1, act_order=False)
    assert from_dict(r.to_dict()) == r


@pytest.mark.parametrize("d,match", [
    ([], "non-empty list 'stages'"),
    ({"stages": []}, "non-empty list 'stages'"),
    ({"stages": [{"method": "rtn"}], "extra": 1}, "unknown key extra"),
    ({"stages": ["rtn"]}, "stage 1 must be a mapping"),
    ({"stages": [{"method": "gptq", "dampening": 1}]}, "method gptq has no option 'dampening'; its options: "),
    ({"stages": [{"method": "rtn", "targets": "("}]}, "is not a regex"),
    ({"stages": [{"method": "rtn", "scheme": "int99"}]}, "int99"),
])
def test_recipe_mapping_refusals(d, match):
    with pytest.raises(LowbitError, match=match):
        from_dict(d)


def test_yaml_recipe_files(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("stages:\n  - method: hqq\n    targets: self_attn\n  - method: gptq\n    damp: 0.1\n")
    assert load_recipe(good).name == "hqq+gptq"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - method: rtn\n   damp: [1\n")
    with pytest.raises(LowbitError, match=r"bad.yaml is not valid YAML at line \d"):
        load_recipe(bad)
    with pytest.raises(LowbitError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_options_come_from_the_dataclass_fields():
    got = parse_options(["--damp", "0.1", "--no-act-order", "--block-size=64"], ["gptq"])
    assert got == {"damp": 0.1, "act_order": False, "block_size": 64}
    assert parse_options(["--act-order"], ["hqq", "gptq"]) == {"act_order": True}
    flags = [row[0] for row in describe_options("gptq")]
    assert "--damp" in flags and "--act-order/--no-act-order" in flags


@pytest.mark.parametrize("args,match", [
    (["--damp"], "needs a value"),
    (["--damp", "lots"], "not a valid float"),
    (["--act-order=1"], "takes no value"),
    (["--dampening", "1"], "no such option --dampening for method gptq; its options: --damp"),
    (["0.1"], "unexpected argument"),
])
def test_option_refusals(args, match):
    with pytest.raises(LowbitError, match=match):
        parse_options(args, ["gptq"])


def test_plan_checks_refuse_what_a_recipe_cannot_do():
    model = families.llama().eval()
    plan = default_plan(model, parse_scheme("uint4:g32"))
    assert [len(p) for p in plan_recipe(model, from_methods("rtn", {}), plan)] == [len(plan)]
    with pytest.raises(LowbitError, match="targets 'nothing_here' match no tensor"):
        plan_recipe(model, Recipe((Stage(make("rtn"), targets="nothing_here"),)), plan)
    with pytest.raises(LowbitError, match=r"stage 1 \(hqq\): method hqq refines a float zero; uint4 has none"):
        plan_recipe(model, from_methods("hqq", {}), plan)
    with pytest.raises(LowbitError, match=r"stage 2 \(nupes\): method nupes needs a power or symmetric int"):
        plan_recipe(model, from_methods("rtn+nupes", {}), plan)
    sparse = default_plan(model, parse_tensor_scheme("uint4:g32+s=50%"))
    with pytest.raises(LowbitError, match="asks for a sparsity spec .* but no stage of rtn produces it"):
        plan_recipe(model, from_methods("rtn", {}), sparse)
    static = default_plan(model, parse_tensor_scheme("w8a8-static"))
    with pytest.raises(LowbitError, match="static input scale"):
        plan_recipe(model, from_methods("rtn", {}), static)


def test_the_readme_recipe_parses_and_plans(tmp_path):
    import re as regex

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = regex.search(r"```yaml\n(stages:.*?)```", readme, regex.S).group(1)
    (tmp_path / "recipe.yaml").write_text(block)
    r = load_recipe(tmp_path / "recipe.yaml")
    assert r.name == "hqq+gptq" and r.stages[0].targets == "self_attn"
    model = families.llama().eval()
    per_stage = plan_recipe(model, r, default_plan(model, parse_tensor_scheme("uint4_fz:g64")))
    assert [len(p) for p in per_stage] == [8, 6]  # 2 blocks × (q, k, v, o) and × (gate, up, down)


def test_a_recipe_is_recorded_once_per_run_and_read_back_only_when_single(tmp_path):
    import json

    import torch
    from torch import nn

    import lowbit

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    lowbit.quantize(model, [Rule(r"^0$", parse_tensor_scheme("uint4_fz:g32"))], method="hqq", progress=False)
    lowbit.save(model, tmp_path / "one")
    assert load_recipe(tmp_path / "one").to_dict() == {"stages": [{"method": "hqq"}]}
    lowbit.quantize(model, [Rule(r"^2$", parse_tensor_scheme("int8"))], method="rtn", progress=False)
    lowbit.save(model, tmp_path / "two")
    runs = json.loads((tmp_path / "two" / "lowbit.json").read_text())["made_by"]
    assert [r["recipe"]["stages"][0]["method"] for r in runs] == ["hqq", "rtn"]
    assert [r["rules"][0]["pattern"] for r in runs] == ["^0$", "^2$"]
    with pytest.raises(LowbitError, match="made by 2 quantize runs"):
        load_recipe(tmp_path / "two")
    lowbit.save(nn.Linear(4, 4), tmp_path / "none")
    with pytest.raises(LowbitError, match="has no record of how it was made"):
        load_recipe(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LowbitError, match="is a folder without lowbit.json"):
        load_recipe(tmp_path / "plain")
    again = lowbit.load(tmp_path / "two", model=nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)),
                        packed=False)
    assert torch.equal(again[0].weight, model[0].weight)
    lowbit.save(again, tmp_path / "resaved")  # loading and saving again keeps the record
    assert (tmp_path / "resaved" / "lowbit.json").read_bytes() == (tmp_path / "two" / "lowbit.json").read_bytes()
