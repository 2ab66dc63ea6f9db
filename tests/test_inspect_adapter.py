"""inspect / doctor / report / diff on adapters saved with save_adapter from tiny transformers models: every number
against a dense computation, the doctor's flags on fresh, NaN and rank-1 adapters, the output checks with a
saved base model, the report folder, and both commands end to end."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, save_adapter
from loralab.cli import main
from loralab.doctor import NEAR_ZERO, ProbeResult, diagnose
from loralab.adapter_file import read_factors as _read_factors
from loralab.inspect_adapter import (diff_factors, energy_ranks, inspect_adapter_dir,
                                     inspect_factors, split_layer)
from loralab.inject import lora_layers
from loralab.report import PLOTS, write_report

TARGETS = ["q_proj", "v_proj"]


def _trained(seed=0, r=4, alpha=8, targets=TARGETS, **config):
    """A tiny Llama with a 'trained-looking' adapter: A and B both random (init_lora_weights=False)."""
    model = tiny_llama()
    torch.manual_seed(seed)
    add_lora(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config))
    return model


def _codes(findings):
    return {f.code for f in findings}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def _dense(model):
    """{path: (ΔW (out, in) float64, W0 float64)} straight from the model's layers."""
    return {p: (l.adapters["default"].delta_weight().double(), l.dense_weight().double())
            for p, l in lora_layers(model).items()}


def test_values_match_dense_computation(tmp_path):
    model = _trained(r=4, alpha=6, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5})
    save_adapter(model, tmp_path / "a")
    dense = _dense(model)
    factors = _read_factors(tmp_path / "a")
    assert set(factors) == set(dense)
    report = inspect_factors(factors, {p: W0 for p, (_, W0) in dense.items()})
    for m in report.modules:
        dW, W0 = dense[m.path]
        s = torch.linalg.svdvals(dW)
        assert m.shape == tuple(dW.shape) and m.r == (2 if "v_proj" in m.path else 4)
        assert m.scaling == pytest.approx(2.5 if "v_proj" in m.path else 1.5)
        assert m.delta_norm == pytest.approx(dW.norm().item(), rel=1e-6)
        assert m.relative == pytest.approx((dW.norm() / W0.norm()).item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(m.singular_values, dtype=torch.float64), s[:m.r], rtol=1e-5, atol=1e-7)
        assert list(m.energy) == energy_ranks(m.r) == ([1, 2] if m.r == 2 else [1, 2, 4])
        for k, e in m.energy.items():
            assert e == pytest.approx((s[:k].square().sum() / s.square().sum()).item(), rel=1e-6)
        p = s[:m.r] / s[:m.r].sum()
        assert m.effective_rank == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)
        assert m.stable_rank == pytest.approx((s.square().sum() / s[0] ** 2).item(), rel=1e-6)
        B = lora_layers(model)[m.path].adapters["default"].lora_B.double()
        assert m.stats["B"]["std"] == pytest.approx(B.std().item(), rel=1e-9)
    table = report.table()
    assert all(m.path in table for m in report.modules) and "‖ΔW‖_F" in table
    json.dumps(report.to_dict())  # JSON-ready


def test_an_adapter_saved_by_peft_reads_with_peft_s_own_delta(tmp_path):
    import peft
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, target_modules=TARGETS, rank_pattern={"v_proj": 2},
        init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    report = inspect_factors(_read_factors(tmp_path))
    layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {m.path for m in report.modules} == set(layers)
    for m in report.modules:
        dW = layers[m.path].get_delta_weight("default").double()  # PEFT's own ΔW (scaling α/√r)
        assert m.scaling == pytest.approx(layers[m.path].scaling["default"])
        assert m.delta_norm == pytest.approx(dW.norm().item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(m.singular_values, dtype=torch.float64), torch.linalg.svdvals(dW)[:m.r],
                                   rtol=1e-5, atol=1e-7)


