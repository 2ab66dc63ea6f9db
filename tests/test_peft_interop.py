"""Files travel both ways with the real `peft` package: an adapter saved by PEFT loads into loralab with
the same outputs, and one saved by loralab loads with PeftModel.from_pretrained with the same outputs."""

import warnings

import peft
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab import (LoraConfig, add_lora, combine_adapters, load_adapter, save_adapter, set_adapter)
from loralab.inject import lora_layers

ATOL = 1e-5  # float32 rounding of a different summation order; a wrong or missing adapter moves logits ~1e-1

CASES = {
    "llama-qv": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-patterns-rslora": (tiny_llama, dict(
        target_modules="all-linear", use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama-one-layer": (tiny_llama, dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1],
                                         layers_pattern="layers")),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.0\.mlp\.(gate|up)_proj")),
    "llama-embedding-head": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-embedding": (tiny_gpt2, dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True)),
    "gpt2-bias": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(model, bias: str, seed: int = 0, trained=()) -> None:
    """Stand-in for training: random factors, modules_to_save copies, (if trained) biases, and the
    parameters of the modules named in `trained`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            trained_bias = bias != "none" and name.endswith("base_layer.bias")
            if "lora_" in name or ".adapters." in name or "modules_to_save" in name or trained_bias \
                    or name.rpartition(".")[0] in trained:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(build, **cfg):
    model = peft.get_peft_model(build(), peft.LoraConfig(r=cfg.pop("r", 4), lora_alpha=cfg.pop("lora_alpha", 8),
                                                         **cfg))
    _perturb(model, cfg.get("bias", "none"))
    return model.eval()


def _peft_load(build, directory, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(), directory, **kwargs).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    assert not bad, bad
    return model


def _n_peft_layers(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_into_loralab_with_identical_outputs(case, tmp_path, ids):
    build, cfg = CASES[case]
    theirs = _peft_model(build, **cfg)
    theirs.save_pretrained(tmp_path)
    ours = build()
    base_out = _logits(ours, ids)
    report = load_adapter(ours, tmp_path)
    assert report.fingerprint == "absent"
    expected = _logits(theirs, ids)
    assert (expected - base_out).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    assert len(lora_layers(ours)) == _n_peft_layers(theirs)


@pytest.mark.parametrize("case", CASES)
def test_loralab_saved_adapter_loads_into_peft_with_identical_outputs(case, tmp_path, ids):
    build, cfg = CASES[case]
    cfg = dict(cfg)
    ours = add_lora(build(), LoraConfig(r=4, lora_alpha=8, **cfg))
    _perturb(ours, cfg.get("bias", "none"), trained=cfg.get("modules_to_save") or ())
    save_adapter(ours, tmp_path, modules_to_save=cfg.get("modules_to_save"), bias=cfg.get("bias", "none"))
    theirs = _peft_load(build, tmp_path)
    expected = _logits(ours, ids)
    assert (expected - _logits(build(), ids)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)
    assert _n_peft_layers(theirs) == len(lora_layers(ours))


def test_combined_adapter_with_mixed_ranks_loads_into_peft(tmp_path, ids):
    ours = tiny_llama()
    add_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    add_lora(ours, LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "o_proj"]), "b")
    _perturb(ours, "none")
    combine_adapters(ours, ["a", "b"], [0.5, 2.0], "cat", "ab")  # ranks 4, 6, 2 per module
    set_adapter(ours, "ab")
    save_adapter(ours, tmp_path, "ab")
    theirs = _peft_load(tiny_llama, tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=ATOL, rtol=0)


def test_peft_pissa_adapter_replays_the_base_residual(tmp_path, ids):
    theirs = _peft_model(tiny_llama, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa")
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), _logits(_peft_load(tiny_llama, tmp_path), ids), atol=ATOL, rtol=0)


def test_several_peft_adapters_load_by_name(tmp_path, ids):
    theirs = _peft_model(tiny_llama, target_modules=["q_proj"])
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]))
    _perturb(theirs, "none", seed=1)
    theirs.save_pretrained(tmp_path)  # "default" at the top, "other" in a subdirectory, as PEFT lays them out
    ours = tiny_llama()
    load_adapter(ours, tmp_path, "default")
    load_adapter(ours, tmp_path / "other", "other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        set_adapter(ours, name)
        torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_peft_pickle_adapter_needs_opt_in(tmp_path, ids):
    theirs = _peft_model(tiny_llama, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(ValueError, match="refusing to read a pickle file"):
        load_adapter(tiny_llama(), tmp_path)
    ours = tiny_llama()
    load_adapter(ours, tmp_path, allow_pickle=True)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def test_peft_dora_adapter_is_refused(tmp_path):
    theirs = _peft_model(tiny_llama, target_modules=["q_proj"], use_dora=True)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(tiny_llama(), tmp_path)


def _tiny_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()


def test_sequence_classification_head_travels_both_ways(tmp_path, ids):
    theirs = _peft_model(_tiny_classifier, task_type="SEQ_CLS", target_modules=["q_proj"])  # PEFT adds "score"
    theirs.save_pretrained(tmp_path / "peft")
    ours = _tiny_classifier()
    assert load_adapter(ours, tmp_path / "peft").extra_tensors == 1
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)

    ours = add_lora(_tiny_classifier(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"]))
    _perturb(ours, "none", trained=("score",))
    save_adapter(ours, tmp_path / "ours", modules_to_save=["score"], task_type="SEQ_CLS")
    torch.testing.assert_close(_logits(_peft_load(_tiny_classifier, tmp_path / "ours"), ids), _logits(ours, ids),
                               atol=ATOL, rtol=0)
    assert (_logits(ours, ids) - _logits(_tiny_classifier(), ids)).abs().max() > 1e-2


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_w0_is_saved_for_the_original_base(init, tmp_path, ids):
    """PiSSA / OLoRA train against a residual base; the file holds the rank-2r plain adapter relative to the
    original W0 (PEFT's conversion), so PEFT and loralab both reproduce the trained model on the original base."""
    ours = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                             init_lora_weights=init, use_rslora=(init == "olora")))
    _perturb(ours, "none")
    save_adapter(ours, tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    expected = _logits(ours, ids)
    torch.testing.assert_close(_logits(_peft_load(tiny_llama, tmp_path), ids), expected, atol=ATOL, rtol=0)
    again = tiny_llama()
    assert load_adapter(again, tmp_path).fingerprint == "matched"  # the fingerprint is of the original W0
    torch.testing.assert_close(_logits(again, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["olora", "orthogonal"])
def test_peft_files_with_init_only_or_replayed_inits_load(init, tmp_path, ids):
    theirs = _peft_model(tiny_llama, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    load_adapter(ours, tmp_path)  # olora: W0 becomes the same QR residual PEFT computes on load
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, ids), _logits(_peft_load(tiny_llama, tmp_path), ids), atol=ATOL, rtol=0)
