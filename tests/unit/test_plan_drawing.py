"""Pictures of plans: real SVG and PNG files naming what the plan uses, clear errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib  # the test extra installs it: missing, this file fails
import pytest

from fastserve.cli.app import run_cli
from fastserve.errors import PlanError
from fastserve.graph import compile_graph, load_spec
from fastserve.resources.drawing import draw_plan
from fastserve.resources.inventory import load_inventory
from fastserve.resources.planner import Constraints, plan

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = load_inventory(ROOT / "runtime/hosts/cluster8.yaml")


def test_svg_names_the_graph_and_every_host_the_plan_uses(tmp_path):
    graph = compile_graph(load_spec(ROOT / "graphs/unet.yaml"), {})
    chosen = plan(graph, CLUSTER, constraints=Constraints(parallel="hybrid", batch=32))
    draw_plan(graph, chosen, tmp_path / "plan.svg", CLUSTER)
    text = (tmp_path / "plan.svg").read_text()
    ET.fromstring(text)  # well-formed
    assert f"Matplotlib v{matplotlib.__version__}" in text  # drawn by matplotlib
    for word in {graph.name, *(r.host for r in chosen.ranks)}:
        assert word in text


def test_png_of_a_large_graph_collapses_nodes_into_chunks(tmp_path):
    graph = compile_graph(load_spec(ROOT / "graphs/gpt3-175b.yaml"), {})
    chosen = plan(graph, CLUSTER, constraints=Constraints(batch=32))
    draw_plan(graph, chosen, tmp_path / "plan.png", CLUSTER)
    data = (tmp_path / "plan.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_other_formats_are_refused_clearly(tmp_path):
    graph = compile_graph(load_spec(ROOT / "graphs/mlp.yaml"), {})
    with pytest.raises(PlanError, match=r"\.svg or \.png"):
        draw_plan(graph, plan(graph, CLUSTER), tmp_path / "plan.pdf")


def test_fastserve_plan_picture(tmp_path, capsys):
    out = tmp_path / "gpt2.svg"
    code = run_cli(["plan", str(ROOT / "graphs/gpt2.yaml"), "--hosts",
                    str(ROOT / "runtime/hosts/cluster8.yaml"), "--picture", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "lm_head" in out.read_text()
