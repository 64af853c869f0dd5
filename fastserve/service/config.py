"""The service config: what ``fastserve serve`` deploys and how it keeps it serving.

A YAML file (read with the safe loader; every error names the file, the line and the key)::

    spec: graphs/mlp.yaml       # a graph spec or a partition export directory
    plan: plan.json             # optional: run this plan ('fastserve plan SPEC --json'); each
                                # of its replicas is one replica of the service
    hosts: lab.yaml             # optional: the host inventory the plan places ranks on
    keys: keys/                 # the cluster keys, when hosts start ranks through agents
    trust_code: false           # the spec may name Python code (module:, source:)
    stages: 1                   # a pipeline of this many stages per replica
    threads: 1                  # torch threads per rank
    transport: null             # ipc | tcp (default: ipc, tcp when hosts are elsewhere)
    replicas:
      policy: static            # static | dynamic | hybrid (fastserve.resources.policies)
      min: 1                    # static: the replicas; hybrid: the floor
      max: 2                    # dynamic and hybrid: the most replicas
      interval_s: 1.0           # how often the policy looks at the load
      cooldown: 3               # policy steps after a change before scaling up again
      patience: 5               # policy steps of low load before scaling down
      widen: false              # meet the load in the fewest ranks: more ranks for a
                                # pipeline's bottleneck stage where they pay more than
                                # replicas (fastserve.resources.widening); not generation
    batching:
      max_batch: 8              # samples per batch sent to a replica
      max_wait_ms: 2            # how long the first request of a batch waits for others
    limits:
      max_queue: 256            # requests admitted and waiting; beyond: 503 + Retry-After
      queue_budget_ms: 0        # 503 too when the requests queued and running would take
                                # longer (measured batch cost); 0: deadline_s
      deadline_s: 30            # a request not answered by then gets 504
      hang_s: 3                 # a rank silent to health checks this long is restarted
      restart_budget: 5         # restarts in a row without a success before a replica gives up
      attempts: 3               # runs of a request whose replica failed, before a 503
      max_body_bytes: 67108864  # the largest request body the HTTP front reads
      header_timeout_s: 10      # a request's line and headers must arrive within this, and
      body_timeout_s: 60        # its body within this after them: slow clients are cut off
    generation:
      enabled: false            # serve /v1/completions and /v1/chat/completions (a causal LM
                                # of the op library) instead of /v1/infer
      scheduler: fcfs           # fcfs | mlfq (skip-join MLFQ)
      max_seqs: 8               # sequences per micro-batch
      max_tokens: 256           # the most new tokens one request may ask for
      tokenizer: null           # a transformers tokenizer directory; default UTF-8 bytes
    listen: 127.0.0.1:8000
    token_file: service.token   # management routes (scale, drain, stop) need this token

Relative paths are relative to the config file. The same fields are the keyword arguments of
:class:`ServiceConfig`, so a config can be built in Python too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fastserve.errors import ServiceConfigError
from fastserve.generate.scheduler import SCHEDULERS
from fastserve.units import host_port
from fastserve.yamlio import describe, line_of, read_text, read_yaml

POLICIES = ("static", "dynamic", "hybrid")


@dataclass(frozen=True)
class Replicas:
    policy: str = "static"
    min: int = 1
    max: int = 1
    interval_s: float = 1.0
    cooldown: int = 3
    patience: int = 5
    widen: bool = False


@dataclass(frozen=True)
class Batching:
    max_batch: int = 8
    max_wait_ms: float = 2.0


@dataclass(frozen=True)
class Limits:
    max_queue: int = 256
    queue_budget_ms: float = 0.0
    deadline_s: float = 30.0
    hang_s: float = 3.0
    restart_budget: int = 5
    attempts: int = 3
    max_body_bytes: int = 64 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


@dataclass(frozen=True)
class Generation:
    enabled: bool = False
    scheduler: str = "fcfs"
    max_seqs: int = 8
    max_tokens: int = 256
    tokenizer: str | None = None


@dataclass(frozen=True)
class ServiceConfig:
    spec: str
    trust_code: bool = False
    stages: int = 1
    threads: int = 1
    transport: str | None = None  # None: ipc on one machine, tcp when hosts are elsewhere
    replicas: Replicas = field(default_factory=Replicas)
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)
    generation: Generation = field(default_factory=Generation)
    listen: str = "127.0.0.1:8000"
    token_file: str | None = None
    plan: str | None = None
    hosts: str | None = None
    keys: str | None = None

    def __post_init__(self) -> None:
        check_config(self)


# (type, lowest allowed value) of every number; a bool is not accepted where a number is
_NUMBERS: dict[str, tuple[type, float]] = {
    "stages": (int, 1), "threads": (int, 1),
    "min": (int, 0), "max": (int, 1), "interval_s": (float, 0.05), "cooldown": (int, 0),
    "patience": (int, 1), "max_batch": (int, 1), "max_wait_ms": (float, 0.0),
    "max_queue": (int, 1), "queue_budget_ms": (float, 0.0), "deadline_s": (float, 0.01),
    "hang_s": (float, 0.5), "restart_budget": (int, 0), "attempts": (int, 1),
    "max_body_bytes": (int, 1024), "header_timeout_s": (float, 0.1),
    "body_timeout_s": (float, 0.1),
    "max_seqs": (int, 1), "max_tokens": (int, 1),
}
_SECTIONS = {"replicas": Replicas, "batching": Batching, "limits": Limits,
             "generation": Generation}


def check_config(cfg: ServiceConfig) -> None:
    """Refuse values no service can run with, naming the key (``section.key``)."""

    def fail(message: str, key: str) -> None:
        raise ServiceConfigError(message, key=key)

    values: list[tuple[str | None, str, Any]] = [(None, f.name, getattr(cfg, f.name))
                                                 for f in fields(cfg)]
    for name in _SECTIONS:
        part = getattr(cfg, name)
        values += [(name, f.name, getattr(part, f.name)) for f in fields(part)]
    for section, key, value in values:
        full = f"{section}.{key}" if section else key
        if key in _NUMBERS:
            kind, low = _NUMBERS[key]
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                fail(f"expected {'an integer' if kind is int else 'a number'}, got "
                     f"{describe(value)}", full)
            if value != value or value < low or value > 1e12:  # NaN compares false
                fail(f"must be between {low} and 1e12, got {value}", full)
    if not isinstance(cfg.spec, str) or not cfg.spec:
        fail(f"expected the path of a graph spec or export, got {describe(cfg.spec)}", "spec")
    if not isinstance(cfg.trust_code, bool):
        fail(f"expected true or false, got {describe(cfg.trust_code)}", "trust_code")
    if cfg.transport not in (None, "ipc", "tcp"):
        fail(f"expected ipc or tcp, got {describe(cfg.transport)}", "transport")
    for key in ("plan", "hosts", "keys"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, str) or not value):
            fail(f"expected a path, got {describe(value)}", key)
    r = cfg.replicas
    if r.policy not in POLICIES:
        fail(f"expected one of {', '.join(POLICIES)}, got {describe(r.policy)}",
             "replicas.policy")
    if r.policy == "static" and r.min < 1:
        fail("a static service needs at least one replica", "replicas.min")
    if r.policy != "static" and r.max < max(r.min, 1):
        fail(f"max ({r.max}) is below min ({r.min})", "replicas.max")
    if not isinstance(r.widen, bool):
        fail(f"expected true or false, got {describe(r.widen)}", "replicas.widen")
    if r.widen and cfg.generation.enabled is True:
        fail("a generating service cannot widen stages: each sequence's KV cache lives on one "
             "rank per stage, and a widened stage shares its steps among its ranks",
             "replicas.widen")
    g = cfg.generation
    if not isinstance(g.enabled, bool):
        fail(f"expected true or false, got {describe(g.enabled)}", "generation.enabled")
    if g.scheduler not in SCHEDULERS:
        fail(f"expected one of {', '.join(SCHEDULERS)}, got {describe(g.scheduler)}",
             "generation.scheduler")
    if g.tokenizer is not None and (not isinstance(g.tokenizer, str) or not g.tokenizer):
        fail(f"expected a tokenizer directory, got {describe(g.tokenizer)}",
             "generation.tokenizer")
    parse_listen(cfg.listen, lambda m: fail(m, "listen"))
    if cfg.token_file is not None and (not isinstance(cfg.token_file, str) or not cfg.token_file):
        fail(f"expected the path of a token file, got {describe(cfg.token_file)}", "token_file")


def parse_listen(text: Any, fail=None) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ``fail(message)`` (or ServiceConfigError) otherwise."""
    def refuse(message: str):
        if fail is not None:
            fail(message)
        raise ServiceConfigError(message, key="listen")

    if not isinstance(text, str) or ":" not in text:
        refuse(f"expected HOST:PORT (127.0.0.1:8000), got {describe(text)}")
    try:
        host, port = host_port(text)
    except ValueError as e:
        refuse(str(e))
    return host.strip("[]"), port


