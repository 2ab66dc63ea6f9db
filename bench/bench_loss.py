"""Causal-LM loss: full logits + F.cross_entropy vs the chunked linear cross-entropy (loralab/loss.py).

1. The loss alone, on the reference model's shapes: N = 8 x 127 target rows (batch 8 x 128, shifted by one),
   H = 512, V = 32000, fp32, frozen head (only the hidden states need a gradient).  Forward + backward of
   F.cross_entropy(h @ W.T) against linear_cross_entropy at several chunk sizes, timed round-robin (one call
   each per round) so drift on the shared machine hits all alike; the figures are the median over rounds of
   each variant's time divided by the full-logits time in the same round, and the ratio of the fastest
   rounds (the least disturbed ones when other work shares the cores).
   Peak extra memory: each variant in a fresh process; the kernel's peak resident set (VmHWM) is reset
   (/proc/self/clear_refs) once the inputs exist, and the figure is the peak after two forward + backward
   calls minus the resident set at the reset.  tracemalloc does not see torch's allocations (they bypass
   Python's allocator), so the process's resident memory is the honest measure.
2. A whole training step of the reference model with loralab's LoRA (r=16, alpha=32, dropout 0.05, all 7
   projections), the step train() runs: the loss sum from model(**inputs).logits (today's path) vs
   causal_lm_loss_sum (body + chunked loss), with PEFT's standard model(input_ids, labels).loss step as the
   peer; round-robin, the same two ratios.  Peak memory per variant in a fresh process (2 steps).
   Loss agreement at dropout 0 from identical adapters (loralab's init copied into PEFT).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _peak_rss_mb, batch, build, optimizer  # noqa: E402  (same reference model and batch)
from bench_train import step as peft_style_step  # noqa: E402

N, H, V = 8 * 127, 512, 32000
CHUNKS = (64, 128, None, 512, 1016)          # None: the default, loralab.loss.chunk_rows(V)


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.02,
            torch.randint(0, V, (N,), generator=g))


FULL, FULL_BF16 = "full logits + F.cross_entropy", "full logits + F.cross_entropy, bf16 autocast"
FULL_HALF = "full logits + F.cross_entropy, half the targets ignored"


def _half_ignored(t: torch.Tensor) -> torch.Tensor:
    """The first half of each sequence's targets ignored, as a prompt without loss would be."""
    t = t.view(8, 127).clone()
    t[:, :64] = -100
    return t.view(-1)


