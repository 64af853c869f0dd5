"""Several hosts on one machine: three agents on 127.0.0.2-4 (loopback addresses need no root),
and again with each agent in its own network namespace (needs root, as CI has).

A 3-stage GPT-2 pipeline and 3 data-parallel replicas over the three hosts equal the
single-process reference; a coordinator without the cluster's key is refused and counted; a
malformed request is answered with an error and the agent keeps serving; a killed agent is named
within 3 s, leaves no rank running anywhere, and the same run works once it is back; an agent
whose coordinator vanished stops its ranks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import zmq

import fastserve.graph as G
from fastserve.engine import Deployment
from fastserve.engine.agent import AgentClient, HostError, spawn_agent
from fastserve.engine.keys import ClusterKeys, load_keys, new_keys
from fastserve.engine.remote import HostLink
from fastserve.engine.security import KeyPair
from fastserve.errors import EngineError
from fastserve.resources.inventory import load_inventory, parse_inventory
from fastserve.resources.planner import Constraints, plan
from fastserve.resources.widening import widen

from conftest import outliving_the_test, rank_processes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)
LOOPBACK = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


class AgentProcess:
    """``fastserve agent`` on one host address, its log in a file."""

    def __init__(self, address: str, keys: Path, log: Path, wrapper: tuple[str, ...] = (),
                 link: str | None = None, port: int = 0) -> None:
        self.address, self.keys, self.log, self.wrapper = address, keys, log, wrapper
        self.link = link  # its end of the link to the bridge, in a namespace cluster
        self.start(port)

    def start(self, port: int) -> None:
        self.cache = self.log.with_suffix(".cache")
        with outliving_the_test():  # the module's cluster, even when a test restarts it
            self.proc, endpoint = spawn_agent(f"{self.address}:{port}", str(self.keys),
                                              str(self.log), coordinator_timeout=3,
                                              wrapper=self.wrapper, cache=str(self.cache))
        self.port = int(endpoint.rsplit(":", 1)[1])

    def ranks(self) -> dict[int, str]:
        return rank_processes(parent=self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _namespaces(request) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """Three network namespaces joined by a bridge (runtime/netns-cluster.sh), 1 Gbit/s links;
    named and numbered after this process so that concurrent runs do not collide."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    prefix, subnet = f"fs{os.getpid() % 100000}", f"10.77.{os.getpid() % 250}"
    script = str(ROOT / "runtime/netns-cluster.sh")
    subprocess.run([script, "up", prefix, subnet, "1gbit"], check=True, timeout=30)
    request.addfinalizer(lambda: subprocess.run([script, "down", prefix], timeout=30))
    return ([f"{subnet}.{i}" for i in (2, 3, 4)],
            [("ip", "netns", "exec", f"{prefix}-{h}") for h in "abc"],
            [f"{prefix}{h}" for h in "abc"])


@pytest.fixture(scope="module", params=["loopback", "netns"])
def cluster(request, tmp_path_factory):
    """Three agents: on 127.0.0.2-4, or each in its own network namespace."""
    d = tmp_path_factory.mktemp("cluster")
    new_keys(d / "keys")
    if request.param == "netns":
        addresses, wrappers, links = _namespaces(request)
    else:
        addresses, wrappers, links = LOOPBACK, [()] * 3, [None] * 3
    agents = []
    try:
        for i, (address, wrapper, link) in enumerate(zip(addresses, wrappers, links)):
            agents.append(AgentProcess(address, d / "keys", d / f"agent{i}.log", wrapper,
                                       link))
        yield agents, d / "keys"
    finally:
        for a in agents:
            a.stop()
    time.sleep(0.2)
    leftovers = {p for a in agents for p in a.ranks()}
    assert not leftovers, f"rank processes outlived the agents: {leftovers}"


def _inventory(agents) -> object:
    return parse_inventory({"name": "loopback3", "hosts": [
        {"name": n, "address": a.address, "port": a.port, "launcher": "agent", "cores": 1,
         "memory": "4GiB"} for n, a in zip("abc", agents)]})


def _deploy(graph, agents, keys_dir, **constraints) -> Deployment:
    inventory = _inventory(agents)
    chosen = plan(graph, inventory, constraints=Constraints(transport="tcp", threads=1,
                                                            **constraints))
    return Deployment(graph, chosen, inventory=inventory,
                      keys=load_keys(keys_dir, "coordinator"), timeout=60)


