"""Engine: the wire format, rank processes, the coordinator and the local launcher.

Names are re-exported lazily: a rank process imports ``fastserve.engine.rank`` and must be able
to arm its parent watch before torch and the rest of the engine are imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Deployment": "fastserve.engine.deployment", "Layout": "fastserve.engine.deployment",
            "Message": "fastserve.engine.wire", "decode": "fastserve.engine.wire",
            "encode": "fastserve.engine.wire"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastserve.engine' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