def load_config(path: str | os.PathLike) -> ServiceConfig:
    """Read and check a service config file."""
    file = str(path)
    doc = read_yaml(read_text(file, "service config", ServiceConfigError), file,
                    ServiceConfigError)
    if not isinstance(doc, dict):
        raise ServiceConfigError(f"expected a mapping of settings, got {describe(doc)}",
                                 file=file, line=line_of(doc))
    known = {f.name for f in fields(ServiceConfig)}
    args: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise ServiceConfigError(f"unknown setting (known: {', '.join(sorted(known))})",
                                     file=file, line=line_of(doc, key), key=str(key))
        if key in _SECTIONS:
            args[key] = _section(key, value, file, doc)
        else:
            args[key] = value
    if "spec" not in args:
        raise ServiceConfigError("no 'spec': name the graph spec or export to serve",
                                 file=file, line=line_of(doc), key="spec")
    base = Path(file).parent
    for key in ("spec", "token_file", "plan", "hosts", "keys"):
        if isinstance(args.get(key), str) and args[key] and not os.path.isabs(args[key]):
            args[key] = str(base / args[key])
    g = args.get("generation")
    if g is not None and isinstance(g.tokenizer, str) and g.tokenizer and \
            not os.path.isabs(g.tokenizer):
        args["generation"] = replace(g, tokenizer=str(base / g.tokenizer))
    try:
        return ServiceConfig(**args)
    except ServiceConfigError as e:  # the same error, with the file and the key's line
        section, _, leaf = (e.key or "").rpartition(".")
        holder = doc.get(section) if section else doc
        raise ServiceConfigError(e.reason, file=file, line=line_of(holder, leaf),
                                 key=e.key) from None


def _section(name: str, value: Any, file: str, doc: Any) -> Any:
    kind = _SECTIONS[name]
    if not isinstance(value, dict):
        raise ServiceConfigError(f"expected a mapping, got {describe(value)}", file=file,
                                 line=line_of(doc, name), key=name)
    known = {f.name for f in fields(kind)}
    for key in value:
        if key not in known:
            raise ServiceConfigError(f"unknown setting (known: {', '.join(sorted(known))})",
                                     file=file, line=line_of(value, key), key=f"{name}.{key}")
    return kind(**value)
