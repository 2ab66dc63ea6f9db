"""save_adapter / load_adapter: round trips, the PEFT file layout, strictness, rollback, corrupt files,
pickle refusal, base fingerprint, many adapters from files."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_gpt2, tiny_llama
from loralab import (LoraConfig, add_lora, delete_adapter, disable_lora, list_adapters, load_adapter, merge,
                     save_adapter, set_adapter)
from loralab import adapter_file as files
from loralab.config import config_from_peft
from loralab.inject import find_targets, lora_layers
from loralab.layer import LoRAAdapter, LoRALinear


def _adapted(build=tiny_llama, name="default", seed=0, **cfg):
    """A tiny model with a non-trivial adapter (random A and B, so it changes the outputs)."""
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    model = build(seed)
    torch.manual_seed(seed + 100)
    add_lora(model, LoraConfig(r=cfg.pop("r", 4), lora_alpha=cfg.pop("lora_alpha", 8), init_lora_weights=False,
                               **cfg), name)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _snapshot(model):
    """Everything a load may change: tensors (by value), module types, trainable flags."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    state, types, flags = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _rewrite(directory, tensors=None, config=None, metadata=None):
    """Replace the weights and/or config of a saved adapter (keeping the rest)."""
    directory = Path(directory)
    if tensors is not None:
        with safe_open(directory / files.WEIGHTS_NAME, "pt") as f:
            meta = f.metadata() if metadata is None else metadata
        save_file(tensors, directory / files.WEIGHTS_NAME, metadata=meta)
    if config is not None:
        (directory / files.CONFIG_NAME).write_text(json.dumps(config))


def _read(directory):
    with safe_open(Path(directory) / files.WEIGHTS_NAME, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _config(directory):
    return json.loads((Path(directory) / files.CONFIG_NAME).read_text())


# ---- round trips ----------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "llama-qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-patterns-rslora": (tiny_llama, dict(
        target_modules="all-linear", use_rslora=True, rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"o_proj": 3})),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "llama-one-layer": (tiny_llama, dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_round_trip_restores_outputs_and_tensors_exactly(case, tmp_path, ids):
    build, cfg = ROUND_TRIPS[case]
    model = _adapted(build, **cfg)
    save_adapter(model, tmp_path)
    fresh = build(0)
    report = load_adapter(fresh, tmp_path)
    assert report.modules == len(lora_layers(model)) and report.fingerprint == "matched"
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    with disable_lora(model):
        assert not torch.allclose(_logits(model, ids), _logits(fresh, ids), atol=1e-3)  # the adapter matters
    for path, layer in lora_layers(model).items():
        a, b = layer.adapters["default"], lora_layers(fresh)[path].adapters["default"]
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B) and a.scaling == b.scaling


def test_file_uses_peft_keys_shapes_and_config_fields(tmp_path):
    model = _adapted(target_modules=["embed_tokens", "q_proj"], rank_pattern={"q_proj": 2})
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.CONFIG_NAME, files.WEIGHTS_NAME]
    tensors, meta = _read(tmp_path)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 101)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert len(tensors) == 2 * (1 + 2)
    assert meta["format"] == "pt" and set(json.loads(meta[files.FINGERPRINT_KEY])) == set(lora_layers(model))
    cfg = _config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8  # r: the most common rank
    assert cfg["target_modules"] == ["embed_tokens", "q_proj"]
    assert cfg["rank_pattern"] == {r"model\.embed_tokens": 4} and cfg["alpha_pattern"] == {}
    for field in ("lora_dropout", "use_rslora", "fan_in_fan_out", "alpha_pattern", "base_model_name_or_path",
                  "task_type", "bias", "modules_to_save", "init_lora_weights", "layers_to_transform",
                  "layers_pattern", "exclude_modules", "use_dora"):
        assert field in cfg


@pytest.mark.parametrize("targets", [
    ["q_proj"], ["q_proj", "down_proj"], "all-linear",
    r"model\.layers\.0\.self_attn\.(q|k)_proj", r"model\.layers\.1\.mlp\.up_proj",
])
def test_saved_target_modules_select_exactly_the_adapted_layers(targets, tmp_path):
    model = _adapted(target_modules=targets)
    save_adapter(model, tmp_path)
    config, _ = config_from_peft(_config(tmp_path))
    assert find_targets(tiny_llama(), config) == list(lora_layers(model))


