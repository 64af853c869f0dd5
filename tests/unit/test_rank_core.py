"""RankCore without sockets: data in, data or errors out; control commands answered."""

from __future__ import annotations

from pathlib import Path

import torch

from fastserve.engine.core import RankCore
from fastserve.engine.wire import Message, check_meta
from fastserve.graph import compile_graph, load_spec, reference
from fastserve.graph.module import build_subgraph

ROOT = Path(__file__).resolve().parents[2]


def make_core() -> tuple[RankCore, object]:
    graph = compile_graph(load_spec(ROOT / "graphs/mlp.yaml"))
    shard = build_subgraph(graph, graph.order, ["x"], list(graph.outputs))
    return RankCore(3, 1, shard), graph


def test_data_in_result_out_equal_to_the_reference_with_a_timing():
    core, graph = make_core()
    x = {"x": torch.randn(4, 64)}
    out = core.handle(Message("data", 7, 2, x, {}))
    assert (out.kind, out.request, out.micro) == ("data", 7, 2)
    torch.testing.assert_close(out.tensors["head"], reference(graph, x)["head"])
    check_meta(out.kind, out.meta)
    assert out.meta["timings"][0]["rank"] == 3 and core.stats.processed == 1


def test_errors_pass_through_and_failures_name_rank_stage_node():
    core, _ = make_core()
    upstream = Message("error", 1, 0, {}, {"error": {"message": "boom", "rank": 0}})
    assert core.handle(upstream) is upstream
    bad = core.handle(Message("data", 1, 0, {"x": torch.randn(2, 3)}, {}))
    assert bad.kind == "error" and bad.meta["error"]["rank"] == 3
    assert bad.meta["error"]["stage"] == 1 and bad.meta["error"]["node"] == "fc_in"
    missing = core.handle(Message("data", 1, 0, {}, {}))
    assert "lacks input tensors ['x']" in missing.meta["error"]["message"]
    assert core.stats.errors == 2


def test_control_commands_are_answered_and_checked():
    core, _ = make_core()
    reply, stop = core.command(Message("control", meta={"cmd": "health"}), pending=1)
    assert reply.meta == {"cmd": "health", "rank": 3, "ok": True, "busy": True} and not stop
    reply, stop = core.command(Message("control", meta={"cmd": "stats"}), rss=5, pending=0)
    assert reply.meta["rss"] == 5 and reply.meta["processed"] == 0 and not stop
    check_meta("reply", reply.meta)
    reply, stop = core.command(Message("control", meta={"cmd": "load"}))
    assert reply.meta["ok"] is False and not stop  # a loaded rank does not load again
    reply, stop = core.command(Message("data", meta={}))
    assert reply.meta["ok"] is False and core.stats.malformed["command"] == 1 and not stop
    _, stop = core.command(Message("control", meta={"cmd": "stop"}))
    assert stop
