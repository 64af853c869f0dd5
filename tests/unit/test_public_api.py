"""The advertised names of ``import fastserve`` all resolve, without importing torch eagerly."""

import subprocess
import sys

import fastserve


def test_every_exported_name_resolves():
    for name in fastserve.__all__:
        assert getattr(fastserve, name) is not None, name


def test_import_fastserve_is_light():
    code = "import sys, fastserve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
