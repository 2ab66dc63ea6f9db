"""loralab.trainer: config validation, the schedule, what trains, accumulation, checkpointing, NaN stops."""

import math

import pytest
import torch
from torch import nn

from loralab import LoraConfig, add_lora
from loralab.inject import lora_layers
from loralab.trainer import TrainConfig, enable_gradient_checkpointing, evaluate, lr_at, make_optimizer, train


def tiny_bert_classifier(seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=101, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return model


def tiny_llama_lora(seed=0, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                         max_position_embeddings=64))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    return model


def classify_data(n=48, seed=0):
    """Class c draws its tokens from ids 10 + 30c ... 39 + 30c; lengths vary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = [1] + torch.randint(10 + 30 * (i % 3), 40 + 30 * (i % 3), (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": i % 3})
    return out


def causal_data(n=16, seed=0):
    """Variable-length sequences with a prompt part that carries no loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 100, (int(torch.randint(4, 14, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("field, value, fragment", [
    ("task", "regression", "task='regression' is not supported; choose one of"),
    ("lr", 0, "lr must be a positive number, got 0"),
    ("lr", float("nan"), "lr must be a positive number"),
    ("epochs", 0, "epochs must be a positive integer, got 0"),
    ("batch_size", 2.5, "batch_size must be a positive integer"),
    ("grad_accum", True, "grad_accum must be a positive integer"),
    ("warmup_ratio", 0.9, r"warmup_ratio must be in \[0, 0.5\], got 0.9"),
    ("weight_decay", -0.1, "weight_decay must be in"),
    ("schedule", "step", "schedule='step' is not supported; choose one of"),
    ("max_grad_norm", 0, "max_grad_norm must be a positive number or None"),
    ("loraplus_lr_ratio", -1, "loraplus_lr_ratio must be a positive number"),
    ("save_every", 10, "save_every / resume need out_dir"),
])
def test_config_errors_name_field_value_and_fix(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**{field: value})


def test_config_is_frozen_with_documented_defaults():
    config = TrainConfig()
    assert (config.lr, config.weight_decay) == (2e-4, 0.01)
    assert 0.05 <= config.warmup_ratio <= 0.1
    with pytest.raises(AttributeError):
        config.lr = 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_warms_up_then_decays(schedule):
    config = TrainConfig(lr=1e-3, warmup_ratio=0.1, schedule=schedule)
    lrs = [lr_at(s, 100, config) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)        # 10 warmup steps
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.02e-3
    if schedule == "cosine":
        assert lrs[10 + 45] == pytest.approx(0.5e-3, rel=0.05)                     # half way down


def test_optimizer_holds_only_trainable_params_with_decay_groups_and_loraplus():
    model = tiny_bert_classifier()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, TrainConfig(lr=1e-3, loraplus_lr_ratio=16))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in params.values()}
    for group in opt.param_groups:
        names = [n for n, p in params.items() if any(p is q for q in group["params"])]
        is_b = all(n.endswith("lora_B") for n in names)
        assert group["lr"] == pytest.approx(1e-3 * (16 if is_b else 1))
        assert group["weight_decay"] == (0.01 if group["params"][0].dim() >= 2 else 0.0)


def test_training_learns_and_touches_only_adapters_and_head():
    model = tiny_bert_classifier()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = classify_data()
    before = evaluate(model, data)
    history = train(model, data, data, TrainConfig(epochs=10, batch_size=8, lr=3e-2, progress=False))
    assert history.evals[-1]["loss"] < 0.6 * before["loss"]
    assert history.evals[-1]["accuracy"] > 0.6
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert all(layer.adapters["default"].lora_B.abs().max() > 0 for layer in lora_layers(model).values())
    assert len(history.steps) == history.total_steps == 10 * 6
    assert {"step", "loss", "lr", "grad_norm", "examples_per_s"} <= set(history.steps[0])


def test_matches_a_hand_written_adamw_loop():
    """The reference: transformers' own (mean) causal-LM loss, torch AdamW, clip, the same batches and lr."""
    data = causal_data()
    config = TrainConfig(task="causal-lm", epochs=2, batch_size=4, lr=1e-2, progress=False)
    model = tiny_llama_lora()
    train(model, data, None, config)

    ref = tiny_llama_lora()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}])
    from loralab.dataset import TokenizedData
    batches = TokenizedData(data)
    ref.train()
    for step in range(8):
        epoch, position = divmod(step, 4)
        order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))[position * 4:(position + 1) * 4]
        batch = batches.collate(order.tolist())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 8, config)
        ref(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad()
    for name, p in params.items():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, rtol=1e-4, atol=1e-6)


