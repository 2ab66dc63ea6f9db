"""Same numbers as PEFT: identical A, B and alpha give identical outputs (fp32, <= 1e-6)."""

import copy

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, merge
from loralab.inject import lora_layers

import peft  # a test dependency, installed by `make test`


def _peft_and_ours(build, targets, r=4, alpha=8, use_rslora=False, rank_pattern=None):
    base = build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, rank_pattern=rank_pattern or {}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = add_lora(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                     use_rslora=use_rslora, rank_pattern=rank_pattern or {}))
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            theirs_layer = peft_modules[path]
            assert theirs_layer.scaling["default"] == layer.adapters["default"].scaling
            layer.adapters["default"].lora_A.copy_(theirs_layer.lora_A["default"].weight)
            layer.adapters["default"].lora_B.copy_(theirs_layer.lora_B["default"].weight)
    assert len(lora_layers(ours)) == sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A"))
    return theirs.eval(), ours.eval()


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build, targets, kw", [
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
    (tiny_llama, ["q_proj", "v_proj"], {"use_rslora": True, "rank_pattern": {"v_proj": 2}}),
    (tiny_bert, ["query", "key", "value", "dense"], {}),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {}),
])
def test_outputs_match_peft(build, targets, kw, ids):
    theirs, ours = _peft_and_ours(build, targets, **kw)
    with torch.no_grad():
        a, b = _out(theirs, ids), _out(ours, ids)
        assert (a - b).abs().max().item() <= 1e-6
        assert (a - _out(build(), ids)).abs().max().item() > 1e-3  # the adapters really change the output
        theirs.merge_adapter()
        merge(ours)
        assert (_out(theirs, ids) - _out(ours, ids)).abs().max().item() <= 1e-6
