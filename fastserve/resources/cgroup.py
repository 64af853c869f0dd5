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
    when it has no quota: the smallest quota of its group and the groups above it (a limit
    on a parent, such as a systemd slice or a pod, holds for every group below)."""
    v2 = _v2_dir(root, self_file)
    if v2 is not None:
        return _least(_v2_quota(d) for d in _upwards(v2, root))
    v1 = _v1_dir(root, self_file, "cpu")
    return _least(_v1_quota(d) for d in _upwards(v1, v1 and _mount_of(v1, root)))


def memory_limit(root: Path = ROOT, self_file: Path = SELF) -> int | None:
    """The bytes this process's group may use, or None when it has no limit: the smallest
    limit of its group and the groups above it."""
    v2 = _v2_dir(root, self_file)
    if v2 is not None:
        return _least(_positive(_read(d, "memory.max") or "") for d in _upwards(v2, root))
    v1 = _v1_dir(root, self_file, "memory")
    limits = (_positive(_read(d, "memory.limit_in_bytes") or "")
              for d in _upwards(v1, v1 and _mount_of(v1, root)))
    return _least(x if x is not None and x < _V1_UNLIMITED else None for x in limits)


def _v2_quota(directory: Path) -> float | None:
    parts = (_read(directory, "cpu.max") or "").split()
    return _ratio(parts[0], parts[1]) if len(parts) == 2 and parts[0] != "max" else None


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory, "cpu.cfs_quota_us"), _read(directory, "cpu.cfs_period_us")
    return _ratio(quota, period) if quota is not None and period is not None else None


def _least(values):
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _upwards(directory: Path | None, top: Path | None):
    """``directory``, then each parent up to ``top`` (a cgroup mount) included."""
    if directory is None or top is None:
        return
    top = top.resolve()
    d = directory.resolve()
    while d.is_relative_to(top):
        yield d
        if d == top:
            return
        d = d.parent


def _mount_of(directory: Path, root: Path) -> Path:
    """The v1 controller mount ``directory`` lies in (the child of ``root`` above it)."""
    d, root = directory.resolve(), root.resolve()
    while d.parent != root and d.parent != d:
        d = d.parent
    return d


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