def _until_no_ranks(agents, seconds: float) -> None:
    """Wait up to ``seconds`` for every agent's ranks to be gone (the caller asserts it)."""
    deadline = time.monotonic() + seconds
    while any(a.ranks() for a in agents) and time.monotonic() < deadline:
        time.sleep(0.1)


def _reference(graph, x):
    torch.set_num_threads(1)  # as the ranks: the same order of sums, the same last bits
    return G.reference(graph, x)


def test_a_gpt2_pipeline_over_three_hosts_equals_the_reference(cluster):
    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/gpt2.yaml"), dims={"seq": 16})
    x = G.random_inputs(graph, 4, seed=1)
    with _deploy(graph, agents, keys, stages=3, replicas=1, batch=4) as dep:
        hosts = sorted(r.host for r in dep.plan.ranks)
        out = dep.run(x)
        assert all(a.ranks() for a in agents)  # each host runs a rank of its own
    assert hosts == ["a", "b", "c"]
    torch.testing.assert_close(out["lm_head"], _reference(graph, x)["lm_head"], rtol=0,
                               atol=0)


def test_replicas_over_three_hosts_equal_the_reference(cluster):
    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 12, seed=2)
    with _deploy(graph, agents, keys, replicas=3, stages=1, batch=12) as dep:
        out = dep.run(x)
        assert sorted(r.host for r in dep.plan.ranks) == ["a", "b", "c"]
    torch.testing.assert_close(out["head"], _reference(graph, x)["head"])


def test_a_widened_stage_over_hosts_equals_the_reference(cluster):
    """Stage 1 widened: its second rank goes to the third host, the one with a core free,
    so the first stage's output fans out over two CURVE links to two hosts, and both results
    come back to the coordinator."""
    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 16, seed=4)
    inventory = _inventory(agents)
    chosen = plan(graph, inventory, constraints=Constraints(
        transport="tcp", threads=1, stages=2, replicas=1, batch=16, micro_batches=8))
    wide = widen(chosen, 1, inventory)
    spare = ({"a", "b", "c"} - {r.host for r in chosen.ranks}).pop()
    assert wide.ranks[2].host == spare and wide.ranks[:2] == chosen.ranks
    with Deployment(graph, wide, inventory=inventory, keys=load_keys(keys, "coordinator"),
                    timeout=60) as dep:
        out = dep.run(x)
        processed = {r: s["processed"] for r, s in dep.control("stats").items()}
    assert sorted(r.host for r in wide.ranks) == ["a", "b", "c"]
    assert processed[0] == 8 and processed[1] + processed[2] == 8
    assert processed[1] > 0 and processed[2] > 0, processed
    torch.testing.assert_close(out["head"], _reference(graph, x)["head"])


def test_a_service_over_three_hosts_loses_no_request_when_a_remote_rank_is_killed(cluster):
    from concurrent.futures import wait

    from fastserve.service import ServiceConfig
    from fastserve.service.config import Limits
    from fastserve.service.service import Service

    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 40, seed=7)["x"]
    expected = _reference(graph, {"x": x})["head"]
    cfg = ServiceConfig(spec=str(ROOT / "graphs/mlp.yaml"), stages=3, threads=1,
                        limits=Limits(deadline_s=30, hang_s=2))
    with Service(cfg, inventory=_inventory(agents), keys=load_keys(keys, "coordinator")) as svc:
        assert sorted(r.host for r in svc.plan.ranks) == ["a", "b", "c"]
        first = [svc.submit({"x": x[i:i + 1]}) for i in range(20)]
        (victim,) = agents[1].ranks()
        os.kill(victim, signal.SIGKILL)  # rank 1 of the pipeline, on host b
        rest = [svc.submit({"x": x[i:i + 1]}) for i in range(20, 40)]
        done, late = wait(first + rest, timeout=60)
        assert not late, f"{len(late)} requests got no answer"
        for i, f in enumerate(first + rest):
            torch.testing.assert_close(f.result()["head"], expected[i:i + 1])
        deadline = time.monotonic() + 30
        while not svc.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.ready and svc.replicas[0].restarts >= 1
        assert victim not in agents[1].ranks() and agents[1].ranks()  # a new rank on b
    _until_no_ranks(agents, 5)
    assert not any(a.ranks() for a in agents)


