"""Data parallel: 2 CPU processes under torchrun (gloo), with DDP and with FSDP2, train exactly like
1 process with the same global batch, and only rank 0 writes files."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from loralab import LoraConfig, add_lora
    from loralab.trainer import TrainConfig, train
    from loralab import distributed as dd

    out, global_batch, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                         max_position_embeddings=64))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(24):  # variable lengths: the loss must be normalised by the global token count
        ids = torch.randint(5, 100, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    dd.setup()
    world = dd.world_size()
    if mode == "fsdp":  # FSDP2: shard every block and the root, adapters already in place
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    history = train(model, data, None, TrainConfig(task="causal-lm", epochs=2, batch_size=global_batch // world,
                                                   lr=1e-2, save_every=None if mode == "fsdp" else 3,
                                                   progress=False, out_dir=os.path.join(out, f"rank{dd.rank()}")))
    state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
             for n, p in model.named_parameters() if p.requires_grad}  # gathering shards is collective
    if dd.is_main():
        os.makedirs(out, exist_ok=True)
        state["losses"] = torch.tensor([s["loss"] for s in history.steps], dtype=torch.float64)
        save_file(state, os.path.join(out, f"result_{mode}{world}.safetensors"))
''')


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": ROOT}  # the script runs from a temporary directory: import this checkout's loralab
ENV.pop("WORLD_SIZE", None)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("single"), "single", 1)


def _run(tmp_path, mode: str, processes: int) -> dict:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / mode
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)])
    proc = subprocess.run(launcher + [str(script), str(out), "8", mode], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / f"result_{mode}{processes}.safetensors")


def _assert_same_training(one: dict, two: dict) -> None:
    assert set(one) == set(two) and len(one) > 1
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert any(n.endswith("lora_B") and one[n].abs().max() > 0 for n in one), "training did not move the adapters"


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, single):
    _assert_same_training(single, _run(tmp_path, "ddp", 2))
    # only rank 0 writes: rank 1 was given its own out_dir and left nothing there
    assert (tmp_path / "ddp" / "rank0" / "checkpoints" / "latest").read_text() == "step-000006"
    assert not (tmp_path / "ddp" / "rank1").exists()


def test_two_process_fsdp2_equals_one_process(tmp_path, single):
    """FSDP2 (fully_shard on each block and the root) over a model that already has its adapters."""
    _assert_same_training(single, _run(tmp_path, "fsdp", 2))
