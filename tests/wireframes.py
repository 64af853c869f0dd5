"""Header frames of hand-made (often hostile) messages, written as one map for readability:
``{"v", "kind", "tensors"}`` go to the layout and ``{"req", "mb", "meta"}`` to the ids, in that
order; a missing key shortens its part and any other key lengthens the layout."""

from __future__ import annotations

import msgpack

LAYOUT = ("v", "kind", "tensors")
IDS = ("req", "mb", "meta")


def header_frames(fields: dict) -> list[bytes]:
    layout = [fields[k] for k in LAYOUT if k in fields]
    layout += [v for k, v in fields.items() if k not in LAYOUT + IDS]
    ids = [fields[k] for k in IDS if k in fields]
    return [header(msgpack.packb(layout, use_bin_type=True), msgpack.packb(ids, use_bin_type=True))]


def header(layout: bytes, ids: bytes, inline: bytes = b"") -> bytes:
    """A header frame of the given layout and ids bytes (and tensor bytes after them)."""
    return len(layout).to_bytes(4, "little") + layout + len(ids).to_bytes(4, "little") + ids + \
        inline
