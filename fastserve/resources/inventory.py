"""Cluster inventories: the hosts a plan may use, read from YAML and validated.

    name: lab
    defaults: {bandwidth: 1.25GB, latency_us: 100}   # per-second bandwidth between hosts
    hosts:
      - {name: a, address: 10.0.0.1, cores: 32, memory: 256GiB, speed: 1.0}
      - name: b
        address: 10.0.0.2
        cores: 16
        memory: 128GiB
        speed: 0.6                                     # relative to the fastest kind of core
        devices: [{name: gpu0, kind: cuda, memory: 80GiB}]
    links:
      - {between: [a, b], bandwidth: 12.5GB, latency_us: 20}

A host at ``localhost``/``127.0.0.1`` may omit ``cores`` and ``memory``: they are read from this
machine, within its container's CPU quota and memory limit (:mod:`fastserve.resources.cgroup`). ``launcher`` says how a host's ranks start: ``local`` (subprocesses of the driver; the
default on this machine), ``agent`` (through ``fastserve agent`` on that host, at ``port``,
default 7301; the default for every other address) or ``ray`` (as Ray actors on the Ray node
that offers the resource ``host:<name>``). Sizes accept ``2GB``/``512MiB``/bytes. Errors name the file, the line and the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.resources.cgroup import cpu_quota, memory_limit
from fastserve.errors import InventoryError, SizeError
from fastserve.limits import DEFAULT_LIMITS, Limits
from fastserve.units import parse_bytes
from fastserve.yamlio import describe, line_of, read_text, read_yaml

LOCAL_ADDRESSES = frozenset({"localhost", "127.0.0.1", "::1"})
LAUNCHERS = ("local", "agent", "ray")
# ipc between processes of one machine, as `fastserve bench transport` measured a FastServe
# hop on a 2-core VM: 1-16 MiB at about 4 GB/s, a 4 KiB message in about 55 us
DEFAULT_BANDWIDTH = 4 * 1000 ** 3  # bytes/s
DEFAULT_LATENCY = 60e-6  # seconds


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    memory_bytes: int


@dataclass(frozen=True)
class Host:
    """One host. ``speed`` is relative (1.0 = the reference core); ``flops`` (per core per
    second) replaces it once measured by ``fastserve profile``."""

    name: str
    address: str
    cores: int
    memory_bytes: int
    speed: float = 1.0
    flops: float | None = None
    devices: tuple[Device, ...] = ()
    launcher: str = "local"  # how its ranks start: subprocesses here, its agent, or Ray actors
    port: int = 7301  # the agent's port (launcher: agent)

    @property
    def is_local(self) -> bool:
        return self.address in LOCAL_ADDRESSES

    @property
    def agent(self) -> str:
        """``address:port`` of the host's agent."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second
    latency: float  # seconds


@dataclass(frozen=True)
class Inventory:
    name: str
    hosts: tuple[Host, ...]
    default_link: Link = Link(DEFAULT_BANDWIDTH, DEFAULT_LATENCY)
    links: dict[frozenset[str], Link] = field(default_factory=dict)
    file: str | None = None

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InventoryError(f"no host '{name}' in inventory '{self.name}'", file=self.file)

    def link(self, a: str, b: str) -> Link:
        """The link between two hosts (a host to itself: the default local link)."""
        return self.links.get(frozenset((a, b)), self.default_link)


def machine_cores() -> int:
    """The cores this process may run on, within its container's CPU quota (whole cores, at
    least one: threads beyond the quota would only wait for the next period)."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def machine_memory() -> int:
    """This machine's memory, within its container's memory limit."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = memory_limit()
    return min(physical, limit) if limit is not None else physical


