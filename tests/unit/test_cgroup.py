"""A container's CPU quota and memory limit cap the cores and memory FastServe plans with: read
from cgroup v2 and v1 trees built here, from junk in their files, and from a real v1 group with a
quota when this machine lets us make one (root)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fastserve.resources import cgroup, inventory
from fastserve.resources.cgroup import cpu_quota, memory_limit


def _v2(tmp_path: Path, files: dict[str, str], group: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / group.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for name, text in files.items():
        (root / group.lstrip("/") / name).write_text(text)
    self_file = tmp_path / "self"
    self_file.write_text(f"0::{group}\n")
    return root, self_file


def _v1(tmp_path: Path, cpu: dict[str, str], memory: dict[str, str],
        mount: str = "cpu") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for sub, files in ((mount, cpu), ("memory", memory)):
        (root / sub).mkdir(parents=True)
        for name, text in files.items():
            (root / sub / name).write_text(text)
    self_file = tmp_path / "self"
    self_file.write_text("12:memory:/\n11:cpu,cpuacct:/\n1:name=systemd:/init.scope\n")
    return root, self_file


@pytest.mark.parametrize("text, cores", [("250000 100000\n", 2.5), ("max 100000\n", None),
                                         ("50000 100000", 0.5), ("100000", None),
                                         ("-1 100000", None), ("abc def", None), ("", None),
                                         ("0 100000", None), ("100000 0", None)])
def test_the_v2_cpu_quota(tmp_path, text, cores):
    assert cpu_quota(*_v2(tmp_path, {"cpu.max": text})) == cores


@pytest.mark.parametrize("text, limit", [("max\n", None), ("4294967296\n", 4 << 30),
                                         ("0", None), ("-5", None), ("lots", None)])
def test_the_v2_memory_limit(tmp_path, text, limit):
    assert memory_limit(*_v2(tmp_path, {"memory.max": text})) == limit


def test_v2_reads_the_group_this_process_is_in_and_stays_inside_the_mount(tmp_path):
    root, self_file = _v2(tmp_path, {"cpu.max": "max 100000"})
    group = root / "kubepods" / "pod1"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("200000 100000")
    self_file.write_text("0::/kubepods/pod1\n")
    assert cpu_quota(root, self_file) == 2.0
    # a path that is not visible here (a container's own group sits at its mount's root)
    self_file.write_text("0::/elsewhere/pod9\n")
    assert cpu_quota(root, self_file) is None  # the root's "max"
    # a path out of the mount is not followed
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "cpu.max").write_text("100000 100000")
    self_file.write_text("0::/../outside\n")
    assert cpu_quota(root, self_file) is None


def test_a_limit_on_a_parent_group_holds_below_it(tmp_path):
    # a systemd slice or a pod sets the limit; the process runs in a group below it
    root, self_file = _v2(tmp_path, {"cpu.max": "max 100000", "memory.max": "max"})
    for group, cpu, memory in (("slice", "150000 100000", "1073741824"),
                               ("slice/svc", "max 100000", "4294967296")):
        (root / group).mkdir()
        (root / group / "cpu.max").write_text(cpu)
        (root / group / "memory.max").write_text(memory)
    self_file.write_text("0::/slice/svc\n")
    assert cpu_quota(root, self_file) == 1.5
    assert memory_limit(root, self_file) == 1 << 30
    # v1: the parent's quota, the child's memory limit (the smaller of each)
    v1 = tmp_path / "v1"
    for sub, files in (("cpu,cpuacct/pod", {"cpu.cfs_quota_us": "50000",
                                            "cpu.cfs_period_us": "100000"}),
                       ("cpu,cpuacct/pod/ctr", {"cpu.cfs_quota_us": "-1",
                                                "cpu.cfs_period_us": "100000"}),
                       ("memory/pod", {"memory.limit_in_bytes": "9223372036854771712"}),
                       ("memory/pod/ctr", {"memory.limit_in_bytes": "2147483648"})):
        (v1 / sub).mkdir(parents=True)
        for name, text in files.items():
            (v1 / sub / name).write_text(text)
    self_file.write_text("4:memory:/pod/ctr\n3:cpu,cpuacct:/pod/ctr\n")
    assert cpu_quota(v1, self_file) == 0.5
    assert memory_limit(v1, self_file) == 2 << 30


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_the_v1_quota_and_limit(tmp_path, mount):
    cpu = {"cpu.cfs_quota_us": "150000\n", "cpu.cfs_period_us": "100000\n"}
    root, self_file = _v1(tmp_path, cpu, {"memory.limit_in_bytes": "2147483648\n"}, mount)
    assert cpu_quota(root, self_file) == 1.5
    assert memory_limit(root, self_file) == 2 << 30


def test_v1_without_limits(tmp_path):
    # what an unconfined v1 group holds: quota -1 and a huge page-aligned "limit"
    root, self_file = _v1(tmp_path, {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"},
                          {"memory.limit_in_bytes": "9223372036854771712\n"})
    assert cpu_quota(root, self_file) is None
    assert memory_limit(root, self_file) is None


def test_missing_or_junk_files_mean_no_limit(tmp_path):
    assert cpu_quota(tmp_path / "none", tmp_path / "none") is None
    assert memory_limit(tmp_path / "none", tmp_path / "none") is None
    root, self_file = _v1(tmp_path, {"cpu.cfs_quota_us": "\xff\xfe"}, {})
    (root / "cpu" / "cpu.cfs_quota_us").write_bytes(b"\xff\xfe\x00")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpu_quota(root, self_file) is None  # not UTF-8
    self_file.write_bytes(b"\x00\xff" * 100)
    assert cpu_quota(root, self_file) is None
    self_file.write_text("11:cpu,cpuacct:/\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("1" * 10_000)  # no quota is this long
    assert cpu_quota(root, self_file) is None
    (root / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    assert cpu_quota(root, self_file) == 2.0  # (the same files, readable: the check can fail)


@pytest.mark.parametrize("quota, cores", [(None, "all"), (0.5, 1), (1.9, 1), (1000.0, "all")])
def test_machine_cores_is_capped_by_the_quota_in_whole_cores(monkeypatch, quota, cores):
    monkeypatch.setattr(inventory, "cpu_quota", lambda: quota)
    visible = len(os.sched_getaffinity(0))
    assert inventory.machine_cores() == (visible if cores == "all" else cores)


def test_machine_memory_is_capped_by_the_limit(monkeypatch):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(inventory, "memory_limit", lambda: 1 << 30)
    assert inventory.machine_memory() == min(physical, 1 << 30)
    monkeypatch.setattr(inventory, "memory_limit", lambda: None)
    assert inventory.machine_memory() == physical
    assert inventory.local_inventory().hosts[0].memory_bytes == physical


_REPORT = ("from fastserve.resources.inventory import local_inventory as l; "
           "h = l().hosts[0]; print(h.cores, h.memory_bytes)")


def test_a_process_in_a_real_group_with_a_quota_plans_with_it():
    mount = cgroup.ROOT / "cpu"
    if os.geteuid() != 0 or not (mount / "cpu.cfs_quota_us").exists():
        pytest.skip("making a cgroup v1 group with a CPU quota needs root and a v1 cpu mount")
    group = mount / f"fastserve-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")  # one core's time
    except OSError as e:
        pytest.skip(f"this machine does not let us make a cgroup: {e}")
    try:
        # the shell joins the group, then becomes Python
        run = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                              sys.executable, _REPORT], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]
        cores, _memory = map(int, run.stdout.split())
        assert cores == 1
    finally:
        group.rmdir()