def test_split_layer():
    assert split_layer("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert split_layer("transformer.h.11.attn.c_attn") == (11, "attn.c_attn")
    assert split_layer("encoder.layer.0.attention.self.query") == (0, "attention.self.query")
    assert split_layer("classifier") == (None, "classifier")
    assert energy_ranks(1) == [1] and energy_ranks(6) == [1, 2, 4] and energy_ranks(16) == [1, 2, 4, 8, 16]


def test_gpt2_conv1d_and_embedding_orientations(tmp_path):
    model = tiny_gpt2()
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "wte"], init_lora_weights=False))
    save_adapter(model, tmp_path / "g")
    factors = _read_factors(tmp_path / "g")
    weights = {p: model.get_submodule(p).base_layer.weight for p in factors}  # Conv1D (in, out), Embedding (n, d)
    report = inspect_factors(factors, weights)
    for m in report.modules:
        dW, W0 = _dense(model)[m.path]
        assert m.relative == pytest.approx((dW.norm() / W0.norm()).item(), rel=1e-6)
    assert {m.name for m in report.modules} == {"attn.c_attn", "transformer.wte"}


def test_doctor_flags_a_fresh_adapter(tmp_path):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))  # B = 0: never trained
    save_adapter(model, tmp_path / "fresh")
    report = inspect_factors(_read_factors(tmp_path / "fresh"))
    assert all(m.singular_values == (0.0,) * 4 and m.effective_rank == 0.0 for m in report.modules)
    findings = diagnose(report)
    untrained = [f for f in findings if f.code == "untrained"]
    assert len(untrained) == 1 and untrained[0].severity == "error" and "every module" in untrained[0].message
    assert "rank_collapse" not in _codes(findings)   # a zero update is not "collapsed"
    assert findings[0].severity == "error" and findings[-1].code == "no_base"


def test_doctor_flags_nan(tmp_path):
    save_adapter(_trained(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "layers.1.self_attn.q_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")  # save_adapter refuses NaN: write the file by hand
    save_file(tensors, weights, metadata={"format": "pt"})
    report = inspect_factors(_read_factors(tmp_path / "a", allow_nonfinite=True))
    bad = [m for m in report.modules if not m.finite]
    assert [m.path for m in bad] == ["model.layers.1.self_attn.q_proj"] and bad[0].singular_values is None
    nan = [f for f in diagnose(report) if f.code == "nonfinite"]
    assert nan and nan[0].severity == "error" and nan[0].module == "model.layers.1.self_attn.q_proj"
    assert "NaN" in report.table()


def test_doctor_flags_rank_one_update_and_suggests_lower_r():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(32, 1, generator=g), torch.randn(1, 32, generator=g)
    factors = {f"model.layers.{i}.mlp.up_proj": (torch.randn(16, 32, generator=g) * 0.01 + v.repeat(16, 1),
                                                 u @ torch.randn(1, 16, generator=g), 2.0) for i in range(3)}
    report = inspect_factors(factors)
    assert all(m.energy[1] > 0.99 and m.rank_99 == 1 for m in report.modules)
    [collapse] = [f for f in diagnose(report) if f.code == "rank_collapse"]
    assert collapse.severity == "warning" and collapse.module is None and "3 modules" in collapse.message
    assert "r=16" in collapse.message and "r=1 holds 99%" in collapse.message


def test_doctor_configuration_checks_are_one_line_each():
    g = torch.Generator().manual_seed(0)
    factors = {f"model.layers.{i}.proj": (torch.randn(8, 5, generator=g), torch.randn(3, 8, generator=g), 16.0)
               for i in range(4)}  # r=8 on 3×5 layers, scaling 16
    findings = diagnose(inspect_factors(factors))
    assert [f.code for f in findings].count("rank_above_dims") == 1
    [scaling] = [f for f in findings if f.code == "alpha_ratio"]  # the rule loralab train warns with, too
    assert "16" in scaling.message and "every adapted module" in scaling.message and "lora_alpha" in scaling.message
    assert not [f for f in diagnose(inspect_factors({"x": (torch.randn(2, 5), torch.randn(3, 2), 2.0)}))
                if f.code in ("alpha_ratio", "rank_above_dims")]


def test_doctor_near_zero_effect_uses_the_base():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g) * 1e-7
    W0 = torch.randn(16, 16, generator=g)
    report = inspect_factors({"m.layers.0.q": (A, B, 2.0)}, {"m.layers.0.q": W0})
    assert report.modules[0].relative < NEAR_ZERO
    [near] = [f for f in diagnose(report) if f.code == "near_zero"]
    assert near.module == "m.layers.0.q" and near.severity == "warning"
    assert "near_zero" not in _codes(diagnose(inspect_factors({"m.layers.0.q": (A, B * 1e5, 2.0)},
                                                              {"m.layers.0.q": W0})))