def test_a_checkpoint_reaches_each_host_once_verified(cluster, tmp_path):
    from safetensors import safe_open

    from fastserve.engine.remote import sha256_of
    from lms import small_gpt2

    agents, keys = cluster
    # a GPT-2 whose weights are in a checkpoint, not the seeded ones: the ranks must read it
    # to match; its head is tied to the token embedding of the first stage
    spec, weights = small_gpt2(tmp_path)
    graph = G.load(spec, dims={"seq": 16})
    x = G.random_inputs(graph, 2, seed=5)
    digest = sha256_of(str(tmp_path / "gpt2-small.safetensors"))
    written = []
    for _ in range(2):  # the second run finds the files in the agents' caches
        with _deploy(graph, agents, keys, stages=3, replicas=1, batch=2) as dep:
            out = dep.run(x)
            stages = {r.host: set(dep.plan.cut[r.stage]) for r in dep.plan.ranks}
        torch.testing.assert_close(out["lm_head"], _reference(graph, x)["lm_head"], rtol=0,
                                   atol=0)
        files = {a: list(a.cache.glob("*.safetensors")) for a in agents}
        assert all(len(f) == 1 for f in files.values()), files
        written.append([f[0].stat().st_mtime_ns for f in files.values()])
    assert written[0] == written[1]  # kept, not sent again
    # each host was sent the tensors of its own stage's nodes (and the stage with the tied
    # head the embedding's), not the whole checkpoint
    assert "wte" not in stages["c"] and "lm_head" in stages["c"]
    stages["c"].add("wte")
    owner = {k: max((n for n in graph.order if k.startswith(f"{n}.")), key=len) for k in weights}
    for name, a in zip("abc", agents):
        (held,) = files[a]
        assert held.stem != digest
        with safe_open(str(held), framework="pt") as f:
            sent = set(f.keys())
        assert sent == {k for k in weights if owner[k] in stages[name]}, name
    # a file whose bytes do not match the sha256 it was sent as is not kept
    ctx = zmq.Context()
    client = AgentClient(ctx, "a", f"{agents[0].address}:{agents[0].port}",
                         load_keys(keys, "coordinator"))
    try:
        with pytest.raises(HostError, match="dropped"):
            client.request("put", frame=b"not the weights", sha256="0" * 64, offset=0, size=15)
        assert client.request("have", sha256="0" * 64)[0]["path"] is None
        with pytest.raises(HostError, match="in order"):
            client.request("put", frame=b"x", sha256="1" * 64, offset=5, size=10)
        with pytest.raises(HostError, match="64 lowercase hex"):
            client.request("have", sha256="../../etc/passwd")
        with pytest.raises(HostError, match="file extension"):
            client.request("have", sha256="1" * 64, suffix="/../../x")
        with pytest.raises(HostError, match="64 lowercase hex"):
            client.request("have", sha256="1" * 64 + "\n")
        with pytest.raises(HostError, match="file extension"):
            client.request("have", sha256="1" * 64, suffix=".bin\n")
        # uploads are bounded in number and by the disk, and hashed as they arrive
        with pytest.raises(HostError, match="free"):
            client.request("put", frame=b"x", sha256="2" * 64, offset=0, size=1 << 40)
        digests = [f"{i:064x}" for i in range(9)]
        for d in digests[:8]:
            assert client.request("put", frame=b"x", sha256=d, offset=0, size=2)[0]["path"] \
                is None
        with pytest.raises(HostError, match="8 uploads are under way"):
            client.request("put", frame=b"x", sha256=digests[8], offset=0, size=2)
        with pytest.raises(HostError, match="send in order"):  # not the size it began with
            client.request("put", frame=b"y", sha256=digests[0], offset=1, size=3)
        for d in digests[:8]:
            with pytest.raises(HostError, match="dropped"):
                client.request("put", frame=b"y", sha256=d, offset=1, size=2)
        ok = hashlib.sha256(b"xy").hexdigest()
        client.request("put", frame=b"x", sha256=ok, offset=0, size=2)
        path = client.request("put", frame=b"y", sha256=ok, offset=1, size=2)[0]["path"]
        assert Path(path).read_bytes() == b"xy"
        assert not list(Path(path).parent.glob("*.part"))
    finally:
        client.close()
    # a file whose extension the agent would refuse is sent without one
    link = HostLink(ctx, "a", f"{agents[0].address}:{agents[0].port}",
                    load_keys(keys, "coordinator"))
    odd = tmp_path / "model.ckpt_Step100"
    odd.write_bytes(b"weights")
    try:
        there = Path(link.upload(str(odd)))
        assert there.read_bytes() == b"weights" and there.suffix == ""
    finally:
        link.stop()  # (no ranks started: it only closes its socket)
        ctx.term()


