"""The measurements behind ``fastserve bench ...``: each prints ratios of things measured side by
side in one run (the machines are shared and noisy). Kept out of the library packages: nothing in
graph, partition, resources or engine imports them.

* :mod:`fastserve.bench.engine`: transport (a hop vs raw pyzmq) and pipeline (stages and
  replicas vs one process);
* :mod:`fastserve.bench.plan`: planning time, and predicted vs measured throughput;
* :mod:`fastserve.bench.partition`: the partition strategies' speed.
"""
