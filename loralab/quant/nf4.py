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
1/16, naming one of 33 cells that each hold at most one midpoint (the closest two are 0.08 apart), so
q = below[cell] + (s > midpoint[cell]): two gathers from 33-entry tables and one comparison.  Dequantization
gathers both levels of a byte at once from a 256-entry table (as one float64) and scales them in place.  The
work goes chunk by chunk through buffers that stay in cache: no float64 arithmetic, no (n, 16) intermediates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = ["NF4_LEVELS", "BLOCKSIZES", "NESTED_BLOCKSIZE", "NF4State", "quantize_nf4", "dequantize_nf4",
           "dynamic_map", "nf4_levels"]

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ZERO_CODE = 7                        # NF4_LEVELS[7] == 0.0: the padding nibble
_MIN_SCALE = 1e-38                    # bitsandbytes' clamp of absmax before dividing
_MAGIC = 786432.0                     # 1.5 · 2^19: its fp32 ulp is 1/16, so s + _MAGIC rounds s to 1/16
_MAGIC_INDEX = 0x49400000 - 16        # bits(_MAGIC) - 16: bits(s + _MAGIC) - this = round(16 s) + 16 in [0, 32]
_CHUNK = 1 << 18                      # elements per step on CPU: ~4.5 MB of buffers, they stay in L2/L3
_LUT8 = 65536                         # size of the 8-bit quantizer's lookup grid


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
    below: torch.Tensor       # (33,) uint8: midpoints below the cell
    midpoint: torch.Tensor    # (33,) float32: the midpoint inside the cell, 2.0 if none
    pairs: torch.Tensor       # (256,) float64 bits of (NF4[b >> 4], NF4[b & 15]): both values of byte b
    levels: torch.Tensor      # (16,) float32
    code8: torch.Tensor       # (256,) float32: dynamic_map()
    lut8: torch.Tensor        # (65536,) uint8: grid point -> nearest code8 index (bitsandbytes' table)


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> _Tables:
    levels = nf4_levels()
    mids = (levels[:-1] + levels[1:]) / 2                                  # (15,), as bitsandbytes computes them
    cell = torch.arange(-16, 17, dtype=torch.float32)
    lo, hi = (cell - 0.5) / 16, (cell + 0.5) / 16                          # exact: the cell's rounding interval
    inside = (mids[None, :] > lo[:, None]) & (mids[None, :] < hi[:, None])  # (33, 15)
    assert inside.sum(1).max() <= 1 and not bool(((mids[None] == lo[:, None]) | (mids[None] == hi[:, None])).any())
    below = (mids[None, :] < lo[:, None]).sum(1).to(torch.uint8)
    midpoint = torch.where(inside, mids[None, :], torch.tensor(2.0)).amin(1)
    byte = torch.arange(256)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], 1).contiguous().view(torch.float64).view(256)
    code8 = dynamic_map()
    grid = -1.0 + (2.0 * torch.arange(_LUT8, dtype=torch.float32)) / (_LUT8 - 1)
    lut8 = torch.searchsorted(0.5 * (code8[:-1] + code8[1:]), grid).to(torch.uint8)  # first midpoint >= grid
    return _Tables(*(t.to(device) for t in (below, midpoint, pairs, levels, code8, lut8)))


