"""loralab targets: counts on the meta device equal hand counts and what add_lora really trains."""

import json

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, find_targets, trainable_report
from loralab.cli import main
from loralab.targets import (adapter_params, llama_like_shape, model_shape, presets, select, shape_of,
                             targets_report)

LLAMA_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
BERT_BASE = dict(model_type="bert", architectures=["BertModel"], hidden_size=768, num_hidden_layers=12,
                 intermediate_size=3072, num_attention_heads=12, vocab_size=30522)
GPT2_SMALL = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=768, n_layer=12, n_head=12,
                  vocab_size=50257)


def write_config(tmp_path, name, config) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    return model_shape(write_config(tmp_path_factory.mktemp("cfg"), "llama", LLAMA_7B))


def _run(capsys, *args):
    code = main(["targets", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_llama_7b_counts_by_hand(llama7b):
    shape, model = llama7b
    assert all(p.device.type == "meta" for p in model.parameters())          # nothing was allocated
    L, h, f, r = 32, 4096, 11008, 16
    assert shape.total_params == 6_738_415_616 == L * (4 * h * h + 3 * h * f + 2 * h) + 2 * 32000 * h + h
    rows = {p["preset"]: p for p in targets_report(model, shape, r)["presets"]}
    assert rows["q,v"]["trainable_params"] == L * 2 * r * (h + h) == 8_388_608
    assert rows["q,k,v,o"]["trainable_params"] == L * 4 * r * (h + h) == 16_777_216
    assert rows["all-linear"]["trainable_params"] == L * r * (4 * 2 * h + 3 * (h + f)) == 39_976_960
    assert rows["all-linear"]["modules"] == 7 * L
    assert rows["q,v"]["percent_of_model"] == pytest.approx(100 * 8_388_608 / 6_738_415_616)


def test_the_popular_table_of_4m_8m_20m_is_r_8(llama7b):
    shape, model = llama7b
    counts = [p["trainable_params"] for p in targets_report(model, shape, 8)["presets"]]
    assert counts == [4_194_304, 8_388_608, 19_988_480]          # ~4M / ~8M / ~20M: r=8, not r=16


@pytest.mark.parametrize("build, spec", [
    (tiny_llama, ["q_proj", "v_proj"]), (tiny_llama, "all-linear"), (tiny_llama, r".*\.0\.mlp\.(up|down)_proj"),
    (tiny_bert, ["query", "value"]), (tiny_bert, "all-linear"), (tiny_gpt2, ["c_attn"]), (tiny_gpt2, "all-linear"),
])
def test_meta_count_equals_what_add_lora_trains(build, spec):
    """The independent reference: a real model with real adapters, counted by trainable_report."""
    model = build()
    cfg = model.config
    with torch.device("meta"):
        meta = type(model)(cfg)
    shape = shape_of(meta, source="t", hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                     kv_hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size)
    chosen = select(meta, shape, spec)
    assert [c.path for c in chosen] == find_targets(model, LoraConfig(target_modules=spec))
    add_lora(model, LoraConfig(r=4, target_modules=spec))
    assert adapter_params(chosen, 4) == trainable_report(model).trainable
    assert shape.total_params + adapter_params(chosen, 4) == trainable_report(model).total


def test_presets_use_each_architectures_names(tmp_path):
    names = {}
    for key, config in (("bert", BERT_BASE), ("gpt2", GPT2_SMALL)):
        shape, _ = model_shape(write_config(tmp_path, key, config))
        names[key] = dict(presets(shape))
    assert names["bert"]["q,v"] == ["query", "value"]
    assert names["bert"]["q,k,v,o"] == ["query", "key", "value", "attention.output.dense"]
    assert names["gpt2"]["q,v"] == ["c_attn"]                              # fused q/k/v: cannot be split
    assert names["gpt2"]["q,k,v,o"] == ["c_attn", "attn.c_proj"]           # not mlp.c_proj


def test_bert_output_dense_needs_a_regex_and_the_regex_selects_exactly_it(tmp_path):
    shape, model = model_shape(write_config(tmp_path, "bert", BERT_BASE))
    report = targets_report(model, shape, 16)
    row = next(g for g in report["groups"] if g["pattern"] == "encoder.layer.*.output.dense")
    assert "\\" in row["target_name"]                                      # "output.dense" also takes attention's
    chosen = select(model, shape, row["target_name"])
    assert [c.path for c in chosen] == [f"encoder.layer.{i}.output.dense" for i in range(12)]
    assert row["lora_params"] == adapter_params(chosen, 16) == 12 * 16 * (3072 + 768)


def test_llama_like_layout_gives_the_real_llama_sizes():
    for params, (h, layers, f) in ((7e9, (4096, 32, 11008)), (13e9, (5120, 40, 13824))):
        shape, _ = llama_like_shape(params)
        assert (shape.hidden, shape.layers, shape.intermediate) == (h, layers, f)
        assert shape.total_params == params


def test_cli_llama_bert_gpt2(tmp_path, capsys):
    out, err = _run(capsys, write_config(tmp_path, "llama", LLAMA_7B), "--r", "16")
    assert [p["trainable_params"] for p in out["presets"]] == [8_388_608, 16_777_216, 39_976_960]
    assert out["all_linear"]["modules"] == 224 and "lm_head" not in out["all_linear"]["names"]
    assert "q_proj" in err and "39,976,960" in err and "meta device" in err
    out, _ = _run(capsys, write_config(tmp_path, "bert", BERT_BASE))
    assert out["total_params"] == 109_482_240                               # bert-base-uncased
    assert out["all_linear"]["modules"] == 12 * 6 + 1                       # + the pooler
    out, _ = _run(capsys, write_config(tmp_path, "gpt2", GPT2_SMALL), "--r", "8")
    assert out["total_params"] == 124_439_808                               # gpt2, head tied to wte
    group = {g["pattern"]: g for g in out["groups"]}["transformer.h.*.attn.c_attn"]
    assert (group["type"], group["in_features"], group["out_features"], group["count"]) == ("Conv1D", 768, 2304, 12)


def test_cli_a_model_directory_and_clear_errors(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    write_config(tmp_path / "m", "config", LLAMA_7B | {"num_hidden_layers": 2, "hidden_size": 256,
                                                       "intermediate_size": 688, "num_attention_heads": 4,
                                                       "num_key_value_heads": 4})
    out, _ = _run(capsys, str(tmp_path / "m"))
    assert out["presets"][0]["trainable_params"] == 2 * 2 * 16 * 512
    assert main(["targets", str(tmp_path / "missing"), "--json"]) == 2
    assert "no config.json" in json.loads(capsys.readouterr().out)["error"]
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["targets", str(tmp_path / "bad.json")]) == 2
    assert "model_type" in capsys.readouterr().err


def test_a_preset_mixing_names_and_a_regex_becomes_one_regex():
    """attention's "output.dense" is also the end of "mlp.output.dense": no list entry selects it alone."""
    from torch import nn

    def block():
        b = nn.Module()
        b.q, b.k, b.v = (nn.Linear(16, 16) for _ in range(3))
        b.output = nn.Module()
        b.output.dense = nn.Linear(16, 16)
        b.mlp = nn.Module()
        b.mlp.up, b.mlp.output = nn.Linear(16, 64), nn.Module()
        b.mlp.output.dense = nn.Linear(64, 16)
        return b
    model = nn.Module()
    model.layers = nn.ModuleList(block() for _ in range(3))
    shape = shape_of(model, source="t", hidden=16, heads=2, kv_hidden=16, layers=3, vocab=0)
    assert [c.role for c in shape.candidates[:6]] == ["attn_in"] * 3 + ["attn_out", "mlp_in", "mlp_out"]
    spec = dict(presets(shape))["q,k,v,o"]
    assert isinstance(spec, str)
    chosen = [c.path for c in select(model, shape, spec)]
    assert chosen == [f"layers.{i}.{n}" for i in range(3) for n in ("q", "k", "v", "output.dense")]
