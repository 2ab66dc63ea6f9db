"""loralab.checkpoint: atomic checkpoints, exact resume in process and after a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from loralab.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loralab.trainer import TrainConfig, make_optimizer, train
from test_train import causal_data, tiny_llama_lora, trainable_state
from test_train_cli import tiny_classifier_dir, write_travel_files


def test_resume_from_any_checkpoint_is_bit_exact(tmp_path):
    data = causal_data()
    config = TrainConfig(task="causal-lm", epochs=3, batch_size=4, lr=1e-2, save_every=3, keep_checkpoints=10,
                         out_dir=str(tmp_path), progress=False)
    full = tiny_llama_lora(dropout=0.1)  # dropout: the RNG state must be restored too
    history = train(full, data, None, config)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000003", "step-000006", "step-000009",
                                                           "step-000012"]
    for later in ("step-000009", "step-000012"):  # as if the run had died after step 6
        for f in (root / later).iterdir():
            f.unlink()
        (root / later).rmdir()
    (root / "latest").write_text("step-000006")
    resumed = tiny_llama_lora(dropout=0.1)
    with torch.no_grad():  # a different start: everything trainable must come from the checkpoint
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    resumed_history = train(resumed, data, None, TrainConfig(**{**config.__dict__, "resume": True}))
    assert resumed_history.resumed_from == 6
    a, b = trainable_state(full), trainable_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [s["loss"] for s in resumed_history.steps] == [s["loss"] for s in history.steps]


def test_checkpoint_contents_pruning_and_no_temporary_files(tmp_path):
    model = tiny_llama_lora()
    train(model, causal_data(), None, TrainConfig(task="causal-lm", epochs=2, batch_size=4, save_every=2,
                                                  out_dir=str(tmp_path), progress=False))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000006", "step-000008"]  # keep 2
    ckpt = latest_checkpoint(root)
    assert ckpt.name == "step-000008"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["world_size"] == 1 and len(state["history"]["steps"]) == 8
    tensors = load_file(ckpt / "optimizer.safetensors")
    assert tensors["rng.cpu.0"].dtype == torch.uint8
    assert any(k.endswith(".exp_avg_sq") for k in tensors)
    saved = load_file(ckpt / "trainable.safetensors")
    assert set(saved) == set(trainable_state(model)) and all(n.endswith(("lora_A", "lora_B")) for n in saved)


def test_loading_into_a_different_model_is_refused(tmp_path):
    model = tiny_llama_lora()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, TrainConfig())
    path = save_checkpoint(tmp_path, model, opt, {"step": 1}, [torch.get_rng_state()])
    other = tiny_llama_lora()
    next(p for p in other.parameters() if p.requires_grad).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameters differ from the model's"):
        load_checkpoint(path, other, make_optimizer({n: p for n, p in other.named_parameters() if p.requires_grad},
                                                TrainConfig()))
    with pytest.raises(ValueError, match="resume with the same number of processes"):
        load_checkpoint(path, model, opt, rank=1)


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    model = tiny_llama_lora()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        next(iter(params.values()))[0, 0] = float("inf")
    with pytest.raises(ValueError, match="refusing to checkpoint non-finite parameters"):
        save_checkpoint(tmp_path, model, make_optimizer(params, TrainConfig()), {"step": 1}, [torch.get_rng_state()])
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.glob(".*tmp"))


def _saved_after_one_step(tmp_path, **save_kwargs):
    """(model, checkpoint path) after one AdamW step, the model's parameters then moved off the checkpoint."""
    model = tiny_llama_lora()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, TrainConfig())
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    path = save_checkpoint(tmp_path, model, opt, {"step": 1}, [torch.get_rng_state()], **save_kwargs)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    return model, path


def _reshape_last_trainable(model):
    last = [p for p in model.parameters() if p.requires_grad][-1]
    last.data = torch.zeros(last.shape[0] + 1, *last.shape[1:])