def test_a_partition_export_runs_on_hosts_that_do_not_share_its_directory(cluster, tmp_path):
    """Each host is sent the export's spec copy and its own shard's file (cached by sha256),
    and its rank checks both against the manifest it is given."""
    from fastserve.engine.deployment import load_graph
    from fastserve.partition import export, load_manifest, partition
    from lms import small_gpt2

    agents, keys = cluster
    spec, _ = small_gpt2(tmp_path)
    whole = G.load(spec, dims={"seq": 16})
    export(partition(whole, "weight", shards=3), tmp_path / "exp")
    graph, cut, export_dir = load_graph(str(tmp_path / "exp"))
    manifest = load_manifest(export_dir)
    inventory = _inventory(agents)
    chosen = plan(graph, inventory, constraints=Constraints(transport="tcp", threads=1, cut=cut,
                                                            replicas=1, batch=2))
    x = G.random_inputs(graph, 2, seed=6)
    with Deployment(graph, chosen, inventory=inventory, keys=load_keys(keys, "coordinator"),
                    timeout=60, export_dir=export_dir) as dep:
        out = dep.run(x)
        host_of = {r.stage: r.host for r in dep.plan.ranks}
    torch.testing.assert_close(out["lm_head"], _reference(whole, x)["lm_head"], rtol=0, atol=0)
    for name, a in zip("abc", agents):
        held = {f.name for f in a.cache.iterdir()}
        stage = next(k for k, h in host_of.items() if h == name)
        assert f"{manifest['spec']['sha256']}.yaml" in held
        assert {f"{e['sha256']}.safetensors" for e in manifest["shards"]} & held == \
            {f"{manifest['shards'][stage]['sha256']}.safetensors"}, name


def test_a_coordinator_without_the_key_is_refused_and_counted(cluster):
    agents, keys = cluster
    real = load_keys(keys, "coordinator")
    ctx = zmq.Context()
    try:
        stranger = AgentClient(ctx, "a", f"{agents[0].address}:{agents[0].port}",
                               ClusterKeys(KeyPair.new(), real.peers), timeout=1.0)
        with pytest.raises(HostError, match="did not answer"):
            stranger.request("start", config={})
        stranger.close()
        friend = AgentClient(ctx, "a", f"{agents[0].address}:{agents[0].port}", real)
        info, _ = friend.request("resources")
        assert info["refused"] >= 1 and not agents[0].ranks()
        friend.close()
    finally:
        ctx.term()