def is_loopback(address: str) -> bool:
    """An address of this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def valid_address(address: str) -> bool:
    """An IPv4 or IPv6 address, or a host name (RFC 1123 labels; all-numeric dotted names
    must be IPv4 addresses, so 999.1.2.3 is refused)."""
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        pass
    labels = address.rstrip(".").split(".")
    if len(address) > 253 or all(label.isdigit() for label in labels):
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def local_inventory() -> Inventory:
    """This machine alone, with detected cores and memory."""
    return Inventory("local", (Host("local", "localhost", machine_cores(), machine_memory()),))


def load_inventory(path: str | Path, limits: Limits | None = None) -> Inventory:
    """Read and validate a host inventory YAML file (``limits`` bounds the work it may cause)."""
    text = read_text(path, "host inventory", InventoryError, limits)
    return parse_inventory(read_yaml(text, str(path), InventoryError, limits), str(path),
                           limits)


class _Reader:
    def __init__(self, file: str | None, limits: Limits) -> None:
        self.file = file
        self.limits = limits

    def fail(self, msg: str, container: Any, key: Any, path: str) -> None:
        raise InventoryError(msg, file=self.file, line=line_of(container, key), key=path)

    def keys(self, m: Any, allowed: set[str], required: set[str], path: str,
             parent: Any = None, index: Any = None) -> None:
        """Check a mapping's keys; ``parent[index]`` is where it sits, for the line of a
        value that is not a mapping at all."""
        if not isinstance(m, dict):
            self.fail(f"expected a mapping, got {describe(m)}",
                      parent if parent is not None else m, index, path or "inventory")
        for k in m:
            if k not in allowed:
                self.fail(f"unknown key '{k}'; expected one of {', '.join(sorted(allowed))}",
                          m, k, f"{path}.{k}" if path else str(k))
        for k in sorted(required - set(m)):
            self.fail(f"missing required key '{k}'", m, None, f"{path}.{k}" if path else k)

    def size(self, m: dict, key: str, path: str) -> int:
        try:
            return parse_bytes(m[key], path)
        except SizeError as e:
            self.fail(str(e).removeprefix(f"{path}: "), m, key, path)
            raise AssertionError("unreachable")

    def number(self, m: dict, key: str, path: str, positive: bool = True) -> float:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and v <= 0) \
                or not math.isfinite(v) or abs(v) > self.limits.max_int:
            self.fail(f"expected a positive number up to {self.limits.max_int}, got "
                      f"{str(v)[:40]}", m, key, path)
        return float(v)

    def text(self, m: dict, key: str, path: str) -> str:
        v = m[key]
        if isinstance(v, (dict, list)) or v is None:
            self.fail(f"expected a name, got {describe(v)}", m, key, path)
        return str(v)


def parse_inventory(doc: Any, file: str | None = None, limits: Limits | None = None) -> Inventory:
    """Validate a raw inventory document."""
    r = _Reader(file, limits or DEFAULT_LIMITS)
    r.keys(doc, {"name", "defaults", "hosts", "links", "description"}, {"hosts"}, "")
    name = r.text(doc, "name", "name") if "name" in doc else \
        (Path(file).stem if file else "inventory")
    default = _link(r, doc.get("defaults") or {}, "defaults", Link(DEFAULT_BANDWIDTH,
                                                                    DEFAULT_LATENCY), doc,
                    "defaults")
    raw_hosts = doc["hosts"]
    if not isinstance(raw_hosts, list) or not raw_hosts:
        r.fail("expected a non-empty list of hosts", doc, "hosts", "hosts")
    hosts: list[Host] = []
    for i, h in enumerate(raw_hosts):
        path = f"hosts[{i}]"
        r.keys(h, {"name", "address", "cores", "memory", "speed", "flops", "devices",
                   "launcher", "port"}, {"name", "address"}, path, raw_hosts, i)
        host_name = r.text(h, "name", f"{path}.name")
        address = r.text(h, "address", f"{path}.address")
        if not valid_address(address):
            r.fail(f"'{address[:80]}' is not a host address: expected an IPv4 or IPv6 "
                   f"address or a host name", h, "address", f"{path}.address")
        if any(x.name == host_name for x in hosts):
            r.fail(f"duplicate host name '{host_name}'", h, "name", f"{path}.name")
        local = address in LOCAL_ADDRESSES
        for key in ("cores", "memory"):
            if key not in h and not local:
                r.fail(f"host '{host_name}' at {address} needs '{key}' (only local hosts "
                       f"are detected)", h, None, f"{path}.{key}")
        cores = int(r.number(h, "cores", f"{path}.cores")) if "cores" in h else machine_cores()
        memory = r.size(h, "memory", f"{path}.memory") if "memory" in h else machine_memory()
        speed = r.number(h, "speed", f"{path}.speed") if "speed" in h else 1.0
        flops = r.number(h, "flops", f"{path}.flops") if "flops" in h else None
        devices = []
        raw_devices = h.get("devices") or []
        if not isinstance(raw_devices, list):
            r.fail("expected a list of devices", h, "devices", f"{path}.devices")
        for j, d in enumerate(raw_devices):
            dpath = f"{path}.devices[{j}]"
            r.keys(d, {"name", "kind", "memory"}, {"name", "memory"}, dpath, raw_devices, j)
            devices.append(Device(r.text(d, "name", f"{dpath}.name"),
                                  r.text(d, "kind", f"{dpath}.kind") if "kind" in d else "cuda",
                                  r.size(d, "memory", f"{dpath}.memory")))
        launcher = r.text(h, "launcher", f"{path}.launcher") if "launcher" in h else \
            ("local" if local else "agent")
        if launcher not in LAUNCHERS:
            r.fail(f"unknown launcher '{launcher}'; expected one of {', '.join(LAUNCHERS)}",
                   h, "launcher", f"{path}.launcher")
        if launcher == "local" and not local:
            r.fail(f"host '{host_name}' at {address} is not this machine: its ranks start "
                   f"through its agent (launcher: agent)", h, "launcher", f"{path}.launcher")
        port = int(r.number(h, "port", f"{path}.port")) if "port" in h else 7301
        if not 0 < port < 65536 or ("port" in h and h["port"] != port):
            r.fail(f"expected a port from 1 to 65535, got {h['port']}", h, "port",
                   f"{path}.port")
        hosts.append(Host(host_name, address, cores, memory, speed, flops, tuple(devices),
                          launcher, port))
    names = {h.name for h in hosts}
    links: dict[frozenset[str], Link] = {}
    raw_links = doc.get("links") or []
    if not isinstance(raw_links, list):
        r.fail("expected a list of links", doc, "links", "links")
    for i, ln in enumerate(raw_links):
        path = f"links[{i}]"
        r.keys(ln, {"between", "bandwidth", "latency_us"}, {"between"}, path, raw_links, i)
        pair = ln["between"]
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(p, str) and p in names for p in pair)):
            r.fail(f"'between' must name two hosts of this inventory, got {str(pair)[:60]}",
                   ln, "between", f"{path}.between")
        links[frozenset(pair)] = _link(r, ln, path, default)
    return Inventory(name, tuple(hosts), default, links, file)


def _link(r: _Reader, m: dict, path: str, fallback: Link, parent: Any = None,
          index: Any = None) -> Link:
    r.keys(m, {"bandwidth", "latency_us", "between"}, set(), path, parent, index)
    bandwidth = r.size(m, "bandwidth", f"{path}.bandwidth") if "bandwidth" in m \
        else fallback.bandwidth
    latency = r.number(m, "latency_us", f"{path}.latency_us") * 1e-6 if "latency_us" in m \
        else fallback.latency
    return Link(float(bandwidth), latency)
