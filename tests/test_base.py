"""The frozen-base protocol: the dense implementation, and a toy int8 base that plugs in from outside."""

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from loralab import LoraConfig, add_lora, load_adapter, merge, save_adapter
from loralab.base import DenseBase, FrozenBase, frozen_base
from loralab.inject import lora_layers, set_module


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 with one scale per output row (a FrozenBase, written here)."""

    quant_type = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        W = linear.weight.detach()
        scale = W.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        self.register_buffer("q", torch.round(W / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dequantized = 0  # how many times a dense copy of the weight was made

    def dense_weight(self):
        self.dequantized += 1
        return self.q.float() * self.scale

    def set_dense_weight(self, W):
        raise ValueError("an int8 base cannot take W0 + ΔW without requantizing")

    def forward(self, x):
        return nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)

    @property
    def device(self):
        return self.q.device

    @property
    def dtype(self):
        return self.scale.dtype


def _int8_llama():
    model = tiny_llama()
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and "self_attn" in path:
            set_module(model, path, Int8Linear(m))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_dense_base_covers_linear_conv1d_and_embedding():
    from transformers.pytorch_utils import Conv1D
    for module, (i, o) in ((nn.Linear(5, 3), (5, 3)), (Conv1D(3, 5), (5, 3)), (nn.Embedding(5, 3), (5, 3))):
        base = frozen_base(module)
        assert isinstance(base, DenseBase) and isinstance(base, FrozenBase) and base.quant_type is None
        assert (base.in_features, base.out_features) == (i, o) and base.dense_weight().shape == (o, i)
        W = torch.randn(o, i)
        base.set_dense_weight(W)
        assert torch.equal(base.dense_weight(), W) and base.dtype == torch.float32
    with pytest.raises(TypeError, match="cannot put a LoRA adapter on Conv2d"):
        frozen_base(nn.Conv2d(3, 3, 1))
    assert frozen_base(Int8Linear(nn.Linear(4, 2))).quant_type == "int8"  # implements it itself


def test_a_quantized_base_plugs_in_without_being_dequantized_for_device_or_dtype(tmp_path, ids):
    model = _int8_llama()
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    bases = [l.base_layer for l in lora_layers(model).values()]
    assert all(isinstance(b, Int8Linear) for b in bases) and all(b.dequantized == 0 for b in bases)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 32)
    a = layer.adapters["default"]
    expected = x @ layer.base_layer.dense_weight().T + a.scaling * (x @ a.lora_A.T) @ a.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"quantized \(int8\) base: merging would requantize"):
        merge(model)
    assert all(not a.merged for l in lora_layers(model).values() for a in l.adapters.values())

    save_adapter(model, tmp_path / "q")          # trained on the int8 base ...
    dense = tiny_llama()                          # ... loads on its full-precision base, with a note
    with pytest.warns(UserWarning, match="another precision of this base"):
        report = load_adapter(dense, tmp_path / "q")
    assert report.fingerprint == "matched" and report.notes
    out_q, out_dense = _logits(model, ids), _logits(dense, ids)
    assert (out_q - out_dense).abs().max() < 0.05 * out_dense.abs().max()  # the int8 rounding, not more

    other = _int8_llama()                         # and the reverse, without dequantizing to learn the device
    load_adapter(other, tmp_path / "q", "again", check_fingerprint=False)
    assert all(l.base_layer.dequantized == 0 for l in lora_layers(other).values())
    torch.testing.assert_close(_logits(other, ids), out_q, atol=1e-5, rtol=0)
    unrelated = tiny_llama(seed=5)
    with pytest.raises(ValueError, match="base model differs"):
        load_adapter(unrelated, tmp_path / "q")