def test_probe_findings():
    report = inspect_factors({"x": (torch.randn(2, 5), torch.randn(3, 2), 2.0)}, {"x": torch.randn(3, 5)})
    ok = ProbeResult((2, 16), effect=0.3, merge_gap=1e-7, scale=2.0)
    assert diagnose(report, ok) == []
    assert _codes(diagnose(report, ProbeResult((2, 16), 0.0, 0.0, 2.0))) == {"no_effect"}
    assert _codes(diagnose(report, ProbeResult((2, 16), 0.3, 0.5, 2.0))) == {"merge_mismatch"}
    assert _codes(diagnose(report, ProbeResult((2, 16), 0.3, 5e-3, 2.0, half_precision=True))) == set()
    assert _codes(diagnose(report, ProbeResult(error="fingerprint differs"))) == {"load_failed"}


def test_with_base_outputs_differ_and_merged_equals_unmerged(tmp_path, base_dir):
    save_adapter(_trained(), tmp_path / "a")
    result = inspect_adapter_dir(tmp_path / "a", base_dir)
    probe = result["probe"]
    assert probe["error"] is None and probe["effect"] > 1e-3 and probe["merge_gap"] < 1e-5
    assert result["findings"] == [] and result["has_base"]
    dense = _dense(_trained())
    for m in result["modules"]:
        dW, W0 = dense[m["path"]]
        assert m["relative"] == pytest.approx((dW.norm() / W0.norm()).item(), rel=1e-6)


def test_with_base_a_fresh_adapter_changes_nothing(tmp_path, base_dir):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    save_adapter(model, tmp_path / "fresh")
    result = inspect_adapter_dir(tmp_path / "fresh", base_dir)
    assert result["probe"]["effect"] == 0.0
    assert {"untrained", "no_effect"} <= {f["code"] for f in result["findings"]}


def test_a_classifier_adapter_is_checked_on_the_classifier_built_from_the_base(tmp_path):
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert
    tiny_bert().save_pretrained(tmp_path / "bert")  # the base directory holds a plain BertModel
    model = BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=3).eval()
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                               modules_to_save=["classifier"]))
    save_adapter(model, tmp_path / "clf", modules_to_save=["classifier"], task_type="SEQ_CLS")
    result = inspect_adapter_dir(tmp_path / "clf", tmp_path / "bert")
    assert result["module_count"] == 4 and result["modules"][0]["path"].startswith("bert.encoder.layer.0")
    assert result["probe"]["error"] is None and result["probe"]["merge_gap"] < 1e-5
    assert result["findings"] == []


def test_with_a_different_base_the_load_failure_is_a_finding(tmp_path):
    tiny_llama(seed=5).save_pretrained(tmp_path / "other")
    save_adapter(_trained(), tmp_path / "a")
    result = inspect_adapter_dir(tmp_path / "a", tmp_path / "other")
    [failed] = [f for f in result["findings"] if f["code"] == "load_failed"]
    assert "differ" in failed["message"]


def test_report_folder(tmp_path, base_dir):
    save_adapter(_trained(), tmp_path / "a")
    result = inspect_adapter_dir(tmp_path / "a", base_dir, tmp_path / "report")
    folder = tmp_path / "report"
    assert result["report"]["plots"] is True
    assert {p.name for p in folder.iterdir()} == {*PLOTS, "report.json", "index.html"}  # no temp files left
    for name in PLOTS:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "index.html").read_text()
    assert set(re.findall(r"<img src='([^']+)'", page)) == set(PLOTS)
    assert "model.layers.1.self_attn.v_proj" in page and "no problems found" in page
    saved = json.loads((folder / "report.json").read_text())
    assert len(saved["modules"]) == 4 and saved["probe"]["merge_gap"] < 1e-5