def test_malformed_requests_get_errors_and_the_agent_keeps_serving(cluster):
    agents, keys = cluster
    real = load_keys(keys, "coordinator")
    ctx = zmq.Context()
    client = AgentClient(ctx, "b", f"{agents[1].address}:{agents[1].port}", real)
    raw = ctx.socket(zmq.DEALER)
    raw.curve_secretkey, raw.curve_publickey = real.own.secret.encode(), real.own.public.encode()
    raw.curve_serverkey = real.peers[0].encode()
    raw.connect(f"tcp://{agents[1].address}:{agents[1].port}")
    good = {"rank": 0, "stage": 0, "replica": 0, "control": "tcp://127.0.0.1:9",
            "public_key": real.own.public, "secret_key": real.own.secret,
            "upstream_keys": [real.own.public], "downstream_keys": [real.own.public],
            "coordinator_key": real.own.public}
    try:
        for body in [b"not json", b"[1, 2]", json.dumps({"id": 1}).encode(),
                     json.dumps({"id": "1", "cmd": "resources"}).encode(),
                     json.dumps({"id": 2, "cmd": "exec", "argv": ["sh"]}).encode(),
                     b"[" * 200_000]:  # nested past Python's recursion limit
            raw.send(body)
            assert raw.poll(5000), body
            assert json.loads(raw.recv())["ok"] is False
        bad_configs = [
            ("not a map", "x"),
            ("unknown field", {**good, "argv": ["sh", "-c", "id"]}),
            ("threads", {**good, "threads": 0}),
            ("rank a bool", {**good, "rank": True}),
            ("control not tcp", {**good, "control": "ipc:///tmp/x"}),
            ("plain key", {**good, "public_key": "abc"}),
            ("no upstream", {**good, "upstream_keys": []}),
            ("no downstream", {**good, "downstream_keys": []}),
            ("a downstream key a string", {**good, "downstream_keys": real.own.public}),
            ("65 downstream keys", {**good, "downstream_keys": [real.own.public] * 65}),
            ("a plain downstream key", {**good, "downstream_keys": [real.own.public, "abc"]}),
            ("trust a string", {**good, "trust_code": "yes"}),
            ("spin negative", {**good, "spin_us": -1}),
            ("spin past its bound", {**good, "spin_us": 10**9}),
            ("spin a float", {**good, "spin_us": 1.5}),
            # a pattern's "$" matches before a final newline: every field is matched whole
            ("a key and a newline", {**good, "public_key": real.own.public + "\n"}),
            ("control and a newline", {**good, "control": "tcp://127.0.0.1:9\n"}),
            ("control past port 65535", {**good, "control": "tcp://127.0.0.1:65536"}),
            ("control on port 0", {**good, "control": "tcp://127.0.0.1:0"}),
        ]
        for name, config in bad_configs:
            with pytest.raises(HostError, match="refused 'start'"):
                client.request("start", config=config)
        with pytest.raises(HostError, match="unexpected field"):
            client.request("resources", extra=1)
        with pytest.raises(HostError, match="no rank"):
            client.request("logs", rank=12345)
        assert client.request("resources")[0]["malformed"] >= 23
        assert not agents[1].ranks()
    finally:
        raw.close(linger=0)
        client.close()
        ctx.term()


def test_a_killed_host_is_named_and_leaves_nothing_running(cluster, tmp_path):
    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 8, seed=3)
    victim = agents[1]
    dep = _deploy(graph, agents, keys, stages=3, replicas=1, batch=8).start()
    try:
        dep.run(x)
        victim.proc.kill()  # the host goes away mid-deployment
        victim.proc.wait()
        named_after = _seconds_until_named(dep, x, "b")
    finally:
        dep.stop()
    print(f"killed host named after {named_after:.2f} s")  # the figure, with -s
    assert named_after < 3.0, named_after
    _until_no_ranks(agents, 5)
    assert not any(a.ranks() for a in agents)  # the victim's ranks followed it
    victim.start(victim.port)  # the host is back: the same run works
    with _deploy(graph, agents, keys, stages=3, replicas=1, batch=8) as dep:
        torch.testing.assert_close(dep.run(x)["head"], _reference(graph, x)["head"])


def _seconds_until_named(dep, x, host: str) -> float:
    """Run batches until the deployment raises an error naming ``host``; how long that took."""
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=f"host '{host}'"):
        for _ in range(1000):
            dep.run(x)
    return time.monotonic() - t0


def test_a_cut_link_is_named_and_the_run_works_once_it_is_back(cluster):
    agents, keys = cluster
    victim = agents[2]
    if victim.link is None:
        pytest.skip("cutting a link needs the namespace cluster (loopback has no link to cut)")
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 8, seed=4)
    dep = _deploy(graph, agents, keys, stages=3, replicas=1, batch=8).start()
    try:
        dep.run(x)
        subprocess.run(["ip", "link", "set", victim.link, "down"], check=True)
        named_after = _seconds_until_named(dep, x, "c")
    finally:
        dep.stop()
        subprocess.run(["ip", "link", "set", victim.link, "up"], check=True)
    print(f"cut link named after {named_after:.2f} s")  # the figure, with -s
    assert named_after < 3.0, named_after
    # the other hosts' ranks were stopped by the deployment; the cut-off host's by its agent,
    # once the coordinator had been silent for its timeout (3 s here)
    _until_no_ranks(agents, 10)
    assert not any(a.ranks() for a in agents)
    with _deploy(graph, agents, keys, stages=3, replicas=1, batch=8) as dep:
        torch.testing.assert_close(dep.run(x)["head"], _reference(graph, x)["head"])


