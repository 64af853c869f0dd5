"""The advertised names of ``import fastserve`` all resolve, without importing torch eagerly."""

import subprocess
import sys
from pathlib import Path

import fastserve


def test_every_exported_name_resolves():
    for name in fastserve.__all__:
        assert getattr(fastserve, name) is not None, name


def test_import_fastserve_is_light():
    code = "import sys, fastserve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_partition_and_plan_are_public():
    graph = fastserve.load(str(Path(__file__).resolve().parents[2] / "graphs/mlp.yaml"))
    assert len(fastserve.partition(graph, "weight", shards=2)) == 2
    assert fastserve.partition.partition(graph, "layer", shards=3).strategy == "layer"
    assert fastserve.Plan.__name__ == "Plan" and callable(fastserve.load_plan)
