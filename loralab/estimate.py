"""Memory and size planner: full fine-tuning vs LoRA vs QLoRA, the adapter file, many fine-tuned variants.

Every figure is in bytes (GB below means 10⁹ bytes, GiB 2³⁰).  N = the model's parameters, n = adapter
parameters (Σ r·(in + out) over the adapted modules), p_w = bytes per base weight (4 fp32, 2 bf16/fp16).

Full fine-tuning with Adam keeps, per parameter, the weight, its gradient and Adam's m and v:
    fp32                                          4 + 4 + 4 + 4     = 16 bytes
    16-bit weights and grads, fp32 master + Adam  2 + 2 + 4 + 4 + 4 = 16 bytes  (mixed precision; ZeRO's 16Ψ)
    16-bit weights and grads, fp32 Adam           2 + 2 + 4 + 4     = 12 bytes
    everything in 16 bits                         2 + 2 + 2 + 2     =  8 bytes
"Adam needs 3x the model size for gradients and states" is the last line (grads, m and v each as large as
the weights, in the weights' precision): a 7B model, 14 GB in fp16, needs 4 × 14 = 56 GB.
LoRA:  N·p_w frozen + n·(4 + 4 + 4 + 4) (adapters, grads, m, v in fp32, as loralab keeps them) + activations.
QLoRA: the Linear weights of the blocks in NF4 (bits per parameter below) + the rest (embeddings, output head,
norms, biases) in p_w + the same adapter and activation terms.
NF4 (bitsandbytes' layout): 4 bits per parameter, plus per block of 64 parameters its absmax:
    fp32 absmax                                         4 + 32/64           = 4.5 bits
    double quantization: absmax in 8 bits, plus an fp32 absmax per 256 blocks   4 + 8/64 + 32/(64·256) = 4.127 bits
(and one fp32 offset per tensor, which nf4_storage_bytes counts and the per-parameter figure leaves out).
Adapter file: n · bytes per adapter weight (tensor data; the safetensors header adds a few kB).
Activations: see activations.py (a tensor-by-tensor count checked against autograd), of `loralab train`'s
step by default (loop "loralab": the causal-LM loss from the last hidden state in chunks, never the (tokens,
vocab) logits, where loss.py supports the architecture; SwiGLU MLPs keeping gate and up only, fused.py), or
of a standard `model(input_ids, labels=...).loss` step (loop "standard", as with PEFT or the HF Trainer).
Full fine-tuning is always counted as a standard step.
The CUDA context, the allocator's fragmentation and the data loader are not counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from .activations import activation_memory

__all__ = ["EstimateConfig", "estimate", "estimate_text", "nf4_bits_per_parameter", "nf4_storage_bytes",
           "full_finetune_bytes", "loop_savings", "FULL_FINETUNE", "DTYPE_BYTES", "LOOPS", "parse_count",
           "parse_bytes"]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAPTER_STATE_BYTES = 4 + 4 + 4 + 4          # fp32 adapter weight, grad, Adam m, Adam v
FULL_FINETUNE = {  # name: (description, bytes per parameter: weights, grads, fp32 master, Adam m, Adam v)
    "fp32": ("fp32 weights, grads, Adam m and v", (4, 4, 0, 4, 4)),
    "mixed": ("16-bit weights and grads, fp32 master copy and Adam", (2, 2, 4, 4, 4)),
    "16bit_fp32_adam": ("16-bit weights and grads, fp32 Adam, no master copy", (2, 2, 0, 4, 4)),
    "16bit": ("16-bit weights, grads and Adam (the '3x' rule)", (2, 2, 0, 2, 2)),
}
QUANT = ("nf4",)
LOOPS = {"loralab": "loralab train's step", "standard": "a standard model(input_ids, labels).loss step"}
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_COUNT_SUFFIX = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "t": 10 ** 12}


# ---- the pure arithmetic ----------------------------------------------------------------------------------
def nf4_bits_per_parameter(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    """4 bits + the absmax storage per parameter: 32/blocksize without double quantization,
    8/blocksize + 32/(blocksize·nested_blocksize) with it (4.5 and 4.126953125 for 64 and 256)."""
    for name, value in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Bytes of one NF4 tensor of `numel` parameters as loralab's NF4Linear stores it: ceil(numel/2) packed
    bytes, an absmax per block (fp32, or uint8 with double quantization plus an fp32 absmax per nested block,
    one fp32 offset and the 256-entry fp32 code of the 8-bit absmax).  bitsandbytes stores 64 bytes more per
    tensor (the 16 NF4 levels, a constant loralab does not store)."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
    nf4_bits_per_parameter(blocksize, double_quant, nested_blocksize)          # validates the sizes
    blocks = -(-numel // blocksize)
    if not double_quant:
        return -(-numel // 2) + 4 * blocks
    return -(-numel // 2) + blocks + 4 * -(-blocks // nested_blocksize) + 4 + 4 * 256


def full_finetune_bytes(params: int, convention: str) -> dict:
    """{"weights", "grads", "master", "adam_m", "adam_v", "total"} for full fine-tuning with Adam."""
    if convention not in FULL_FINETUNE:
        raise ValueError(f"unknown convention {convention!r}; choose one of {sorted(FULL_FINETUNE)}")
    parts = dict(zip(("weights", "grads", "master", "adam_m", "adam_v"), FULL_FINETUNE[convention][1]))
    out = {k: params * b for k, b in parts.items()}
    return dict(out, total=sum(out.values()))


def parse_count(text) -> int:
    """'8e9', '7B', '125M', '6738415616' -> a parameter count."""
    found = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbt]?)\s*", str(text).lower())
    try:
        value = float(found.group(1)) * _COUNT_SUFFIX[found.group(2)] if found else float("nan")
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a parameter count such as 7e9, 7B or 125M, got {text!r}")
    return int(round(value))


def parse_bytes(text) -> int:
    """'24GB' (10⁹), '24GiB' (2³⁰), '80 GB', '512MiB' -> bytes.  A unit is required: a card sold as
    '24 GB' usually has 24 GiB."""
    found = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-z]+)\s*", str(text).lower())
    if not found or found.group(2) not in _UNITS:
        raise ValueError(f"expected a size with a unit such as 24GB or 24GiB (GB = 10^9 bytes, GiB = 2^30), "
                         f"got {text!r}")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def _gb(n: float) -> str:
    """GB (10⁹ bytes) with two decimals, or MB below 1 GB."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- inputs -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EstimateConfig:
    params: int | None = None              # a bare count (a Llama-style layout gives the widths) ...
    model: str | None = None               # ... or a local model directory / config.json (meta device)
    r: int = 16
    target_modules: str | tuple = "all-linear"
    quant: str | None = None               # "nf4": the plan (and the fit check) is QLoRA
    double_quant: bool = True
    batch: int = 1
    seq: int = 2048
    dtype: str = "bf16"                    # base weights and activations: fp32, bf16, fp16
    gradient_checkpointing: bool = False
    autocast: bool = False                 # the step runs under torch.autocast(dtype): 16-bit adapter path
    lora_dropout: float = 0.0
    gpu_memory: int | None = None          # bytes; answers "will it fit"
    variants: int | None = None            # N fine-tuned variants: N full copies vs base + N adapters
    adapter_dtype: str = "fp32"            # of the saved adapter file (loralab writes fp32)
    loop: str = "loralab"                  # whose training step: LOOPS

    def __post_init__(self):
        if (self.params is None) == (self.model is None):
            raise ValueError("give exactly one of params (e.g. 7e9) and model (a model directory or config.json)")
        for name in ("params", "r", "batch", "seq", "gpu_memory", "variants"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop={self.loop!r}: choose one of {', '.join(LOOPS)}")
        if self.quant is not None and self.quant not in QUANT:
            raise ValueError(f"quant={self.quant!r}: the only quantization is 'nf4' (or none)")
        if isinstance(self.lora_dropout, bool) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        spec = self.target_modules
        if isinstance(spec, (list, tuple)):
            if not spec or not all(isinstance(n, str) and n for n in spec):
                raise ValueError(f"target_modules must be 'all-linear' or non-empty names, got {spec!r}")
            object.__setattr__(self, "target_modules", tuple(spec))
        elif not isinstance(spec, str) or not spec:
            raise ValueError(f"target_modules must be 'all-linear', a regex or a list of names, got {spec!r}")


# ---- the estimate -----------------------------------------------------------------------------------------
def _shape(config: EstimateConfig):
    from .targets import llama_like_shape, model_shape
    return model_shape(config.model) if config.model is not None else llama_like_shape(config.params)


def loop_savings(shape, loop: str) -> dict:
    """What of `loralab train`'s memory savings applies to this architecture under `loop`: the chunked
    causal-LM loss (loss.PLAIN_HEAD_MODELS) and the fused SwiGLU MLP (fused.SWIGLU_MLPS), as
    activation_memory's keyword arguments."""
    from .fused import SWIGLU_MLPS
    from .loss import PLAIN_HEAD_MODELS, chunk_rows
    arch = shape.architecture.split(" ")[0]         # "LlamaForCausalLM (layout)" for a bare count
    ours = loop == "loralab"
    chunked = ours and bool(shape.vocab) and arch in PLAIN_HEAD_MODELS
    return {"loss": "chunked" if chunked else "logits", "loss_chunk_rows": chunk_rows(shape.vocab) if chunked else 0,
            "fused_mlp": ours and shape.gated_mlp and arch.split("For")[0] + "MLP" in SWIGLU_MLPS}


def estimate(config: EstimateConfig) -> dict:
    """Every figure of the plan, in bytes, and the arithmetic behind it (key "text", a list of lines)."""
    from .targets import adapter_params, select
    shape, model = _shape(config)
    N, pw = shape.total_params, DTYPE_BYTES[config.dtype]
    chosen = select(model, shape, config.target_modules)
    n = adapter_params(chosen, config.r)
    act = dict(batch=config.batch, seq=config.seq, lora_dropout=config.lora_dropout,
               gradient_checkpointing=config.gradient_checkpointing)
    lora_act = activation_memory(shape, act_bytes=pw, adapted=chosen, r=config.r, autocast=config.autocast,
                                 **act, **loop_savings(shape, config.loop))
    full = {}
    for name, (_, per) in FULL_FINETUNE.items():
        a = activation_memory(shape, act_bytes=4 if name == "fp32" else 2, full=True, **act)
        states = full_finetune_bytes(N, name)
        full[name] = dict(states, states=states["total"], activations=a.total, total=states["total"] + a.total)
    adapter = {"weights": n * 4, "grads": n * 4, "adam": n * 8}
    lora = dict(base_weights=N * pw, **{f"adapter_{k}": v for k, v in adapter.items()}, activations=lora_act.total)
    lora["total"] = sum(lora.values())
    bits = nf4_bits_per_parameter(double_quant=config.double_quant)
    quantized, packed = min(shape.quantizable_params, N), None
    linears = [c for c in shape.candidates if c.kind == "Linear" and not c.is_head]
    if config.model is not None and linears:  # a real architecture: its tensors, as quantize_model stores them
        quantized = sum(c.in_features * c.out_features for c in linears)
        packed = sum(nf4_storage_bytes(c.in_features * c.out_features, double_quant=config.double_quant)
                     for c in linears)
    qlora = dict(quantized_weights=packed if packed is not None else math.ceil(quantized * bits / 8),
                 unquantized_weights=(N - quantized) * pw,
                 **{f"adapter_{k}": v for k, v in adapter.items()}, activations=lora_act.total)
    qlora["total"] = sum(qlora.values())
    file_bytes = n * DTYPE_BYTES[config.adapter_dtype]
    result = {
        "model": {"source": shape.source, "architecture": shape.architecture, "total_params": N,
                  "hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads, "kv_hidden": shape.kv_hidden,
                  "intermediate": shape.intermediate, "vocab": shape.vocab, "quantizable_params": quantized},
        "inputs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "adapter": {"modules": len(chosen), "trainable_params": n, "percent_of_model": 100 * n / N,
                    "file_bytes": file_bytes},
        "full_finetune": full, "lora": lora, "qlora": dict(qlora, bits_per_parameter=bits),
        "activations": {"lora": lora_act.to_dict(), "loop": config.loop, "loss": lora_act.loss,
                        "fused_mlp": lora_act.fused_mlp},
    }
    if config.variants:
        result["variants"] = {"count": config.variants, "full_copies": config.variants * N * pw,
                              "base_plus_adapters": N * pw + config.variants * file_bytes}
    plan = "qlora" if config.quant else "lora"
    if config.gpu_memory:
        need = result[plan]["total"]
        result["fit"] = {"plan": plan, "needed": need, "gpu_memory": config.gpu_memory,
                         "fits": need <= config.gpu_memory, "margin": config.gpu_memory - need}
    result["text"] = estimate_text(result, shape, chosen, lora_act, config)
    return result