def test_a_host_that_is_not_there_fails_the_start_and_leaves_nothing(cluster, tmp_path):
    agents, keys = cluster
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    inventory = parse_inventory({"name": "partial", "hosts": [
        {"name": n, "address": a.address, "port": p, "launcher": "agent", "cores": 1,
         "memory": "4GiB"} for n, a, p in zip("abc", agents, [agents[0].port, agents[1].port,
                                                              1])]})  # nobody on port 1
    chosen = plan(graph, inventory, constraints=Constraints(transport="tcp", threads=1,
                                                            stages=3, replicas=1, batch=4))
    t0 = time.monotonic()
    with pytest.raises(HostError, match="host 'c'"):
        Deployment(graph, chosen, inventory=inventory,
                   keys=load_keys(keys, "coordinator")).start()
    assert time.monotonic() - t0 < 10
    _until_no_ranks(agents, 5)
    assert not any(a.ranks() for a in agents)  # the ranks started on a and b were stopped


def test_an_agent_stops_its_ranks_when_the_coordinator_vanishes(cluster):
    agents, keys = cluster
    real = load_keys(keys, "coordinator")
    ctx = zmq.Context()
    address = f"{agents[2].address}:{agents[2].port}"
    client = AgentClient(ctx, "c", address, real)
    other = AgentClient(ctx, "c", address, real)  # another coordinator, with the same keys
    rank_keys = KeyPair.new()
    config = {"rank": 7, "stage": 0, "replica": 0, "control": "tcp://127.0.0.1:9",
              "public_key": rank_keys.public, "secret_key": rank_keys.secret,
              "upstream_keys": [real.own.public], "downstream_keys": [real.own.public],
              "coordinator_key": real.own.public}
    try:
        # a rank whose coordinator never answers
        client.request("start", config=config)
        # the agent answers once Popen returns, when the rank's exec has begun; /proc shows
        # its command line only once the exec has set it up, a moment later under load
        deadline = time.monotonic() + 5
        while not agents[2].ranks() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agents[2].ranks()
        # the other coordinator neither sees, stops, reads nor replaces it
        assert other.request("status")[0]["ranks"] == {}
        other.request("stop", ranks=[7])
        other.request("stop", ranks=None)
        with pytest.raises(HostError, match="no rank 7 of yours"):
            other.request("logs", rank=7)
        with pytest.raises(HostError, match="already running here for another coordinator"):
            other.request("start", config=config)
        assert client.request("status")[0]["ranks"] == {"7": None}
        # then its coordinator goes quiet while the other one keeps talking: the agent's
        # timeout (3 s here) is each coordinator's own
        deadline = time.monotonic() + 10
        while agents[2].ranks() and time.monotonic() < deadline:
            other.request("resources")
            time.sleep(0.2)
        assert not agents[2].ranks()
        assert "a coordinator silent for 3 s: stopping its 1 rank(s)" in agents[2].log.read_text()
    finally:
        client.close()
        other.close()
        ctx.term()
    assert os.path.exists(agents[2].keys)


