"""``capture`` leaves the user's model exactly as it found it: every submodule's own train/eval
flag, and every parameter and buffer (values, dtype, device, requires_grad, identity)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastserve.errors import CaptureError
from fastserve.graph import reference
from fastserve.graph.capture import capture


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)  # buffers: running stats and a counter
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.fc(x)))


class Wrapper(nn.Module):
    """A training wrapper around a frozen, eval-mode encoder: the case of issue #9."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 4))
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64), requires_grad=False)
        self.register_buffer("offset", torch.arange(4.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(self.encoder(x)) * self.scale.float()) + self.offset


def _snapshot(model: nn.Module) -> dict:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        "modes": {name: m.training for name, m in model.named_modules()},
        "objects": {name: t for name, t in tensors.items()},  # identity: the same objects
        "values": {name: t.detach().clone() for name, t in tensors.items()},
        "meta": {name: (t.dtype, t.device, t.requires_grad, tuple(t.shape), t.stride())
                 for name, t in tensors.items()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["meta"] == before["meta"]
    assert set(after["objects"]) == set(before["objects"])
    for name, t in after["objects"].items():
        assert t is before["objects"][name], name
        assert torch.equal(t.detach(), before["values"][name]), name


def _mixed_modes() -> Wrapper:
    torch.manual_seed(0)
    model = Wrapper()
    # give BatchNorm non-trivial running statistics, then freeze the encoder in eval mode
    model.encoder.train()
    with torch.no_grad():
        model.encoder(torch.randn(16, 8))
    model.train()
    model.encoder.eval()
    model.head[1].eval()  # one dropout of the head off, the other modules training
    return model


def test_capture_restores_every_flag_and_tensor():
    model = _mixed_modes()
    before = _snapshot(model)
    assert before["modes"]["encoder.drop"] is False and before["modes"]["head.0"] is True
    x = torch.randn(3, 8)
    graph = capture(model, {"x": x})
    _assert_unchanged(model, before)
    # the graph computed in eval mode whatever the flags were
    model.eval()
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(reference(graph, {"x": x})[graph.outputs[0]], want)


def test_capture_restores_after_a_failed_export():
    class Bad(Wrapper):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return super().forward(x)
            return super().forward(-x)

    torch.manual_seed(0)
    model = Bad()
    model.train()
    model.encoder.eval()
    before = _snapshot(model)
    with pytest.raises(CaptureError):
        capture(model, {"x": torch.randn(3, 8)})
    _assert_unchanged(model, before)


def test_eval_mode_bert_inside_a_training_wrapper_stays_in_eval_mode():
    from fastserve.graph.zoo import hf_bert

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = hf_bert()
            self.classify = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, 2))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids)[0]  # (batch, seq, hidden)
            return self.classify(hidden[:, 0])

    torch.manual_seed(0)
    model = Classifier()
    model.train()
    model.bert.eval()  # a frozen encoder: its dropouts must stay off after capture
    before = _snapshot(model)
    capture(model, {"input_ids": torch.randint(0, 128, (2, 8))})
    _assert_unchanged(model, before)
    assert not any(m.training for m in model.bert.modules())