@pytest.mark.parametrize("case, fragment", [
    ("rank", "resume with the same number of processes"),
    ("shape", "in the checkpoint but .* in the model; resume with the same r"),
    ("groups", "different parameter groups"),
    ("cuda", "written by a run with CUDA, but this process has none"),
])
def test_a_refused_checkpoint_restores_nothing(tmp_path, case, fragment):
    """Every check runs before the first copy: a mismatch leaves no half-restored model or optimizer."""
    fake_cuda = [torch.zeros(16, dtype=torch.uint8)]
    model, path = _saved_after_one_step(tmp_path, cuda_rng_states=fake_cuda if case == "cuda" else None)
    if case == "shape":  # only the last parameter differs: the earlier ones must not be copied either
        _reshape_last_trainable(model)
    before = trainable_state(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(params, TrainConfig(loraplus_lr_ratio=16 if case == "groups" else 1.0))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=fragment):
        load_checkpoint(path, model, opt, rank=1 if case == "rank" else 0)
    after = trainable_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not opt.state and torch.equal(torch.get_rng_state(), rng)


def test_each_rank_gets_its_own_cuda_rng_state_back(tmp_path, monkeypatch):
    """No GPU needed: torch.cuda's RNG functions are stood in for; rank r must get the state rank r saved."""
    from loralab import distributed as dd
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    assert [t.tolist() for t in dd.gather_cuda_rng_states()] == [[7] * 16]  # one process: its own state
    cpu = [torch.get_rng_state(), torch.get_rng_state()]
    cuda = [torch.full((16,), r, dtype=torch.uint8) for r in range(2)]
    model = tiny_llama_lora()
    opt = make_optimizer({n: p for n, p in model.named_parameters() if p.requires_grad}, TrainConfig())
    path = save_checkpoint(tmp_path, model, opt, {"step": 1}, cpu, cuda_rng_states=cuda)
    assert {k for k in load_file(path / "optimizer.safetensors") if k.startswith("rng.")} == {
        "rng.cpu.0", "rng.cpu.1", "rng.cuda.0", "rng.cuda.1"}
    load_checkpoint(path, model, opt, rank=1)
    assert len(restored) == 1 and torch.equal(restored[0], cuda[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dd.gather_cuda_rng_states() is None


def test_a_failed_latest_pointer_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    model, _ = _saved_after_one_step(tmp_path)
    opt = make_optimizer({n: p for n, p in model.named_parameters() if p.requires_grad}, TrainConfig())
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, opt, {"step": 2}, [torch.get_rng_state()])
    assert (tmp_path / "latest").read_text() == "step-000001"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _train_cmd(model_dir, data_dir, out):
    return [sys.executable, "-m", "loralab.cli", "train", "--model", str(model_dir), "--task", "classify",
            "--data", str(data_dir / "train.jsonl"), "--eval-data", str(data_dir / "eval.jsonl"),
            "--out", str(out), "--epochs", "30", "--batch-size", "4", "--lr", "1e-3", "--r", "4",
            "--lora-alpha", "8", "--target-modules", "query,value", "--save-every", "3",
            "--skip-head-only", "--no-progress", "--json"]


def test_sigkilled_run_resumes_to_the_same_adapter_bit_for_bit(tmp_path):
    model_dir, data_dir = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 24)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    reference = subprocess.run(_train_cmd(model_dir, data_dir, tmp_path / "ref"), capture_output=True, text=True,
                               env=env, timeout=300)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(model_dir, data_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    pointer, deadline = out / "checkpoints" / "latest", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and pointer.read_text() >= "step-000012":
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((latest_checkpoint(out / "checkpoints") / "state.json").read_text())["step"]
    assert 12 <= killed_at < 180 and not (out / "adapter").exists()

    resumed = subprocess.run(_train_cmd(model_dir, data_dir, out) + ["--resume"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] == killed_at and f"resuming from {out}" in resumed.stderr
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and any("classifier" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted run"
    assert result["accuracy_after"] == json.loads(reference.stdout)["accuracy_after"]
    # log.jsonl: the steps the resumed run repeated are logged once, with the uninterrupted run's losses
    from loralab.run_log import read_log
    ref_steps, steps = ([r for r in read_log(d / "log.jsonl") if r["kind"] == "step"] for d in (tmp_path / "ref", out))
    assert [r["step"] for r in steps] == list(range(1, 181))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref_steps]