def _bf16(fn):
    def run(h, W, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(h, W, t)
    return run


def _loss_variants() -> dict:
    """{name: fn(h, W, t) -> loss}; the first is the fp32 reference, FULL_BF16 the bf16 one."""
    from loralab.loss import chunk_rows, linear_cross_entropy
    out = {FULL: lambda h, W, t: F.cross_entropy(h @ W.T, t, reduction="sum")}
    for chunk in CHUNKS:
        name = f"linear_cross_entropy, chunk {chunk or chunk_rows(V)}" + (" (default)" if chunk is None else "")
        out[name] = lambda h, W, t, c=chunk: linear_cross_entropy(h, W, t, chunk_size=c)
    out[FULL_HALF] = lambda h, W, t: F.cross_entropy(h @ W.T, _half_ignored(t), reduction="sum")
    out["linear_cross_entropy, half the targets ignored"] = (
        lambda h, W, t: linear_cross_entropy(h, W, _half_ignored(t)))
    out[FULL_BF16] = _bf16(lambda h, W, t: F.cross_entropy(F.linear(h, W).float(), t, reduction="sum"))
    out["linear_cross_entropy, bf16 autocast"] = _bf16(lambda h, W, t: linear_cross_entropy(h, W, t))
    return out


def _fwd_bwd(fn, h0, W, t) -> float:
    h = h0.clone().requires_grad_()
    loss = fn(h, W, t)
    loss.backward()
    return loss.item()


def time_loss(rounds: int = 12, warmup: int = 2) -> dict[str, list[float]]:
    """{variant: [seconds of forward + backward, one per round]}."""
    h, W, t = loss_inputs()
    variants = _loss_variants()
    times = {name: [] for name in variants}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            _fwd_bwd(fn, h, W, t)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _reference(name: str) -> str:
    return FULL_BF16 if "bf16" in name else FULL_HALF if "ignored" in name else FULL


def summary(times: list[float], ref: list[float]) -> tuple[float, float, float, float]:
    """(median s, fastest s, median of per-round ratios to ref, fastest / ref's fastest).  On a loaded
    machine the fastest round is the least disturbed one, so both views are reported."""
    return (statistics.median(times), min(times), statistics.median(a / b for a, b in zip(times, ref)),
            min(times) / min(ref))


def _reset_peak() -> float:
    """Reset VmHWM to the current resident set (Linux >= 4.0) and return that resident set in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _loss_memory_child(index: int) -> dict:
    torch.set_num_threads(2)
    h, W, t = loss_inputs()
    name, fn = list(_loss_variants().items())[index]
    rss = _reset_peak()
    losses = [_fwd_bwd(fn, h, W, t) for _ in range(2)]
    return {"name": name, "extra_mb": _peak_rss_mb() - rss, "loss": losses[-1]}


# ---- the whole training step ----------------------------------------------------------------------------

def _step(kind: str, model, opt, ids: torch.Tensor) -> float:
    """One optimizer step as train() takes it: Σ loss / number of targets, backward, AdamW."""
    if kind == "PEFT":
        return peft_style_step(model, opt, ids)
    from loralab.batch_loss import logits_loss_sum, target_count
    from loralab.loss import causal_lm_loss_sum
    inputs, labels = {"input_ids": ids}, ids
    if kind == "loralab, fused loss":
        loss, count = causal_lm_loss_sum(model, inputs, labels)
    else:
        loss, count = logits_loss_sum(model(**inputs).logits, labels, "causal-lm"), target_count(labels, "causal-lm")
    (loss / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item() / count


STEP_KINDS = ("loralab, logits path", "loralab, fused loss", "PEFT")


def time_steps(rounds: int = 10, warmup: int = 2) -> dict[str, list[float]]:
    from bench_inference import reference_model
    base = reference_model()
    models = {kind: build("PEFT" if kind == "PEFT" else "loralab", base) for kind in STEP_KINDS}
    opts = {kind: optimizer(m) for kind, m in models.items()}
    times = {kind: [] for kind in models}
    ids = batch()
    for i in range(warmup + rounds):
        for kind, model in models.items():
            start = time.perf_counter()
            _step(kind, model, opts[kind], ids)
            if i >= warmup:
                times[kind].append(time.perf_counter() - start)
    return times


def loss_agreement() -> dict[str, float]:
    """Dropout 0, identical adapters with nonzero B: the mean loss and LoRA gradients of both loralab paths,
    and PEFT's model(labels=...).loss."""
    from bench_inference import _nonzero_b, reference_model
    from bench_train import copy_into_peft
    from loralab.batch_loss import logits_loss_sum, target_count
    from loralab.loss import causal_lm_loss_sum
    base = reference_model()
    ours, theirs = build("loralab", base, dropout=0.0), build("PEFT", base, dropout=0.0)
    _nonzero_b(ours)
    copy_into_peft(ours, theirs)
    ids = batch(1)
    params = [p for p in ours.parameters() if p.requires_grad]
    fused, count = causal_lm_loss_sum(ours, {"input_ids": ids}, ids)
    fused_grads = torch.autograd.grad(fused / count, params)
    logits = logits_loss_sum(ours(input_ids=ids).logits, ids, "causal-lm") / target_count(ids, "causal-lm")
    logits_grads = torch.autograd.grad(logits, params)
    with torch.no_grad():
        peft_loss = theirs(input_ids=ids, labels=ids).loss.item()
    grad_gap = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(fused_grads, logits_grads))
    return {"fused": (fused / count).item(), "logits": logits.item(), "peft": peft_loss, "grad_rel_gap": grad_gap}


def profile_step(kind: str = "loralab, fused loss", steps: int = 2, top: int = 12) -> tuple[list, float]:
    """([(op, ms per step, share of the step's op time, calls per step)], total ms per step) by torch.profiler;
    matmuls are split into rank-16 LoRA products and the rest (frozen base, lm_head)."""
    from torch.profiler import ProfilerActivity, profile
    model = build("PEFT" if kind == "PEFT" else "loralab")
    opt, ids = optimizer(model), batch()
    for _ in range(2):
        _step(kind, model, opt, ids)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            _step(kind, model, opt, ids)
    ops: dict[str, list] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        name = e.key
        if name in ("aten::mm", "aten::addmm"):
            name += " (LoRA, rank 16)" if any(16 in shape for shape in e.input_shapes if shape) else " (base, lm_head)"
        entry = ops.setdefault(name, [0.0, 0])
        entry[0] += e.self_cpu_time_total / 1000 / steps
        entry[1] += e.count // steps
    total = sum(ms for ms, _ in ops.values())
    rows = sorted(((name, ms, ms / total, calls) for name, (ms, calls) in ops.items()), key=lambda r: -r[1])
    return rows[:top], total