def test_same_seed_same_result_including_dropout():
    results = []
    for _ in range(2):
        model = tiny_llama_lora(dropout=0.1)
        train(model, causal_data(), None, TrainConfig(task="causal-lm", epochs=2, batch_size=4, lr=1e-2,
                                                      progress=False, seed=7))
        results.append(trainable_state(model))
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_gradient_accumulation_equals_one_big_batch():
    """Variable-length causal sequences: the loss is normalised by the global token count, so 2 × 4 with
    accumulation gives the gradient of 8 at once (a per-micro-batch mean would not)."""
    data, states = causal_data(), []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_llama_lora()
        train(model, data, None, TrainConfig(task="causal-lm", epochs=2, batch_size=batch_size, grad_accum=accum,
                                             lr=1e-2, progress=False))
        states.append(trainable_state(model))
    for other in states[1:]:
        for name in states[0]:
            torch.testing.assert_close(other[name], states[0][name], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_still_trains_adapters():
    data = causal_data(8)
    plain, ckpt = tiny_llama_lora(), tiny_llama_lora()
    config = TrainConfig(task="causal-lm", epochs=1, batch_size=8, lr=1e-2, progress=False)
    train(plain, data, None, config)
    calls = []
    for layer in ckpt.model.layers:  # count forwards of an adapted layer: twice per step when recomputed
        layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    train(ckpt, data, None, TrainConfig(**{**config.__dict__, "gradient_checkpointing": True}))
    assert ckpt.model.gradient_checkpointing
    assert len(calls) == 2 * len(ckpt.model.layers)  # forward + recompute in backward
    a, b = trainable_state(plain), trainable_state(ckpt)
    moved = [n for n in b if not torch.equal(b[n], trainable_state(tiny_llama_lora())[n])]
    assert any(n.endswith("lora_A") for n in moved) and any(n.endswith("lora_B") for n in moved)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gradients_reach_A_and_B():
    model = tiny_llama_lora()
    enable_gradient_checkpointing(model)
    model.train()
    with torch.no_grad():  # non-zero B so that A receives a gradient too
        for layer in lora_layers(model).values():
            layer.adapters["default"].lora_B.normal_(std=0.1)
    ids = torch.randint(0, 101, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    for path, layer in lora_layers(model).items():
        adapter = layer.adapters["default"]
        assert adapter.lora_A.grad is not None and adapter.lora_A.grad.abs().sum() > 0, path
        assert adapter.lora_B.grad is not None and adapter.lora_B.grad.abs().sum() > 0, path


def test_checkpointing_needs_a_transformers_model():
    model = nn.Sequential(nn.Linear(4, 4))
    add_lora(model, LoraConfig(r=2, target_modules=["0"]))
    data = [{"x": torch.randn(4), "labels": i % 4} for i in range(8)]
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a transformers model"):
        train(model, data, None, TrainConfig(gradient_checkpointing=True, progress=False))


def test_any_module_trains():
    """Not a transformers model: forward(x) -> logits; the batch keys are its keyword arguments."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    net = Net()
    add_lora(net, LoraConfig(r=4, lora_alpha=8, target_modules=["body"], modules_to_save=["head"]))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(64, 8, generator=g)
    data = [{"x": x, "labels": int(x[0] * x[1] > 0)} for x in xs]
    history = train(net, data, data, TrainConfig(epochs=20, batch_size=16, lr=3e-2, progress=False))
    assert history.evals[-1]["accuracy"] > 0.8


def test_bf16_autocast_trains_evaluates_and_keeps_adapters_fp32():
    model = tiny_bert_classifier()
    history = train(model, classify_data(), classify_data(), TrainConfig(epochs=2, batch_size=8, lr=1e-2, bf16=True,
                                                                         progress=False))
    assert all(math.isfinite(s["loss"]) for s in history.steps)
    assert math.isfinite(history.evals[-1]["loss"])  # evaluation runs without autograd, under bf16 autocast
    assert all(layer.adapters["default"].lora_A.dtype == torch.float32 for layer in lora_layers(model).values())


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_bert_classifier()
    calls = []

    def poison(module, args, output):  # from the 5th forward on, the classifier emits NaN
        calls.append(1)
        return output * float("nan") if len(calls) >= 5 else output

    model.classifier.register_forward_hook(poison)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, save_every=2, out_dir=str(tmp_path), progress=False)
    with pytest.raises(RuntimeError, match=r"loss became nan at step 5 .*training stopped before applying that "
                                           r"update.*step-000004.*lower lr"):
        train(model, classify_data(), None, config)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was not applied
    assert (tmp_path / "checkpoints" / "step-000004" / "trainable.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000004"


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; call add_lora"):
        train(model, [{"input": torch.zeros(3), "labels": 0}], None, TrainConfig(progress=False))


class _Recorder(nn.Module):
    """forward(x, index) -> logits (B, 2); remembers which examples each training forward saw."""
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 2)
        self.seen = []

    def forward(self, x, index):
        if self.training:
            self.seen.append(index.tolist())
        return self.head(torch.relu(self.body(x)))


def _recorder_and_data(n=16):
    torch.manual_seed(0)
    net = _Recorder()
    add_lora(net, LoraConfig(r=2, target_modules=["body"]))
    xs = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    return net, [{"x": x, "index": i, "labels": int(x[0] > 0)} for i, x in enumerate(xs)]


def _seen_per_epoch(seed=0, epochs=3, batch_size=4, grad_accum=1, **extra):
    net, data = _recorder_and_data()
    train(net, data, None, TrainConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                                       progress=False, **extra))
    flat = [i for batch in net.seen for i in batch]
    return [flat[e * len(data):(e + 1) * len(data)] for e in range(epochs)]


def test_each_epoch_visits_every_example_once_in_an_order_set_by_seed_and_epoch():
    epochs = _seen_per_epoch()
    assert all(sorted(order) == list(range(16)) for order in epochs)              # a permutation each epoch
    assert len({tuple(order) for order in epochs}) == 3                              # a new one each epoch
    assert epochs != [list(range(16))] * 3                                           # and shuffled
    assert _seen_per_epoch() == epochs                                               # the seed fixes them ...
    assert _seen_per_epoch(seed=5)[0] != epochs[0]                                   # ... and changes them
    assert _seen_per_epoch(batch_size=2, grad_accum=2) == epochs                     # not how a step is split
    assert _seen_per_epoch(lr=1e-2, schedule="constant") == epochs                   # nor the optimisation


def test_a_resumed_run_sees_the_examples_the_uninterrupted_run_saw(tmp_path):
    """Killed after step 6 of 12 (mid-epoch: 4 steps per epoch), resumed from its checkpoint."""
    config = TrainConfig(epochs=3, batch_size=4, save_every=3, keep_checkpoints=10, out_dir=str(tmp_path),
                         progress=False)
    full, data = _recorder_and_data()
    train(full, data, None, config)
    root = tmp_path / "checkpoints"
    for later in ("step-000009", "step-000012"):
        for f in (root / later).iterdir():
            f.unlink()
        (root / later).rmdir()
    (root / "latest").write_text("step-000006")
    resumed, _ = _recorder_and_data()
    history = train(resumed, data, None, TrainConfig(**{**config.__dict__, "resume": True}))
    assert history.resumed_from == 6 and len(full.seen) == 12
    assert resumed.seen == full.seen[6:]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_loss_is_the_global_batch_mean_however_the_step_is_split(device):
    """Each step takes the whole (variable-length) data set, so step 1's recorded loss must be transformers'
    own mean causal-LM loss of the untrained model over all 16 sequences, whether the step is one batch of 16
    or 4 or 8 accumulated micro-batches (a mean per micro-batch would differ), and on any device."""
    from loralab.dataset import TokenizedData
    data = causal_data()
    reference = tiny_llama_lora().to(device)
    batch = {k: v.to(device) for k, v in TokenizedData(data).collate(range(16)).items()}
    with torch.no_grad():
        expected = float(reference(**batch).loss)
    states, losses = [], []
    for batch_size, accum in ((16, 1), (4, 4), (2, 8)):
        model = tiny_llama_lora().to(device)
        history = train(model, data, None, TrainConfig(task="causal-lm", epochs=2, batch_size=batch_size,
                                                       grad_accum=accum, lr=1e-2, progress=False))
        losses.append([s["loss"] for s in history.steps])
        states.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.device.type == device for p in model.parameters())
    for record in losses:
        assert len(record) == 2 and record[0] == pytest.approx(expected, rel=1e-5)
        assert record[1] == pytest.approx(losses[0][1], rel=1e-5) and record[1] < record[0]
    for other in states[1:]:
        for name in states[0]:
            torch.testing.assert_close(other[name], states[0][name], rtol=1e-4, atol=1e-5)