def test_mixed_rslora_and_alpha_become_per_module_alpha(tmp_path, ids):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), "a")
    layer = lora_layers(model)["model.layers.1.self_attn.q_proj"]
    adapter = layer.adapters["a"]
    adapter.use_rslora, adapter.scaling = True, 8 / 2  # as if this one layer were rsLoRA
    save_adapter(model, tmp_path, "a")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert lora_layers(fresh)["model.layers.1.self_attn.q_proj"].adapters["default"].scaling == 4.0
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_modules_to_save_and_biases_travel_with_the_adapter(tmp_path, ids):
    model = _adapted(tiny_gpt2, target_modules=["c_attn"])
    with torch.no_grad():  # "trained" head and biases
        model.transformer.ln_f.weight.add_(0.5)
        model.transformer.h[0].attn.c_attn.base_layer.bias.add_(0.25)
    save_adapter(model, tmp_path, modules_to_save=["ln_f"], bias="lora_only")
    tensors, _ = _read(tmp_path)
    assert "base_model.model.transformer.ln_f.weight" in tensors
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in tensors
    assert _config(tmp_path)["modules_to_save"] == ["ln_f"] and _config(tmp_path)["bias"] == "lora_only"
    fresh = tiny_gpt2()
    report = load_adapter(fresh, tmp_path, trainable=True)
    assert report.extra_tensors == 4  # ln_f weight and bias, the c_attn bias of both blocks
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    assert fresh.transformer.ln_f.weight.requires_grad
    # a module to save is loaded into a copy of its own: the base's ln_f is untouched
    assert torch.equal(fresh.transformer.ln_f.original_module.weight, tiny_gpt2().transformer.ln_f.weight)
    load_adapter(fresh, tmp_path, "second")
    assert list(fresh.transformer.ln_f.modules_to_save) == ["default", "second"]


def test_atomic_save_keeps_the_previous_adapter_when_writing_fails(tmp_path, monkeypatch, ids):
    good = _adapted(seed=0)
    save_adapter(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_adapted(seed=1, r=2), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either
    monkeypatch.undo()
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), _logits(good, ids))


def test_save_refuses_unknown_merged_or_nonfinite_adapters(tmp_path):
    model = _adapted()
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        save_adapter(model, tmp_path, "nope")
    with pytest.raises(ValueError, match="matches no module"):
        save_adapter(model, tmp_path, modules_to_save=["classifier"])
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(model, tmp_path)
    model = _adapted()
    with torch.no_grad():
        lora_layers(model)["model.layers.0.self_attn.v_proj"].adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="v_proj: lora_B.weight holds NaN"):
        save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


# ---- strictness: errors name the keys, and the model is left as it was ----------------------------------
def _saved(tmp_path):
    save_adapter(_adapted(), tmp_path)
    return _read(tmp_path)


