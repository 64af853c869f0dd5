"""Host inventories: detection of the local host, validation errors with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastserve.errors import InventoryError
from fastserve.resources.inventory import load_inventory, local_inventory, machine_cores

ROOT = Path(__file__).resolve().parents[2]


def test_local_inventory_detects_this_machine():
    inv = load_inventory(ROOT / "runtime/hosts/local.yaml")
    (host,) = inv.hosts
    assert host.is_local and host.cores == machine_cores() and host.memory_bytes > 2**30
    assert local_inventory().hosts[0].cores == host.cores


def test_heterogeneous_cluster_example():
    inv = load_inventory(ROOT / "runtime/hosts/cluster8.yaml")
    assert len(inv.hosts) == 8 and len({h.speed for h in inv.hosts}) == 3
    assert inv.link("gpu-a", "gpu-b").bandwidth == 12.5e9
    assert inv.link("cpu-1", "old-2").bandwidth == 1.25e9
    assert inv.host("gpu-a").devices[0].memory_bytes == 80 * 2**30


@pytest.mark.parametrize("text,line,key,phrase", [
    ("hosts:\n  - {name: a, address: 10.0.0.1, cores: 4}\n", 2, "hosts[0].memory",
     "needs 'memory'"),
    ("hosts:\n  - {name: a, address: localhost, memory: lots}\n", 2, "hosts[0].memory",
     "cannot read 'lots' as a size"),
    ("hosts:\n  - {name: a, address: localhost, cores: -2}\n", 2, "hosts[0].cores",
     "expected a positive number"),
    ("hosts:\n  - {name: a, address: localhost}\n  - {name: a, address: localhost}\n", 3,
     "hosts[1].name", "duplicate host name"),
    ("hosts:\n  - {name: a, address: localhost, gpus: 2}\n", 2, "hosts[0].gpus",
     "unknown key 'gpus'"),
    ("hosts: []\n", 1, "hosts", "non-empty list"),
    ("hosts:\n  - {name: a, address: localhost}\nlinks:\n  - {between: [a, z]}\n", 4,
     "links[0].between", "must name two hosts"),
    ("hosts: [\n", 2, None, "invalid YAML"),
])
def test_malformed_inventories(tmp_path, text, line, key, phrase):
    path = tmp_path / "hosts.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    e = info.value
    assert phrase in str(e) and e.file == str(path) and e.line == line
    if key:
        assert e.key == key


def test_missing_inventory_file(tmp_path):
    with pytest.raises(InventoryError, match="does not exist"):
        load_inventory(tmp_path / "none.yaml")