def estimate_text(result: dict, shape, chosen, lora_act, config: EstimateConfig) -> list[str]:
    """The human report: each figure with the arithmetic that gives it."""
    N, pw, r, n = shape.total_params, DTYPE_BYTES[config.dtype], config.r, result["adapter"]["trainable_params"]
    lines = [f"model: {shape.source}", f"  {shape.architecture}: {N:,} parameters; {config.dtype} weights, "
             f"batch {config.batch} × seq {config.seq}"
             + (", gradient checkpointing" if config.gradient_checkpointing else "")
             + (", autocast" if config.autocast else ""), ""]
    kinds: dict = {}
    for c in chosen:
        kinds.setdefault((c.relative.rsplit(".", 1)[-1], c.in_features, c.out_features), []).append(c)
    spec = config.target_modules if isinstance(config.target_modules, str) else ",".join(config.target_modules)
    lines.append(f"adapter r={r} on {spec}: {len(chosen)} modules, Σ r·(in + out) = {n:,} trainable parameters "
                 f"({result['adapter']['percent_of_model']:.4f}% of the model)")
    lines += [f"  {name}: {r}·({i} + {o}) = {r * (i + o):,} × {len(group)}" for (name, i, o), group in kinds.items()]
    lines += ["", f"full fine-tuning with Adam, bytes per parameter × {N:,} (+ activations at 4 or 2 bytes)"]
    for name, (label, per) in FULL_FINETUNE.items():
        f = result["full_finetune"][name]
        arith = " + ".join(str(b) for b in per if b)
        lines.append(f"  {label:<52} {arith + ' = ' + str(sum(per)):>18} B  {_gb(f['states']):>10}"
                     f"  + {_gb(f['activations']):>9} = {_gb(f['total'])}")
    lora, qlora = result["lora"], result["qlora"]
    adapter_line = (f"  adapter weights, grads, Adam m and v (fp32)  {n:,} × (4 + 4 + 4 + 4) B = "
                    f"{_gb(16 * n)}")
    lines += ["", f"LoRA ({config.dtype} base, frozen)",
              f"  base weights  {N:,} × {pw} B = {_gb(lora['base_weights'])}", adapter_line, f"  activations  {_gb(lora['activations'])}", f"  total  {_gb(lora['total'])}"]
    bits = qlora["bits_per_parameter"]
    how = "4 + 8/64 + 32/(64·256)" if config.double_quant else "4 + 32/64"
    lines += ["", f"QLoRA (NF4 base{', double quantization' if config.double_quant else ''}: {how} = "
              f"{bits:.6g} bits per parameter)",
              f"  quantized Linear weights  {shape.quantizable_params:,} × {bits:.6g} / 8 = "
              f"{_gb(qlora['quantized_weights'])}",
              f"  the rest in {config.dtype} (embeddings, head, norms, biases)  "
              f"{N - min(shape.quantizable_params, N):,} × {pw} B = {_gb(qlora['unquantized_weights'])}",
              adapter_line, f"  activations  {_gb(qlora['activations'])}", f"  total  {_gb(qlora['total'])}"]
    exact = shape.rms_norm and shape.gated_mlp
    how = result["activations"]
    kept = [k for k, on in (("the loss from the hidden states in chunks", how["loss"] == "chunked"),
                            ("SwiGLU MLPs keeping gate and up only", how["fused_mlp"])) if on]
    lines += ["", f"activations (LoRA, {config.dtype}, {LOOPS[config.loop]}"
              + (f": {', '.join(kept)}" if kept else "") + "; counted as in loralab/activations.py"
              + (")" if exact else "; for LayerNorm/GELU blocks dropout masks and eager attention are not "
                 "counted: a lower bound)")]
    lines += [f"  {line}" for line in lora_act.text]
    lines += ["", f"adapter file: {n:,} × {DTYPE_BYTES[config.adapter_dtype]} B ({config.adapter_dtype}) = "
              f"{result['adapter']['file_bytes'] / 1e6:,.1f} MB"]
    if "variants" in result:
        v = result["variants"]
        lines.append(f"{v['count']} variants: {v['count']} full copies × {_gb(N * pw)} = {_gb(v['full_copies'])}; "
                     f"base + {v['count']} adapters = {_gb(N * pw)} + {v['count']} × "
                     f"{result['adapter']['file_bytes'] / 1e6:,.1f} MB = {_gb(v['base_plus_adapters'])}")
    if "fit" in result:
        fit = result["fit"]
        verdict = (f"yes, {_gb(fit['margin'])} to spare" if fit["fits"] else
                   f"no, {_gb(-fit['margin'])} short")
        lines.append(f"fits in {_gb(fit['gpu_memory'])} ({fit['gpu_memory'] / 2 ** 30:.1f} GiB)? "
                     f"{'QLoRA' if fit['plan'] == 'qlora' else 'LoRA'} needs {_gb(fit['needed'])}: {verdict} "
                     f"(the CUDA context and fragmentation are not counted)")
    return lines
