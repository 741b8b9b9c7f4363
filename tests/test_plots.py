from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.testing import tiny_llama as build_tiny_llama


@pytest.fixture
def recordings(input_ids):
    ref_model, cand_model = build_tiny_llama(), build_tiny_llama(dtype=torch.float16)
    with pk.record(ref_model, "*") as ref:
        ref_model(input_ids)
    with pk.record(cand_model, "*") as cand:
        cand_model(input_ids)
    return ref, cand


def test_error_by_module(recordings, tmp_path):
    open_before = plt.get_fignums()
    table = pk.compare(*recordings)
    fig = pk.plots.error_by_module(table)
    assert isinstance(fig, Figure) and plt.get_fignums() == open_before  # no pyplot state
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    n_ok = int((table["status"] == "ok").sum())
    assert len(lines["rel_rms"].get_xdata()) == n_ok
    assert any(label.startswith("floor") for label in lines)
    fig.savefig(tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(ParityKitError, match="not a column"):
        pk.plots.error_by_module(table, "nope")


def test_error_by_module_marks_exact_zeros():
    table = pd.DataFrame({"module": ["a", "b", "c"], "tensor": "output", "rel_rms": [0.0, 1e-3, 1e-2],
                          "floor": [1e-4] * 3, "status": "ok"})
    labels = [line.get_label() for line in pk.plots.error_by_module(table).axes[0].get_lines()]
    assert "exactly 0 (1)" in labels


def test_token_heatmap(recordings, tmp_path):
    frame = pk.per_token_error(*recordings)
    fig = pk.plots.token_heatmap(frame)
    image = fig.axes[0].images[0]
    assert image.get_array().shape == frame.shape
    assert type(image.norm).__name__ == "LogNorm"
    fig.savefig(tmp_path / "h.png")
    with pytest.raises(ParityKitError, match="empty"):
        pk.plots.token_heatmap(pd.DataFrame())