def _step_memory_child(kind: str) -> dict:
    torch.set_num_threads(2)
    from bench_inference import reference_model
    model = reference_model() if kind == "model only" else build("PEFT" if kind == "PEFT" else "loralab")
    if kind != "model only":
        opt = optimizer(model)
        for s in range(2):
            _step(kind, model, opt, batch(s))
    return {"peak_mb": _peak_rss_mb()}


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=900, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> str:
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    loss_rounds = 12
    loss_times = time_loss(loss_rounds)
    loss_mem = [_child("--loss-memory", str(i)) for i in range(len(loss_times))]
    step_times = time_steps()
    agree = loss_agreement()
    step_mem = {kind: _child("--step-memory", kind)["peak_mb"] for kind in ("model only", *STEP_KINDS)}
    ops, op_total = profile_step()
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores)"

    ref_mb = {m["name"]: m["extra_mb"] for m in loss_mem}
    loss_rows = []
    for name, m in zip(loss_times, loss_mem):
        ref = _reference(name)
        med, fast, ratio, fast_ratio = summary(loss_times[name], loss_times[ref])
        loss_rows.append(f"| {name} | {med * 1000:.0f} | {fast * 1000:.0f} | {ratio:.2f}x | {fast_ratio:.2f}x | "
                         f"{m['extra_mb']:,.0f} | {m['extra_mb'] / ref_mb[ref]:.2f}x |")
    steps = {k: summary(ts, step_times["PEFT"]) for k, ts in step_times.items()}
    fused_vs_logits = summary(step_times["loralab, fused loss"], step_times["loralab, logits path"])
    idle = step_mem["model only"]
    step_rows = "\n".join(
        f"| {k} | {steps[k][0]:.3f} | {steps[k][1]:.3f} | {steps[k][2]:.2f}x | {steps[k][3]:.2f}x | "
        f"{step_mem[k]:,.0f} | {step_mem[k] - idle:+,.0f} | {(step_mem[k] - idle) / (step_mem['PEFT'] - idle):.2f}x |"
        for k in STEP_KINDS)
    return (
        "## Causal-LM loss: full logits vs chunked linear cross-entropy\n\n"
        f"Machine during this run: {load}; other work on the cores slows every variant, so read the ratios "
        "(memory figures do not depend on it).\n\n"
        f"The loss alone on the reference model's shapes: N = {N} target rows, H = {H}, V = {V}, fp32, frozen "
        f"head; forward + backward; {loss_rounds} round-robin rounds (see the module docstring); bf16 rows "
        "are compared with the full logits under the same autocast, rows with ignored targets with the full "
        "logits on the same targets. Peak extra memory: fresh process per "
        "variant, VmHWM over two calls above the resident set once the inputs exist.\n\n"
        "| variant | median ms | fastest ms | time vs full logits: median | fastest | peak extra MB | "
        "memory vs full logits |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(loss_rows) +
        "\n\nEvery chunk of rows reads all of W (65 MB here) twice, once for its logits and once for its "
        "input gradient, so very small chunks are slower than the full logits; a chunk's two (rows, V) "
        "buffers are the memory cost.\n\n"
        "Whole training step, reference Llama (hidden 512, 8 layers, vocab 32000), batch 8x128, fp32, LoRA "
        "r=16 alpha=32 dropout 0.05 on all 7 projections; loss sum / targets, backward, AdamW; "
        "round-robin rounds. Peak memory: VmHWM of a fresh process running 2 steps; 'extra' is above "
        f"building the model alone ({idle:,.0f} MB).\n\n"
        "| variant | median s/step | fastest s/step | vs PEFT: median | fastest | peak RSS MB | extra MB | "
        "extra vs PEFT |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + step_rows +
        f"\n\nFused loss / logits path step time: **{fused_vs_logits[2]:.2f}x** (median of rounds; fastest "
        f"rounds {fused_vs_logits[3]:.2f}x); loralab with the fused loss / PEFT: "
        f"**{steps['loralab, fused loss'][2]:.2f}x** (fastest rounds {steps['loralab, fused loss'][3]:.2f}x; "
        f"target <= 0.60x); peak memory / PEFT's: "
        f"**{step_mem['loralab, fused loss'] / step_mem['PEFT']:.2f}x** of the whole process "
        f"(target <= 0.6x).\n\n"
        f"Agreement at dropout 0, identical adapters (B nonzero): mean loss fused {agree['fused']:.6f}, logits "
        f"path {agree['logits']:.6f}, PEFT {agree['peft']:.6f}; max |fused - PEFT| = "
        f"{abs(agree['fused'] - agree['peft']):.1e} (target <= 1e-4); largest LoRA-gradient difference "
        f"fused vs logits path, relative to that gradient's largest entry: {agree['grad_rel_gap']:.1e}.\n\n"
        f"Where the fused-loss step spends its time (torch.profiler, self time of each op, 2 steps; "
        f"{op_total:,.0f} ms of ops per step):\n\n"
        "| op | ms/step | share | calls/step |\n| --- | ---: | ---: | ---: |\n" +
        "\n".join(f"| {name} | {ms:,.0f} | {share:.1%} | {calls} |" for name, ms, share, calls in ops) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loss-memory":
        print(json.dumps(_loss_memory_child(int(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--step-memory":
        print(json.dumps(_step_memory_child(sys.argv[2])))
    else:
        print(main())
