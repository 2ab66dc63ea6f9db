"""NF4State: what dequantizing NF4 codes needs besides the codes, and its plain-tensor form for files.

    absmax          (num_blocks,) float32: the scale of each block of `blocksize` consecutive values
    with double quantization instead:
    absmax          (num_blocks,) uint8: codes of (scale - offset) in the dynamic 8-bit code
    offset          () float32: the mean of the scales
    nested_absmax   (ceil(num_blocks / 256),) float32: the scale of each block of 256 codes
    nested_code     (256,) float32: the 8-bit code values (bitsandbytes' dynamic map)
    scale_b = nested_code[absmax_b] · nested_absmax[b // 256] + offset

shape and dtype are those of the quantized tensor; to_tensors() gives a dict of tensors (for safetensors) and a
JSON-able dict, from_tensors() the state back.  No pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["NF4State", "BLOCKSIZES", "NESTED_BLOCKSIZE", "DTYPES", "check_blocksize", "dtype_names"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
            raise ValueError(f"NF4State.dtype must be one of {dtype_names(DTYPES)}, got {self.dtype}")
        check_blocksize(self.blocksize)
        tensors = [t for t in (self.absmax, self.offset, self.nested_absmax, self.nested_code) if t is not None]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("NF4State's absmax/offset/nested_absmax/nested_code must be tensors")
        if len({t.device for t in tensors}) > 1:
            raise ValueError(f"NF4State tensors are on several devices ({sorted({str(t.device) for t in tensors})}); "
                             f"move them together with .to(device)")
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


def check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize!r}")


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