@dataclass(frozen=True, eq=False)
class NF4State:
    """What dequantization needs besides the packed codes.  Without double quantization `absmax` is the float32
    constant of each block; with it, `absmax` holds their uint8 codes and `offset`, `nested_absmax` and
    `nested_code` the second level.  shape/dtype are the original tensor's."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor                         # (num_blocks,) float32, or uint8 with double quantization
    offset: torch.Tensor | None = None           # () float32: mean of the absmax constants
    nested_absmax: torch.Tensor | None = None    # (ceil(num_blocks / 256),) float32
    nested_code: torch.Tensor | None = field(default=None, repr=False)  # (256,) float32: dynamic_map()

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"NF4State.dtype must be one of {_names(DTYPES)}, got {self.dtype}")
        _check_blocksize(self.blocksize)
        if self.numel == 0:
            raise ValueError(f"NF4State.shape {self.shape} has no elements")
        want = (torch.uint8 if self.double_quant else torch.float32, (self.num_blocks,))
        if (self.absmax.dtype, tuple(self.absmax.shape)) != want:
            raise ValueError(f"NF4State.absmax must be {want[0]} of shape {want[1]} for shape {self.shape} at "
                             f"blocksize {self.blocksize}, got {self.absmax.dtype} {tuple(self.absmax.shape)}")
        nested = (self.offset, self.nested_absmax, self.nested_code)
        if self.double_quant:
            if any(t is None for t in nested):
                raise ValueError("double quantization needs offset, nested_absmax and nested_code together")
            rows = -(-self.num_blocks // NESTED_BLOCKSIZE)
            for name, t, shp in (("offset", self.offset, ()), ("nested_absmax", self.nested_absmax, (rows,)),
                                 ("nested_code", self.nested_code, (256,))):
                if t.dtype != torch.float32 or tuple(t.shape) != shp:
                    raise ValueError(f"NF4State.{name} must be float32 of shape {shp}, got {t.dtype} "
                                     f"{tuple(t.shape)}")
        elif any(t is not None for t in nested):
            raise ValueError("offset/nested_absmax/nested_code are only used with uint8 (double-quantized) absmax")

    quant_type = "nf4"

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state's tensors by name (only those present)."""
        names = ("absmax", "offset", "nested_absmax", "nested_code")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes of every state tensor (absmax, and with double quantization offset, nested absmax and code)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def block_absmax(self) -> torch.Tensor:
        """The float32 scale of each block (num_blocks,), undoing double quantization if used."""
        if not self.double_quant:
            return self.absmax
        values = self.nested_code[self.absmax.long()]                       # (num_blocks,)
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: values.numel()]
        return values * scale + self.offset

    def to(self, device) -> "NF4State":
        return NF4State(self.shape, self.dtype, self.blocksize, **{n: t.to(device) for n, t in self.tensors().items()})

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): a dict of tensors (for safetensors) and a JSON-able dict; from_tensors inverts it."""
        meta = {"quant_type": "nf4", "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "blocksize": self.blocksize, "double_quant": self.double_quant}
        return dict(self.tensors()), meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "NF4State":
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"not an NF4 state: quant_type is {meta.get('quant_type')!r}")
        dtypes = {str(d).removeprefix("torch."): d for d in DTYPES}
        if meta.get("dtype") not in dtypes:
            raise ValueError(f"NF4 state dtype must be one of {sorted(dtypes)}, got {meta.get('dtype')!r}")
        want = {"absmax", "offset", "nested_absmax", "nested_code"} if meta.get("double_quant") else {"absmax"}
        if set(tensors) != want:
            raise ValueError(f"NF4 state tensors must be {sorted(want)}; missing {sorted(want - set(tensors))}, "
                             f"unexpected {sorted(set(tensors) - want)}")
        return cls(tuple(meta["shape"]), dtypes[meta["dtype"]], int(meta["blocksize"]), **tensors)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Quantize w (any shape; float32/float16/bfloat16) to NF4.  Returns (packed (ceil(n/2),) uint8, state).
    Same bytes and constants as bitsandbytes' quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)."""
    _check_weight(w)
    _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    tables = _tables(w.device)
    with torch.no_grad():
        flat = w.detach().reshape(-1)
        n = flat.numel()
        full = n - n % blocksize
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
        if full:
            _quantize_blocks(flat[:full], blocksize, packed[: full // 2], absmax[: full // blocksize], tables)
        if full < n:
            _quantize_tail(flat[full:], packed[full // 2:], absmax[-1:], tables, full)
        if not double_quant:
            return packed, NF4State(tuple(w.shape), w.dtype, blocksize, absmax)
        codes, offset, nested_absmax = _quantize_absmax(absmax, tables)
        return packed, NF4State(tuple(w.shape), w.dtype, blocksize, codes, offset, nested_absmax, tables.code8.clone())


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
    tables = _tables(packed.device)
    with torch.no_grad():
        absmax = state.block_absmax()
        codes = packed.reshape(-1)
        out = torch.empty(n, dtype=dtype, device=packed.device)
        bs = state.blocksize
        full = n - n % bs
        if full:
            _dequantize_blocks(codes[: full // 2], absmax[: full // bs], bs, out[:full], tables)
        if full < n:
            tail = codes[full // 2:]
            q = torch.stack([tail >> 4, tail & 15], 1).reshape(-1)[: n - full].long()
            out[full:] = tables.levels[q] * absmax[-1]
    return out.view(state.shape)


# ---- the work, chunk by chunk ---------------------------------------------------------------------------------

def _step(n: int, blocksize: int, device: torch.device) -> int:
    chunk = _CHUNK if device.type == "cpu" else 1 << 24
    return min(n, max(blocksize, chunk // blocksize * blocksize))


def _quantize_blocks(x: torch.Tensor, bs: int, packed: torch.Tensor, absmax: torch.Tensor, t: _Tables) -> None:
    """x: (m·bs,) -> packed (m·bs/2,) uint8 and absmax (m,) float32, written in place."""
    n, step, dev = x.numel(), _step(x.numel(), bs, x.device), x.device
    s_buf, y_buf, mid_buf = (torch.empty(step, dtype=torch.float32, device=dev) for _ in range(3))
    x_buf = torch.empty(step, dtype=torch.float32, device=dev) if x.dtype != torch.float32 else None
    idx_buf = torch.empty(step, dtype=torch.int32, device=dev)
    q_buf = torch.empty(step, dtype=torch.uint8, device=dev)
    gt_buf = torch.empty(step, dtype=torch.bool, device=dev)
    for start in range(0, n, step):
        stop = min(start + step, n)
        c = stop - start
        xc = x[start:stop] if x_buf is None else x_buf[:c].copy_(x[start:stop])   # fp16/bf16 -> fp32: exact
        xb, sb = xc.view(-1, bs), s_buf[:c].view(-1, bs)
        a = absmax[start // bs: stop // bs]
        torch.amax(torch.abs(xb, out=sb), dim=1, out=a)                          # (c/bs,)
        _check_finite(a, x, 0)
        inv = a.clamp(min=_MIN_SCALE).reciprocal_()
        s = torch.mul(xb, inv[:, None], out=sb).view(-1)                          # (c,) in [-1, 1]
        q = _levels(s, t, q_buf[:c], y_buf[:c], idx_buf[:c], mid_buf[:c], gt_buf[:c])
        torch.add(q[1::2], q[0::2], alpha=16, out=packed[start // 2: stop // 2])  # high nibble first


def _levels(s, t: _Tables, q, y, idx, mid, gt) -> torch.Tensor:
    """q[i] = #{NF4 midpoints < s[i]} (uint8), through the 33 cells of width 1/16 (module docstring)."""
    torch.add(s, _MAGIC, out=y)
    torch.sub(y.view(torch.int32), _MAGIC_INDEX, out=idx)                        # round(16 s) + 16
    torch.index_select(t.below, 0, idx, out=q)
    torch.index_select(t.midpoint, 0, idx, out=mid)
    return q.add_(torch.gt(s, mid, out=gt))


def _quantize_tail(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, t: _Tables, offset: int) -> None:
    """The short last block (r < blocksize values): bitsandbytes clamps its absmax and divides."""
    x = x.float()
    a = x.abs().amax().clamp(min=_MIN_SCALE)
    _check_finite(a, x, offset)
    absmax.copy_(a.reshape(1))
    r = x.numel()
    q = _levels(x / a, t, *(torch.empty(r, dtype=d, device=x.device)
                            for d in (torch.uint8, torch.float32, torch.int32, torch.float32, torch.bool)))
    if r % 2:
        q = torch.cat([q, q.new_full((1,), _ZERO_CODE)])
    torch.add(q[1::2], q[0::2], alpha=16, out=packed)


def _dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, bs: int, out: torch.Tensor, t: _Tables) -> None:
    """packed (m·bs/2,) uint8, absmax (m,) -> out (m·bs,) in out's dtype, written in place."""
    n, step, dev = out.numel(), _step(out.numel(), bs, out.device), out.device
    idx_buf = torch.empty(step // 2, dtype=torch.int32, device=dev)
    f_buf = torch.empty(step, dtype=torch.float32, device=dev) if out.dtype != torch.float32 else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        c = stop - start
        idx = idx_buf[: c // 2].copy_(packed[start // 2: stop // 2])
        dst = out[start:stop] if f_buf is None else f_buf[:c]
        torch.index_select(t.pairs, 0, idx, out=dst.view(torch.float64))          # both levels of each byte
        dst.view(-1, bs).mul_(absmax[start // bs: stop // bs, None])              # NF4[q] · absmax in fp32
        if f_buf is not None:
            out[start:stop].copy_(dst)                                            # one rounding to fp16/bf16


def _quantize_absmax(absmax: torch.Tensor, t: _Tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: absmax (m,) float32 -> (codes (m,) uint8, offset (), nested absmax (ceil(m/256),))."""
    offset = absmax.mean()
    x = absmax - offset
    m, rows = x.numel(), -(-x.numel() // NESTED_BLOCKSIZE)
    xb = torch.cat([x, x.new_zeros(rows * NESTED_BLOCKSIZE - m)]).view(rows, NESTED_BLOCKSIZE)  # zeros: no effect
    a = xb.abs().amax(1)                                                         # (rows,)
    inv = torch.where(a == 0, torch.zeros_like(a), a.reciprocal())
    v = (xb * inv[:, None]).clamp_(-1, 1)
    k = v.add_(1.0).mul_(0.5).mul_(_LUT8 - 1).add_(0.5).to(torch.int64)        # trunc(((v+1)·0.5)·65535 + 0.5)
    codes = t.lut8[k]
    codes[a == 0] = 0                                                            # bitsandbytes: a zero block -> 0
    return codes.reshape(-1)[:m].contiguous(), offset, a


# ---- argument checks ------------------------------------------------------------------------------------------

def _check_finite(absmax: torch.Tensor, x: torch.Tensor, offset: int) -> None:
    """amax propagates NaN and Inf, so checking the block constants checks every value (x starts at `offset`
    of the flattened tensor)."""
    if not bool(torch.isfinite(absmax).all()):
        bad = torch.nonzero(~torch.isfinite(x))[0].item()
        raise ValueError(f"cannot quantize a tensor with NaN/Inf: element {offset + bad} (flattened) is "
                         f"{x[bad].item()}")


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 takes a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in DTYPES:
        raise TypeError(f"quantize_nf4 takes {_names(DTYPES)} tensors (as bitsandbytes), got {w.dtype}; "
                        f"convert it first, e.g. w.float()")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if w.device.type == "meta":
        raise ValueError("cannot quantize a tensor on the meta device: it has no values; load the weights first")


def _check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize!r}")
