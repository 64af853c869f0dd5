"""The pure packages stay pure: no sockets, no processes, no CLI framework (STYLE.md habit 1)."""

import subprocess
import sys

import pytest

PURE = ["fastserve.graph", "fastserve.partition", "fastserve.resources"]


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_no_zmq_or_click(package):
    code = (f"import sys, importlib; importlib.import_module('{package}'); "
            "bad = sorted(m for m in ('zmq', 'click', 'subprocess_tee', 'multiprocessing.pool') "
            "if m in sys.modules); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{package} imports {out.stdout.strip()}"
