"""The part of a checkpoint a host is sent: the tensors of its nodes, in a file of their own."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastserve.graph.checkpoint import node_subset

TENSORS = {"h.1.attn.weight": torch.arange(6.0).reshape(2, 3), "h.1.bias": torch.ones(3),
           "h.10.attn.weight": torch.full((2, 3), 7.0), "wte.weight": torch.zeros(4, 2),
           "head.weight": torch.eye(2)}


def read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_only_the_nodes_tensors_are_written_and_a_prefix_is_not_a_node(tmp_path):
    whole = tmp_path / "model.safetensors"
    save_file(TENSORS, str(whole))
    out = tmp_path / "out"
    out.mkdir()
    part = node_subset(whole, ["h.1", "wte"], out)
    assert part.parent == out and part != whole
    got = read(part)
    assert set(got) == {"h.1.attn.weight", "h.1.bias", "wte.weight"}  # not h.10's
    for k, t in got.items():
        torch.testing.assert_close(t, TENSORS[k], rtol=0, atol=0)
    # the same subset is the same file, with the same bytes (a host's cache keeps it)
    again = node_subset(whole, ["wte", "h.1"], out)
    assert again == part and len(list(out.iterdir())) == 1
    other = node_subset(whole, ["h.10"], out)
    assert other != part and set(read(other)) == {"h.10.attn.weight"}


def test_a_subset_that_is_the_whole_checkpoint_is_the_checkpoint(tmp_path):
    whole = tmp_path / "model.safetensors"
    save_file(TENSORS, str(whole))
    assert node_subset(whole, ["h.1", "h.10", "wte", "head", "unused"], tmp_path) == whole
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
