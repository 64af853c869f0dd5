"""The one table of tensor dtypes FastServe knows by name: in specs, on the wire, in reports.

Names are torch's without the ``torch.`` prefix. Specs may declare any of them; the wire carries
all of them (bfloat16 as raw bytes, numpy having no bfloat16).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``."""
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (torch's own name for a dtype outside the table)."""
    return _NAMES.get(dtype) or str(dtype).removeprefix("torch.")
