"""The measurements behind ``fastserve bench ...``: each prints ratios of things measured side by
side in one run (the machines are shared and noisy). Kept out of the library packages: nothing in
graph, partition, resources or engine imports them.

* :mod:`fastserve.bench.engine`: transport (a hop vs raw pyzmq) and pipeline (stages and
  replicas vs one process);
* :mod:`fastserve.bench.plan`: planning time, and predicted vs measured throughput;
* :mod:`fastserve.bench.partition`: the partition strategies' speed.
"""

import subprocess


def seq_dims(spec, seq: int) -> dict[str, int]:
    """A bench's ``--seq`` as dims for ``spec`` (a loaded GraphSpec): none for a spec without a
    ``seq`` dim, such as an MLP."""
    return {"seq": seq} if "seq" in spec.dim_names else {}


def reap(proc: subprocess.Popen, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for a bench's helper process to end, then kill it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
