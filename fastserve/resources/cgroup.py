"""The CPU quota and memory limit of the control group this process runs in (a container's
limits), from cgroup v2 or v1.

A container sees every core and all of the host's memory in ``sched_getaffinity`` and
``/proc``, yet may run on a quota of two cores and be killed past 4 GiB. Planning for what the
host has would then start more rank threads than the quota lets run at once (each stalls until
the next period, and a rank that polls burns the quota), and size KV caches to memory the
container may not use. So the machine's cores and memory are capped by what is read here.

The files are read defensively: a value that is missing or cannot be parsed means no limit
(the host's figure stands), never an error.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as a huge page-aligned number rather than a word
_V1_UNLIMITED = 1 << 62


def cpu_quota(root: Path = ROOT, self_file: Path = SELF) -> float | None:
    """The cores this process may use per period (2.5: two and a half cores' time), or None
    when it has no quota."""
    v2 = _read(_v2_dir(root, self_file), "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    v1 = _v1_dir(root, self_file, "cpu")
    quota, period = _read(v1, "cpu.cfs_quota_us"), _read(v1, "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota, period)


def memory_limit(root: Path = ROOT, self_file: Path = SELF) -> int | None:
    """The bytes this process's group may use, or None when it has no limit."""
    v2 = _read(_v2_dir(root, self_file), "memory.max")
    if v2 is not None:
        return _positive(v2)
    limit = _positive(_read(_v1_dir(root, self_file, "memory"), "memory.limit_in_bytes") or "")
    return limit if limit is not None and limit < _V1_UNLIMITED else None


def _ratio(quota: str, period: str) -> float | None:
    q, p = _positive(quota), _positive(period)
    return q / p if q is not None and p is not None else None


def _positive(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _read(directory: Path | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        with open(directory / name, encoding="utf-8") as f:
            text = f.read(65)
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) <= 64 else None  # one short line; anything longer is not ours


def _groups(self_file: Path) -> dict[str, str]:
    """Controller -> this process's group path, from /proc/self/cgroup (``""`` names the v2
    unified hierarchy)."""
    try:
        lines = self_file.read_text()[:65536].splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    groups: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                groups.setdefault(controller, parts[2])
    return groups


def _inside(root: Path, mount: Path, group: str | None) -> Path | None:
    """The group's directory under ``mount``: its path, or the mount itself when the path is
    not visible there (a container sees its own group at the root of its mount)."""
    if not mount.is_dir():
        return None
    if group:
        candidate = mount / group.lstrip("/")
        try:  # a path of "../" parts must not leave the cgroup mount
            if candidate.resolve().is_relative_to(root.resolve()) and candidate.is_dir():
                return candidate
        except OSError:
            pass
    return mount


def _v2_dir(root: Path, self_file: Path) -> Path | None:
    groups = _groups(self_file)
    if "" not in groups or not (root / "cgroup.controllers").exists():
        return None  # not a pure v2 hierarchy: v1 (or a hybrid whose cpu controller is v1)
    return _inside(root, root, groups[""])


def _v1_dir(root: Path, self_file: Path, controller: str) -> Path | None:
    groups = _groups(self_file)
    # "cpu" is usually a link to the "cpu,cpuacct" mount, but not on every distribution
    mounts = [root / controller] + ([root / "cpu,cpuacct"] if controller == "cpu" else [])
    for mount in mounts:
        if mount.is_dir():
            return _inside(root, mount, groups.get(controller))
    return None
