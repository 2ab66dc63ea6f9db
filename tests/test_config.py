import pytest

from loralab import LoraConfig


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=-3), "r"), (dict(r=2.5), "r"), (dict(r=True), "r"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_alpha=-1), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(init_lora_weights="corda"), "init_lora_weights"), (dict(init_lora_weights=2), "init_lora_weights"),
    (dict(bias="some"), "bias"),
    (dict(target_modules="q_proj("), "target_modules"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": -2}), "alpha_pattern"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)


def test_target_modules_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="target_modules"):
        LoraConfig(target_modules=42)


def test_is_frozen_and_normalised():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=3, modules_to_save="classifier")
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.layers_to_transform == (3,)
    assert cfg.modules_to_save == ("classifier",)
    with pytest.raises(Exception):
        cfg.r = 4


def test_rank_and_alpha_patterns_match_dotted_suffixes():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.up_proj": 2},
                     alpha_pattern={"v_proj": 3})
    assert cfg.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16)
    assert cfg.rank_and_alpha("model.layers.1.mlp.up_proj") == (2, 16)
    assert cfg.rank_and_alpha("model.layers.0.mlp.up_proj") == (8, 16)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.v_proj") == (8, 3)
    assert cfg.rank_and_alpha("model.layers.0.self_attn.xq_proj") == (8, 16)  # suffix must start at a dot


def test_to_dict_is_json_ready():
    import json
    cfg = LoraConfig(target_modules=["a", "b"])
    assert json.loads(json.dumps(cfg.to_dict()))["target_modules"] == ["a", "b"]