def test_report_without_matplotlib_still_writes_text(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = inspect_factors({"x": (torch.randn(2, 5), torch.randn(3, 2), 2.0)})
    said = []
    out = write_report(report, diagnose(report), tmp_path / "r", say=said.append)
    assert out["plots"] is False and {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "index.html"}
    assert "pip install loralab[plot]" in (tmp_path / "r" / "index.html").read_text()
    assert any("pip install loralab[plot]" in s for s in said)


def test_a_report_failing_half_way_leaves_no_index_html(tmp_path):
    report = inspect_factors({"model.layers.0.q": (torch.randn(2, 5), torch.randn(3, 2), 2.0)})
    (tmp_path / "r" / "report.json").mkdir(parents=True)  # report.json cannot be written: a directory holds its name
    with pytest.raises(OSError):
        write_report(report, [], tmp_path / "r")
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert "index.html" not in names and not any(n.endswith(".tmp") for n in names)


def test_diff_against_dense(tmp_path):
    a, b = _trained(seed=1), _trained(seed=2, targets=["q_proj", "k_proj"])
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    report = diff_factors(_read_factors(tmp_path / "a"), _read_factors(tmp_path / "b"), k=2)
    da, db = _dense(a), _dense(b)
    assert {m.path for m in report.modules} == {p for p in da if p in db} == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert set(report.only_a) == {p for p in da if "v_proj" in p}
    assert set(report.only_b) == {p for p in db if "k_proj" in p}
    for m in report.modules:
        Wa, Wb = da[m.path][0], db[m.path][0]
        assert m.cosine == pytest.approx(((Wa * Wb).sum() / (Wa.norm() * Wb.norm())).item(), abs=1e-6)
        (Ua, _, Vha), (Ub, _, Vhb) = torch.linalg.svd(Wa), torch.linalg.svd(Wb)
        assert m.left_overlap == pytest.approx((Ua[:, :2].T @ Ub[:, :2]).square().sum().item() / 2, abs=1e-5)
        assert m.right_overlap == pytest.approx((Vha[:2] @ Vhb[:2].T).square().sum().item() / 2, abs=1e-5)
    same = diff_factors(_read_factors(tmp_path / "a"), _read_factors(tmp_path / "a"), k=3)
    assert all(m.cosine == pytest.approx(1.0) and m.left_overlap == pytest.approx(1.0) and
               m.right_overlap == pytest.approx(1.0) for m in same.modules)


def test_inspect_cli_json(tmp_path, base_dir, capsys):
    save_adapter(_trained(), tmp_path / "a")
    code = main(["inspect", str(tmp_path / "a"), "--base", str(base_dir), "--report", str(tmp_path / "rep"),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # exactly one JSON object
    assert result["module_count"] == 4 and result["findings"] == [] and result["probe"]["merge_gap"] < 1e-5
    assert (tmp_path / "rep" / "index.html").is_file()
    assert "model.layers.0.self_attn.q_proj" in captured.err and "doctor: no problems found" in captured.err


def test_diff_cli_json(tmp_path, capsys):
    save_adapter(_trained(seed=1), tmp_path / "a")
    save_adapter(_trained(seed=1, alpha=16), tmp_path / "b")  # the same update, twice the scale
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--k", "2", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["common"] == 4 and result["k"] == 2 and result["only_a"] == result["only_b"] == []
    assert result["mean_cosine"] == pytest.approx(1.0)
    assert all(m["norm_b"] == pytest.approx(2 * m["norm_a"]) for m in result["modules"])
    assert "cosine" in captured.err


@pytest.mark.parametrize("argv, match", [
    (["inspect", "{tmp}/missing"], "no such adapter directory"),
    (["inspect", "{tmp}/empty"], "adapter_config.json is missing; an adapter directory holds"),
    (["diff", "{tmp}/empty", "{tmp}/missing"], "adapter_config.json is missing"),
    (["inspect", "{tmp}/a", "--base", "{tmp}/empty"], "no config.json"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    save_adapter(_trained(), tmp_path / "a")
    assert main([a.format(tmp=tmp_path) for a in argv] + ["--json"]) == 2
    captured = capsys.readouterr()
    assert re.search(match, json.loads(captured.out)["error"]) and "error:" in captured.err


def test_cli_doctor_end_to_end_with_the_runs_hyperparameters(tmp_path, capsys):
    run = tmp_path / "run"
    model = add_lora(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))  # B = 0: untrained
    save_adapter(model, run / "adapter")
    job = {"r": 8, "lora_alpha": 16, "lr": 0.05, "epochs": 3, "warmup_ratio": 0.06, "lora_dropout": 0.0}
    (run / "run.json").write_text(json.dumps({"job": job, "train_examples": 200,
                                              "accuracy_after": 0.5, "accuracy_head_only": 0.7}))
    assert main(["doctor", str(run / "adapter"), "--json"]) == 0
    captured = capsys.readouterr()
    codes = [f["code"] for f in json.loads(captured.out)["findings"]]
    assert codes[0] == "untrained" and "lr_high" in codes and "lora_below_head_only" in codes
    assert "lr=0.05" in captured.err and "modules" not in captured.err.splitlines()[1]  # findings, no table
