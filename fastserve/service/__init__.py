"""The service manager: a deployment kept serving behind an HTTP API (``fastserve serve``).

:class:`Service` runs replicas of a planned graph, batches concurrent requests into them,
restarts a replica whose rank died or hung and runs its requests again, and scales replicas by
an allocation policy. :mod:`fastserve.service.http` puts starlette in front of it.
"""

from fastserve.service.config import Batching, Limits, Replicas, ServiceConfig, load_config
from fastserve.service.service import Service

__all__ = ["Batching", "Limits", "Replicas", "Service", "ServiceConfig", "load_config"]