def test_missing_tensors_are_listed(tmp_path):
    tensors, _ = _saved(tmp_path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    _rewrite(tmp_path, tensors)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)missing.*: 1.*model\.layers\.1\.self_attn\.v_proj: no lora_B") as e:
        load_adapter(model, tmp_path)
    assert "was not changed" in str(e.value)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("key, why", [
    ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", "not targeted"),
    ("base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", "no such module"),
    ("base_model.model.model.norm.weight", "neither a LoRA factor"),
    ("base_model.model.something_else", "no such tensor"),
])
def test_unexpected_tensors_are_listed(key, why, tmp_path):
    tensors, _ = _saved(tmp_path)
    tensors[key] = torch.zeros(4, 32)
    _rewrite(tmp_path, tensors)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"(?s)unexpected.*{key.replace('.', '[.]')}: {why}"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_mis_shaped_tensors_are_listed_with_expected_shape(tmp_path):
    _saved(tmp_path)
    cfg = _config(tmp_path)
    _rewrite(tmp_path, config={**cfg, "r": 8})
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: file \(4, 32\), expected \(8, 32\) \(r=8") as e:
        load_adapter(model, tmp_path)
    assert "strict=False" not in str(e.value)  # shape errors cannot be skipped
    _assert_unchanged(model, snap)


def test_linear_factor_names_on_an_embedding_are_refused(tmp_path):
    model = _adapted(target_modules=["embed_tokens"])
    save_adapter(model, tmp_path)
    tensors, _ = _read(tmp_path)
    tensors = {k.replace("lora_embedding_A", "lora_A.weight"): v for k, v in tensors.items()}
    _rewrite(tmp_path, tensors)
    with pytest.raises(ValueError, match="takes lora_embedding_A"):
        load_adapter(tiny_llama(), tmp_path)


def test_non_strict_skips_missing_and_unexpected_with_warnings(tmp_path, ids):
    tensors, _ = _saved(tmp_path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    tensors["base_model.model.extra.weight"] = torch.zeros(1)
    _rewrite(tmp_path, tensors)
    model = tiny_llama()
    with pytest.warns(UserWarning, match="skipping") as record:
        report = load_adapter(model, tmp_path, strict=False)
    assert len(record) == 2 and report.modules == 3
    assert torch.count_nonzero(lora_layers(model)["model.layers.1.self_attn.v_proj"].adapters["default"].lora_B) == 0


def test_failure_while_injecting_rolls_back_everything(tmp_path):
    save_adapter(_adapted(target_modules=["q_proj", "v_proj", "o_proj"]), tmp_path)
    model = _adapted(seed=0, name="first")  # already holds an adapter on q_proj and v_proj
    attn = model.model.layers[1].self_attn

    class Refuses(type(attn)):  # a block that cannot take a new o_proj (after layer 0 was injected)
        def __setattr__(self, name, value):
            if name == "o_proj" and isinstance(value, LoRALinear):
                raise RuntimeError("out of memory")
            super().__setattr__(name, value)

    attn.__class__ = Refuses
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_adapter(model, tmp_path, "second")
    _assert_unchanged(model, snap)
    assert list_adapters(model) == ["first"]
    assert all(layer.active == ("first",) for layer in lora_layers(model).values())


def test_failure_while_writing_extra_tensors_restores_them(tmp_path):
    model = _adapted(tiny_gpt2, target_modules=["c_attn"], bias="all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5)
    save_adapter(model, tmp_path)
    fresh = tiny_gpt2()
    # the last bias written cannot be written (an expanded tensor: one element in memory for all)
    fresh.transformer.ln_f.bias = torch.nn.Parameter(torch.zeros(1).expand(32), requires_grad=False)
    snap = _snapshot(fresh)
    with pytest.raises(RuntimeError, match="single memory location"):
        load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, snap)


def test_existing_adapter_name_is_refused_before_reading(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="without dots"):
        load_adapter(model, tmp_path, "a.b")
    _assert_unchanged(model, snap)


# ---- files that are broken, unsafe or unsupported -------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors_name_the_file(damage, tmp_path):
    _saved(tmp_path)
    path = tmp_path / files.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "header": b"\xff" * 8 + data[8:], "empty": b""}[damage])
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{path.name}: cannot be read as safetensors .*truncated or corrupt"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "holds NaN/Inf"), (float("inf"), "holds NaN/Inf"), ("int", "dtype torch.int64"),
])
def test_bad_values_name_the_tensor(value, message, tmp_path):
    tensors, _ = _saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    if value == "int":
        tensors[key] = tensors[key].long()
    else:
        tensors[key][3, 1] = value
    _rewrite(tmp_path, tensors)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}: {message}"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_bad_config_json_names_the_file(tmp_path):
    _saved(tmp_path)
    (tmp_path / files.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / files.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


class _Exploit:
    """Unpickling this runs code (it would create a file); weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_files_are_refused_unless_opted_in_and_then_tensors_only(tmp_path, ids):
    model = _adapted()
    save_adapter(model, tmp_path)
    tensors, _ = _read(tmp_path)
    (tmp_path / files.WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: refusing to read a pickle file.*arbitrary code"
                                         r".*allow_pickle=True"):
        load_adapter(tiny_llama(), tmp_path)
    fresh = tiny_llama()
    report = load_adapter(fresh, tmp_path, allow_pickle=True)
    assert report.fingerprint == "absent" and torch.equal(_logits(fresh, ids), _logits(model, ids))

    marker = tmp_path / "pwned"
    with open(tmp_path / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused"):
        load_adapter(tiny_llama(), tmp_path, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 1]]), ("init_lora_weights", "corda"),
    ("init_lora_weights", "pissa_niter_4"), ("peft_type", "IA3"), ("target_parameters", ["experts.w"]),
])
def test_fields_that_change_the_math_are_refused(field, value, tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, config={**_config(tmp_path), field: value})
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=field):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_unknown_harmless_fields_warn(tmp_path):
    _saved(tmp_path)
    _rewrite(tmp_path, config={**_config(tmp_path), "future_flag": 1, "peft_version": "9.9", "task_type": "CAUSAL_LM"})
    with pytest.warns(UserWarning, match="'future_flag' is unknown") as record:
        load_adapter(tiny_llama(), tmp_path)
    assert len(record) == 1


# ---- fingerprint ----------------------------------------------------------------------------------------
def test_fingerprint_mismatch_counts_modules_and_can_be_overridden(tmp_path, ids):
    save_adapter(_adapted(seed=0), tmp_path)
    other = tiny_llama(seed=1)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"differs .* in 4 of 4 adapted modules .*check_fingerprint=False"):
        load_adapter(other, tmp_path)
    _assert_unchanged(other, snap)
    assert load_adapter(other, tmp_path, check_fingerprint=False).fingerprint == "skipped"


def test_fingerprint_catches_one_changed_module_and_tolerates_half_precision(tmp_path):
    save_adapter(_adapted(), tmp_path)
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[1].self_attn.v_proj.weight.mul_(1.05)  # e.g. a fine-tuned variant of the base
    with pytest.raises(ValueError, match=r"in 1 of 4 .*model\.layers\.1\.self_attn\.v_proj: weights differ"):
        load_adapter(changed, tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        assert load_adapter(tiny_llama().to(dtype), tmp_path).fingerprint == "matched"


def test_fingerprint_reports_shape_differences(tmp_path):
    save_adapter(_adapted(target_modules=["embed_tokens"]), tmp_path)
    bigger = tiny_llama(vocab_size=103)
    with pytest.raises(ValueError, match=r"embed_tokens\.lora_embedding_A: file \(4, 101\), expected \(4, 103\)"):
        load_adapter(bigger, tmp_path)


def test_half_precision_base_gets_float32_adapters_with_same_outputs(tmp_path, ids):
    model = _adapted()
    save_adapter(model, tmp_path)
    fresh = tiny_llama().to(torch.bfloat16)
    load_adapter(fresh, tmp_path)
    adapter = lora_layers(fresh)["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert adapter.lora_A.dtype == torch.float32 and not adapter.lora_A.requires_grad
    assert torch.equal(adapter.lora_B, lora_layers(model)["model.layers.0.self_attn.q_proj"].adapters["default"].lora_B)


def test_adapter_from_factors_uses_the_tensors_as_they_are():
    A, B = torch.randn(3, 12), torch.randn(9, 3)
    wrapped = LoRAAdapter.from_factors(A, B, 6.0, lora_dropout=0.1, use_rslora=True, requires_grad=False)
    assert wrapped.lora_A.data_ptr() == A.data_ptr() and not wrapped.lora_B.requires_grad  # no copy
    assert (wrapped.r, wrapped.scaling, wrapped.lora_dropout) == (3, 6.0 / 3 ** 0.5, 0.1)


# ---- many adapters from files ---------------------------------------------------------------------------
def test_several_adapters_load_switch_delete_and_save_separately(tmp_path, ids):
    a = _adapted(seed=0, name="a", target_modules=["q_proj", "v_proj"])
    b = _adapted(seed=0, name="b", r=2, target_modules=["v_proj", "down_proj"])
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(b).values():
            layer.adapters["b"].lora_A.normal_()
    save_adapter(a, tmp_path / "a", "a")
    save_adapter(b, tmp_path / "b", "b")
    base_out = _logits(tiny_llama(), ids)

    model = tiny_llama()
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    assert list_adapters(model) == ["a", "b"]
    set_adapter(model, "a")
    assert torch.equal(_logits(model, ids), _logits(a, ids))
    set_adapter(model, "b")
    assert torch.equal(_logits(model, ids), _logits(b, ids))
    with disable_lora(model):
        assert torch.equal(_logits(model, ids), base_out)

    save_adapter(model, tmp_path / "b2", "b")  # only b's tensors, from a model holding both
    tensors, _ = _read(tmp_path / "b2")
    assert len(tensors) == 2 * 4 and all("down_proj" in k or "v_proj" in k for k in tensors)
    delete_adapter(model, "a")
    assert list_adapters(model) == ["b"] and torch.equal(_logits(model, ids), _logits(b, ids))
    again = tiny_llama()
    load_adapter(again, tmp_path / "b2", "x")
    assert torch.equal(_logits(again, ids), _logits(b, ids))


def test_config_from_another_save_is_refused_even_when_shapes_fit(tmp_path):
    import json as _json
    from conftest import tiny_llama
    from loralab import LoraConfig, add_lora, load_adapter, save_adapter
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = _json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = 16  # as if a later save's config landed next to these weights
    cfg_path.write_text(_json.dumps(cfg))
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="different saves"):
        load_adapter(fresh, tmp_path / "ad")
    assert not any("adapters" in k for k in fresh.state_dict())


def test_what_add_lora_trains_is_saved_without_being_repeated(tmp_path, ids):
    model = add_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"], bias="all",
                                             init_lora_weights=False))
    with torch.no_grad():
        model.transformer.ln_f.modules_to_save["default"].weight.add_(0.5)
        model.transformer.h[1].mlp.c_fc.bias.add_(0.25)
    save_adapter(model, tmp_path)
    tensors, _ = _read(tmp_path)
    assert _config(tmp_path)["modules_to_save"] == ["ln_f"] and _config(tmp_path)["bias"] == "all"
    assert "base_model.model.transformer.ln_f.weight" in tensors
    assert "base_model.model.transformer.h.1.mlp.c_fc.bias" in tensors
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in tensors
    fresh = tiny_gpt2()
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
