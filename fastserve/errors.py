"""One error hierarchy for FastServe.

Every error a user can cause or meet derives from :class:`FastServeError` and carries an exit
code, so the CLI turns any of them into one clear line and a non-zero exit instead of a traceback.
Messages say what happened, the offending value, and what to do.
"""

from __future__ import annotations

import math


class FastServeError(Exception):
    """Base of all FastServe errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class FileError(FastServeError):
    """A malformed input file: names the file, line and key when they are known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.reason = message
        where = []
        if file:
            where.append(str(file) + (f":{line}" if line else ""))
        elif line:
            where.append(f"line {line}")
        if key:
            where.append(f"key '{key}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class SpecError(FileError):
    """A graph spec is malformed."""

    exit_code = 2


class TrustError(SpecError):
    """A spec names Python code (a ``module:`` node or a ``source:`` factory) that the user has
    not trusted; or the trust file itself is malformed. See :mod:`fastserve.trust`."""


class GraphError(FastServeError):
    """A compiled graph is inconsistent (cycle, missing producer, shape/dtype mismatch)."""

    exit_code = 3


class CaptureError(FastServeError):
    """A torch module could not be captured into a graph."""

    exit_code = 3


class WeightsError(FastServeError):
    """Weights could not be loaded: missing file, missing tensor, wrong shape, bad hash."""

    exit_code = 4


class SizeError(FastServeError):
    """A byte size (``2GB``, ``512MiB``) could not be read; callers name the file or flag."""

    exit_code = 2


class PartitionError(FastServeError):
    """A graph could not be cut as asked (too many shards, infeasible memory caps, ...)."""

    exit_code = 5


class ValidationError(PartitionError):
    """Chained shards do not reproduce the unsharded graph's outputs."""


class InventoryError(FileError):
    """A host inventory file is malformed or inconsistent."""

    exit_code = 6


class ProfileError(FileError):
    """A profile file (``fastserve profile --out``) is malformed."""

    exit_code = 7


class PlanError(FastServeError):
    """No plan satisfies the constraints (e.g. the model does not fit in the cluster)."""

    exit_code = 7


class InputsError(FileError):
    """An inputs file (``fastserve run --input``) is unreadable or does not fit the graph."""

    exit_code = 8


class PlanFileError(FileError):
    """A plan file is malformed, damaged, or was made for another graph."""

    exit_code = 7


class EngineError(FastServeError):
    """The runtime failed: a rank raised, a handshake timed out, a message was refused."""

    exit_code = 8


class WireError(EngineError):
    """A message on the wire is malformed, truncated, oversized or of an unknown version.

    ``reason`` is a short fixed slug (``header``, ``shape``, ``meta``, ...) that ranks and the
    coordinator count rejected messages by; the message text carries the details."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        self.reason = reason
        super().__init__(message)


class RankError(EngineError):
    """An exception inside a rank, reported back with the rank, stage and node that raised it."""

    item = None  # the coordinator's work item that failed, when the error names one

    def __init__(self, message: str, *, rank: int | None = None, stage: int | None = None,
                 node: str | None = None) -> None:
        self.rank = rank
        self.stage = stage
        self.node = node
        where = []
        if rank is not None:
            where.append(f"rank {rank}")
        if stage is not None:
            where.append(f"stage {stage}")
        if node is not None:
            where.append(f"node '{node}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class RankDeadError(EngineError):
    """A rank process died or stopped answering within its timeout."""

    exit_code = 9

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        self.rank = rank
        super().__init__(message)




class ServiceConfigError(FileError):
    """A service config file (``fastserve serve --config``) is malformed."""

    exit_code = 2


class ServiceError(FastServeError):
    """The service cannot answer: overloaded, past a deadline, stopping, or not reachable.
    ``status`` is the HTTP status the front answers with."""

    exit_code = 10

    def __init__(self, message: str, status: int = 503, retry_after: float = 1.0) -> None:
        """``retry_after``: seconds after which a refused caller may try again (the
        Retry-After header of a 503)."""
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str] | None:
        """The HTTP headers of this error's answer: Retry-After on a 503, in whole seconds;
        on a 408 or 413, whose body was not read to its end, the connection is closed."""
        if self.status in (408, 413):
            return {"Connection": "close"}
        if self.status != 503:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