def test_the_cli_checks_hosts_and_runs_over_them(cluster, tmp_path, capsys):
    from fastserve.cli.app import run_cli

    agents, keys = cluster
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(json.dumps({"name": "loopback3", "hosts": [
        {"name": n, "address": a.address, "port": a.port, "cores": 1, "memory": "4GiB"}
        for n, a in zip("abc", agents)]}))  # launcher: agent is the default off this machine
    measured = tmp_path / "measured.yaml"
    assert run_cli(["hosts", "check", str(inventory), "--keys", str(keys), "--json",
                    "--write", str(measured)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["host"] for r in rows] == ["a", "b", "c"]
    assert all(r["latency_us"] > 0 and r["bandwidth"] > 0 and r["cores"] >= 1 for r in rows)
    assert all(type(r["refused"]) is int for r in rows)  # peers without the key, per agent
    # what was measured feeds the planner: the written inventory loads, with it
    written = load_inventory(measured)
    assert [h.flops for h in written.hosts] == [round(r["flops_per_core"]) for r in rows]
    assert written.default_link.bandwidth == round(min(r["bandwidth"] for r in rows))
    assert [h.agent for h in written.hosts] == [r["address"] for r in rows]
    assert run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--hosts", str(inventory),
                    "--keys", str(keys), "--stages", "3", "--check", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["check"] == "outputs equal the single-process reference"
    # generation over the same hosts: a stage's KV cache on each, the tokens transformers'
    from lms import hf_gpt2, hf_greedy, prompts, small_gpt2

    spec, weights = small_gpt2(tmp_path)
    prompt = prompts()[0]
    assert run_cli(["generate", spec, "--hosts", str(inventory), "--keys", str(keys),
                    "--stages", "3", "--ids", ",".join(map(str, prompt)), "--max-tokens", "6",
                    "--check", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["check"] == "tokens equal the in-process run"
    assert generated["results"][0]["tokens"] == hf_greedy(hf_gpt2(weights), prompt, 6)
    # without the keys, or on ipc, it says what to do
    assert run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--hosts", str(inventory),
                    "--stages", "3"]) != 0
    assert "--keys DIR" in capsys.readouterr().err
    assert run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--hosts", str(inventory),
                    "--keys", str(keys), "--transport", "ipc"]) != 0
    assert "drop --transport ipc" in capsys.readouterr().err
    # a host that is not there is named
    silent = tmp_path / "silent.yaml"
    silent.write_text(json.dumps({"name": "x", "hosts": [
        {"name": "ghost", "address": "127.0.0.9", "port": 9, "cores": 1, "memory": "1GiB"}]}))
    assert run_cli(["hosts", "check", str(silent), "--keys", str(keys)]) != 0
    assert "host 'ghost' (127.0.0.9:9) did not answer" in capsys.readouterr().err


def test_keys_and_agent_refuse_what_would_be_unsafe(tmp_path, capsys):
    from fastserve.cli.app import run_cli

    assert run_cli(["keys", "new", str(tmp_path / "k")]) == 0
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o700"
    assert run_cli(["keys", "new", str(tmp_path / "k")]) != 0  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    for listen in ["0.0.0.0:7301", "*:7301", "127.0.0.2", "127.0.0.2:99999"]:
        assert run_cli(["agent", "--listen", listen, "--keys", str(tmp_path / "k")]) != 0
    taken, endpoint = spawn_agent("127.0.0.2:0", str(tmp_path / "k"), str(tmp_path / "a.log"))
    try:  # an address another agent holds
        assert run_cli(["agent", "--listen", endpoint.removeprefix("tcp://"), "--keys",
                        str(tmp_path / "k")]) != 0
        assert "cannot listen on" in capsys.readouterr().err
    finally:
        taken.terminate()
        taken.wait(timeout=10)
    (tmp_path / "k" / "agent.key_secret").chmod(0o644)
    assert run_cli(["agent", "--listen", "127.0.0.2:0", "--keys", str(tmp_path / "k")]) != 0
    assert "chmod 600" in capsys.readouterr().err
    (tmp_path / "k" / "agent.key_secret").chmod(0o600)
    # whoever can write a coordinator*.key there would command the agent
    public = tmp_path / "k" / "coordinator.key"
    assert oct(public.stat().st_mode & 0o777) == "0o644"
    for path, mode in [(tmp_path / "k", 0o777), (public, 0o666)]:
        path.chmod(mode)
        assert run_cli(["agent", "--listen", "127.0.0.2:0", "--keys", str(tmp_path / "k")]) != 0
        assert f"chmod go-w {path}" in capsys.readouterr().err
        path.chmod(0o700 if path.is_dir() else 0o644)
    if os.geteuid() == 0:  # (only root can give a file away)
        os.chown(public, 12345, 12345)
        assert run_cli(["agent", "--listen", "127.0.0.2:0", "--keys", str(tmp_path / "k")]) != 0
        assert "belongs to another user (uid 12345)" in capsys.readouterr().err
        os.chown(public, 0, 0)
    load_keys(tmp_path / "k", "agent")  # as it was: accepted again
    public.unlink()
    assert run_cli(["agent", "--listen", "127.0.0.2:0", "--keys", str(tmp_path / "k")]) != 0
    assert "obey nobody" in capsys.readouterr().err
