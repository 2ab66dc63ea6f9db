"""NF4: 4-bit NormalFloat quantization of a weight tensor, bit-compatible with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, §3) keeps a frozen weight in 4 bits per value:

    w: any shape, flattened to (n,) and cut into blocks of `blocksize` consecutive values (the last may be short)
    absmax_b = max_{i in b} |w_i|                  one fp32 constant per block: (ceil(n / blocksize),)
    s_i      = w_i / absmax_b   in [-1, 1]
    q_i      = index of the NF4 level nearest to s_i          a 4-bit code
    ŵ_i      = NF4[q_i] · absmax_b                           the dequantized value

The 16 levels (NF4_LEVELS) are quantiles of N(0, 1) scaled to [-1, 1], with an exact 0: 7 below it, 8 above.
Two codes share a byte, the first in the high nibble (byte_k = 16·q_{2k} + q_{2k+1}); an odd count is padded with
the code of 0.0 (7).  packed: (ceil(n / 2),) uint8.

Double quantization (the paper's second step) stores the fp32 absmax constants in 8 bits as well:
    offset = mean(absmax);  absmax - offset is quantized in blocks of 256 with bitsandbytes' signed dynamic 8-bit
    code (dynamic_map()), keeping one fp32 constant per 256 blocks.  Bits per parameter at blocksize 64:
    4 + 32/64 = 4.5 without it; 4 + 8/64 + 32/(64·256) ≈ 4.127 with it (plus the offset and the 256-entry code).

Rounding rules, those of bitsandbytes 0.50 (quantize_4bit(..., quant_type="nf4") on CPU), so bytes match:
  - 4-bit: full blocks use s = w · (1 / max(absmax, 1e-38)), a short last block s = w / max(absmax, 1e-38) and
    stores that clamped absmax (a full block of zeros stores 0).  q = #{midpoints m_j < s}: the nearest level,
    and a value exactly on a midpoint goes to the lower level.
  - 8-bit (the absmax constants): v = clamp(x · (1/a), -1, 1), k = trunc(((v + 1)·0.5)·65535 + 0.5), and the code
    is the entry for the grid point -1 + 2k/65535 of a 65536-entry nearest-level table; a block of zeros gets
    code 0.  (Not always the nearest level: near 0 the grid is coarser than the code.)

Speed: the 4-bit level is found without a search.  Adding 1.5·2^19 in fp32 rounds s exactly to a multiple of
1/16 (its ulp), so the low 6 bits of the sum name one of 33 cells that each hold at most one midpoint (the closest
two are 0.08 apart): q = below[cell] + (s > midpoint[cell]), two gathers from 64-entry tables and a comparison.
Dequantization gathers both levels of a byte at once from a 256-entry table (as one float64) and scales them in
place.  On CPU the work is cut into one contiguous part per intra-op thread, each a loop of single-threaded ops
on 32K-element slices whose buffers stay in L2 (see parallel.py): no float64 arithmetic, no (n, 16)
intermediates, and no thread waiting on another between ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import parallel
from .state import DTYPES, NESTED_BLOCKSIZE, NF4State, check_blocksize, dtype_names

__all__ = ["NF4_LEVELS", "quantize_nf4", "dequantize_nf4", "dynamic_map", "nf4_levels"]

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
_MIN_SCALE = 1e-38              # bitsandbytes' clamp of absmax before dividing
_MAGIC = 786432.0               # 1.5 · 2^19: its fp32 ulp is 1/16, so s + _MAGIC rounds s to a multiple of 1/16
_LUT8 = 65536                   # size of the 8-bit quantizer's lookup grid
_BATCH = 8                      # dequantization steps per foreach call
_WHOLE = 1 << 22                # values up to which a CPU dequantization is three whole-tensor ops (_dequantize_whole)


def nf4_levels(device=None) -> torch.Tensor:
    """The 16 NF4 levels as a float32 tensor (16,), ascending."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (Dettmers 2015, arXiv:1511.04561): 256 sorted float32 values in
    [-0.993, 1].  For exponent e = 0..6, 2^e evenly spaced fractions between 0.1 and 1 (bin centres), times
    10^(e-6), with both signs; then 0 and 1.  Built with the same float32 operations as bitsandbytes."""
    data: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (e - 6)) * means).tolist()
        data += (-(10 ** (e - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass(frozen=True)
class _Tables:
    below: torch.Tensor       # (64,) uint8: midpoints below cell j (at index j mod 64, j = round(16 s) in -16..16)
    midpoint: torch.Tensor    # (64,) float32: the midpoint inside cell j, 2.0 if none
    pairs: torch.Tensor       # (256,) float64 bits of (NF4[b >> 4], NF4[b & 15]): both values of byte b
    levels: torch.Tensor      # (16,) float32
    code8: torch.Tensor       # (256,) float32: dynamic_map()
    lut8: torch.Tensor        # (65536,) uint8: grid point -> code8 index (bitsandbytes' table)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> _Tables:
    levels = nf4_levels()
    mids = (levels[:-1] + levels[1:]) / 2                                  # (15,), as bitsandbytes computes them
    cell = torch.arange(-16, 17)
    lo, hi = (cell - 0.5) / 16, (cell + 0.5) / 16                          # exact: the values rounding to cell
    inside = (mids[None, :] > lo[:, None]) & (mids[None, :] < hi[:, None])  # (33, 15)
    assert inside.sum(1).max() <= 1 and not bool(((mids[None] == lo[:, None]) | (mids[None] == hi[:, None])).any())
    below = torch.zeros(64, dtype=torch.uint8)
    midpoint = torch.full((64,), 2.0)
    below[cell % 64] = (mids[None, :] < lo[:, None]).sum(1).to(torch.uint8)
    midpoint[cell % 64] = torch.where(inside, mids[None, :], torch.tensor(2.0)).amin(1)
    byte = torch.arange(256)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], 1).contiguous().view(torch.float64).view(256)
    code8 = dynamic_map()
    grid = -1.0 + (2.0 * torch.arange(_LUT8, dtype=torch.float32)) / (_LUT8 - 1)
    lut8 = torch.searchsorted(0.5 * (code8[:-1] + code8[1:]), grid).to(torch.uint8)  # first midpoint >= grid
    return _Tables(*(t.to(device) for t in (below, midpoint, pairs, levels, code8, lut8)))


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Quantize w (any shape; float32/float16/bfloat16) to NF4.  Returns (packed (ceil(n/2),) uint8, state).
    Same bytes and constants as bitsandbytes' quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)."""
    _check_weight(w)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    t = _tables(w.device)
    with torch.no_grad():
        flat = w.detach().reshape(-1)
        n = flat.numel()
        full = n - n % blocksize
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
        if full:
            parallel.run_split(lambda lo, hi: _quantize_blocks(flat, blocksize, packed, absmax, t, lo, hi),
                               full, blocksize, w.device)
            _check_finite(absmax[: full // blocksize], flat, 0)
        if full < n:
            _quantize_tail(flat[full:], packed[full // 2:], absmax[-1:], t, full)
        if not double_quant:
            return packed, NF4State(tuple(w.shape), w.dtype, blocksize, absmax)
        codes, offset, nested_absmax = _quantize_absmax(absmax, t)
        return packed, NF4State(tuple(w.shape), w.dtype, blocksize, codes, offset, nested_absmax, t.code8.clone())


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor `packed` + `state` stand for: state.shape, in `dtype` (default state.dtype).  Each value is
    NF4[q] · absmax computed in float32 and rounded once to dtype, as bitsandbytes' dequantize_4bit."""
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be an NF4State (from quantize_nf4), got {type(state).__name__}")
    n = state.numel
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        got = f"{packed.dtype} with {packed.numel()} elements" if isinstance(packed, torch.Tensor) else type(packed)
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} elements for shape {state.shape}, got {got}")
    if packed.device != state.device:
        raise ValueError(f"packed is on {packed.device} but the state on {state.device}; move both with .to()")
    dtype = state.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    t = _tables(packed.device)
    with torch.no_grad():
        absmax = _block_absmax(state, t)
        codes = packed.reshape(-1)
        out = parallel.empty(n, dtype, packed.device)                         # huge pages: see parallel.py
        bs = state.blocksize
        full = n - n % bs
        if full and n <= _WHOLE and parallel.on_cpu(packed.device):
            _dequantize_whole(codes, absmax, bs, out, t, full)
        elif full:
            parallel.run_split(lambda lo, hi: _dequantize_blocks(codes, absmax, bs, out, t, lo, hi),
                               full, bs, packed.device)
        if full < n:
            tail = codes[full // 2:]
            q = torch.stack([tail >> 4, tail & 15], 1).reshape(-1)[: n - full].long()
            out[full:] = t.levels[q] * absmax[-1]
    return out.view(state.shape)


# ---- the work -------------------------------------------------------------------------------------------------

class _QuantizeBuffers:
    """Scratch space for one step of c values (whole blocks of bs), with every view the step needs made once."""

    def __init__(self, c: int, bs: int, convert: bool, device: torch.device, base: dict | None = None):
        self.base = base or {n: torch.empty(c, dtype=d, device=device) for n, d in (
            ("s", torch.float32), ("y", torch.float32), ("mid", torch.float32), ("idx", torch.int32),
            ("q", torch.uint8), ("gt", torch.bool), ("inv", torch.float32))
            + ((("x", torch.float32),) if convert else ())}
        self.s, self.y, self.mid, self.idx, self.q, self.gt = (self.base[n][:c]
                                                                for n in ("s", "y", "mid", "idx", "q", "gt"))
        self.s2, self.y_bits = self.s.view(-1, bs), self.y.view(torch.int32)
        self.inv = self.base["inv"][: c // bs]
        self.inv_col = self.inv.view(-1, 1)
        self.x2 = self.base["x"][:c].view(-1, bs) if convert else None          # fp16/bf16 input, as fp32
        self.q_even, self.q_odd = self.q[0::2], self.q[1::2]

    def narrow(self, c: int, bs: int) -> "_QuantizeBuffers":
        return _QuantizeBuffers(c, bs, self.x2 is not None, self.s.device, self.base)


def _quantize_blocks(x, bs: int, packed, absmax, t: _Tables, lo: int, hi: int) -> None:
    """x[lo:hi] (whole blocks) -> packed[lo/2 : hi/2] uint8 and absmax[lo/bs : hi/bs] float32, in place."""
    step, k, mid = parallel.whole_steps(lo, hi, x.device)
    buf = _QuantizeBuffers(step, bs, x.dtype != torch.float32, x.device)
    if k:
        for xb, a, p in zip(x[lo:mid].view(k, step // bs, bs).unbind(0),
                            absmax[lo // bs: mid // bs].view(k, step // bs).unbind(0),
                            packed[lo // 2: mid // 2].view(k, step // 2).unbind(0)):
            _quantize_step(xb, a, p, buf, t)
    if mid < hi:
        _quantize_step(x[mid:hi].view(-1, bs), absmax[mid // bs: hi // bs], packed[mid // 2: hi // 2],
                       buf.narrow(hi - mid, bs), t)


def _quantize_step(xb, a, p, b: _QuantizeBuffers, t: _Tables) -> None:
    """xb: (c/bs, bs) -> a: (c/bs,) block absmax, p: (c/2,) packed codes."""
    if b.x2 is not None:
        xb = b.x2.copy_(xb)                                                     # fp16/bf16 -> fp32: exact
    torch.amax(torch.abs(xb, out=b.s2), dim=1, out=a)                          # max |x| of each block
    torch.clamp(a, min=_MIN_SCALE, out=b.inv).reciprocal_()
    torch.mul(xb, b.inv_col, out=b.s2)                                          # s in [-1, 1]
    _codes(b, t)
    torch.add(b.q_odd, b.q_even, alpha=16, out=p)                               # high nibble first


def _codes(b: _QuantizeBuffers, t: _Tables) -> None:
    """b.q[i] = #{NF4 midpoints < b.s[i]}, through the cells of width 1/16 (module docstring)."""
    torch.add(b.s, _MAGIC, out=b.y)
    torch.bitwise_and(b.y_bits, 63, out=b.idx)                                  # round(16 s) mod 64; NaN: harmless
    torch.index_select(t.below, 0, b.idx, out=b.q)
    torch.index_select(t.midpoint, 0, b.idx, out=b.mid)
    b.q.add_(torch.gt(b.s, b.mid, out=b.gt))


def _quantize_tail(x, packed, absmax, t: _Tables, offset: int) -> None:
    """The short last block (r < blocksize values): bitsandbytes clamps its absmax and divides."""
    x = x.float()
    a = x.abs().amax().clamp(min=_MIN_SCALE)
    _check_finite(a, x, offset)
    absmax.copy_(a.reshape(1))
    r = x.numel()
    b = _QuantizeBuffers(r + r % 2, r + r % 2, False, x.device)
    b.s.zero_()                                                                 # an odd count pads with 0.0: code 7
    torch.div(x, a, out=b.s[:r])
    _codes(b, t)
    torch.add(b.q_odd, b.q_even, alpha=16, out=packed)


def _dequantize_blocks(packed, absmax, bs: int, out, t: _Tables, lo: int, hi: int) -> None:
    """packed[lo/2 : hi/2] uint8 and absmax (m,) -> out[lo:hi] in out's dtype, in place.  On CPU a step covers
    2·SLICE values (one gather of SLICE bytes) and _BATCH steps share each foreach call (index conversion,
    scaling in halves of SLICE, the cast to fp16/bf16): one Python call for many small single-threaded ops.
    Every op writes into buffers made once per part (out= and in-place), never into fresh temporaries."""
    dev = out.device
    step, k, mid = parallel.whole_steps(lo, hi, dev, 2)
    half = parallel.SLICE if parallel.on_cpu(dev) else step
    direct = out.dtype == torch.float32                                          # gather straight into out
    if k and parallel.on_cpu(dev):
        nb = min(_BATCH, k)
        idx = torch.empty(nb, step // 2, dtype=torch.int32, device=dev).unbind(0)
        steps = packed[lo // 2: mid // 2].view(k, step // 2).unbind(0)
        outs = out[lo:mid].view(2 * k, half // bs, bs).unbind(0)
        scales = absmax[lo // bs: mid // bs].view(2 * k, half // bs, 1).unbind(0)
        if direct:
            gathered = out[lo:mid].view(torch.float64).view(k, step // 2).unbind(0)
        else:
            f = torch.empty(nb, step, dtype=torch.float32, device=dev)
            gathered, f_halves = f.view(torch.float64).unbind(0), f.view(2 * nb, half // bs, bs).unbind(0)
        for b0 in range(0, k, nb):
            m = min(nb, k - b0)
            torch._foreach_copy_(idx[:m], steps[b0: b0 + m])                       # uint8 -> int32
            for j in range(m):                                                      # both levels of each byte
                torch.index_select(t.pairs, 0, idx[j], out=gathered[b0 + j] if direct else gathered[j])
            levels = outs[2 * b0: 2 * (b0 + m)] if direct else f_halves[: 2 * m]
            torch._foreach_mul_(levels, scales[2 * b0: 2 * (b0 + m)])              # NF4[q] · absmax in fp32
            if not direct:
                torch._foreach_copy_(outs[2 * b0: 2 * (b0 + m)], levels)            # rounded once to fp16/bf16
        lo = mid
    idx = torch.empty(min(step, hi - lo) // 2, dtype=torch.int32, device=dev)
    f = None if direct else torch.empty(min(step, hi - lo), dtype=torch.float32, device=dev)
    for start in range(lo, hi, step):                                            # the rest, sliced by hand
        stop = min(start + step, hi)
        c = stop - start
        levels = out[start:stop] if direct else f[:c]
        torch.index_select(t.pairs, 0, idx[: c // 2].copy_(packed[start // 2: stop // 2]),
                           out=levels.view(torch.float64))
        for a in range(start, stop, half):
            b = min(a + half, stop)
            part = levels[a - start: b - start]
            part.view(-1, bs).mul_(absmax[a // bs: b // bs, None])
            if not direct:
                out[a:b].copy_(part)


def _dequantize_whole(packed, absmax, bs: int, out, t: _Tables, full: int) -> None:
    """packed[: full/2] -> out[:full], whole blocks, in three ops in the calling thread: the byte -> int32
    conversion, one gather of both levels of every byte, the scaling (then the cast for fp16/bf16).  For the
    matrices of a small model's layers (512 x 512: 0.2 ms, 3.5x faster than the split path, whose slices and
    thread hand-offs cost more than their work there)."""
    idx = packed[: full // 2].to(torch.int32)
    f = out[:full] if out.dtype == torch.float32 else torch.empty(full, dtype=torch.float32, device=out.device)
    torch.index_select(t.pairs, 0, idx, out=f.view(torch.float64))
    f.view(-1, bs).mul_(absmax[: full // bs, None])
    if f is not out:
        out[:full].copy_(f)


def _block_absmax(state: NF4State, t: _Tables) -> torch.Tensor:
    """state.block_absmax() (nested_code[q] · nested_absmax + offset, two roundings as bitsandbytes) in slices."""
    if not state.double_quant:
        return state.absmax
    m, dev = state.num_blocks, state.device
    out = torch.empty(m, dtype=torch.float32, device=dev)

    def work(lo: int, hi: int) -> None:
        idx_buf = torch.empty(min(parallel.SLICE, hi - lo), dtype=torch.int32, device=dev)
        for start, stop in parallel.slices(lo, hi, dev):
            v = torch.index_select(state.nested_code, 0, idx_buf[: stop - start].copy_(state.absmax[start:stop]),
                                   out=out[start:stop])
            rows, first = (stop - start) // NESTED_BLOCKSIZE, start // NESTED_BLOCKSIZE   # whole rows, then the rest
            scale = state.nested_absmax[first: first + rows + 1]
            v[: rows * NESTED_BLOCKSIZE].view(rows, NESTED_BLOCKSIZE).mul_(scale[:rows, None])
            v[rows * NESTED_BLOCKSIZE:].mul_(scale[rows:])
            v.add_(state.offset)

    parallel.run_split(work, m, NESTED_BLOCKSIZE, dev)
    return out


def _quantize_absmax(absmax: torch.Tensor, t: _Tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: absmax (m,) float32 -> (codes (m,) uint8, offset (), nested absmax (ceil(m/256),))."""
    offset = absmax.mean()                                  # the same reduction as bitsandbytes, in this thread
    m, dev = absmax.numel(), absmax.device
    codes = torch.empty(m, dtype=torch.uint8, device=dev)
    nested = torch.empty(-(-m // NESTED_BLOCKSIZE), dtype=torch.float32, device=dev)

    def work(lo: int, hi: int) -> None:
        for start, stop in parallel.slices(lo, hi, dev):
            c, rows = stop - start, -(-(stop - start) // NESTED_BLOCKSIZE)
            x = torch.zeros(rows * NESTED_BLOCKSIZE, dtype=torch.float32, device=dev)  # zero padding: no effect
            torch.sub(absmax[start:stop], offset, out=x[:c])
            xb = x.view(rows, NESTED_BLOCKSIZE)
            a = torch.amax(xb.abs(), dim=1, out=nested[start // NESTED_BLOCKSIZE: start // NESTED_BLOCKSIZE + rows])
            inv = torch.where(a == 0, torch.zeros_like(a), a.reciprocal())
            v = torch.mul(xb, inv[:, None]).clamp_(-1, 1)
            k = v.add_(1.0).mul_(0.5).mul_(_LUT8 - 1).add_(0.5).to(torch.int32)  # trunc(((v+1)·0.5)·65535 + 0.5)
            q = torch.index_select(t.lut8, 0, k.view(-1)).view(rows, NESTED_BLOCKSIZE)
            q.masked_fill_((a == 0)[:, None], 0)                                # bitsandbytes: a zero block -> 0
            codes[start:stop] = q.view(-1)[:c]

    parallel.run_split(work, m, NESTED_BLOCKSIZE, dev)
    return codes, offset, nested


# ---- argument checks ------------------------------------------------------------------------------------------

def _check_finite(absmax: torch.Tensor, x: torch.Tensor, offset: int) -> None:
    """max propagates NaN and Inf, so checking the largest block constant checks every value (x starts at
    `offset` of the flattened tensor)."""
    if not bool(torch.isfinite(absmax.max())):
        bad = torch.nonzero(~torch.isfinite(x))[0].item()
        raise ValueError(f"cannot quantize a tensor with NaN/Inf: element {offset + bad} (flattened) is "
                         f"{x[bad].item()}")


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 takes a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in DTYPES:
        raise TypeError(f"quantize_nf4 takes {dtype_names(DTYPES)} tensors (as bitsandbytes), got {w.dtype}; "
                        f"convert it first, e.g. w.float()")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if w.device.type == "meta":
        raise ValueError("cannot quantize a tensor on the meta device: it has no values; load the weights first")
