"""Engine: the wire format, rank processes, the coordinator and the local launcher."""

from fastserve.engine.deployment import Deployment, Layout
from fastserve.engine.wire import Message, decode, encode

__all__ = ["Deployment", "Layout", "Message", "decode", "encode"]
