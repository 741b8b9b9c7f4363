"""The panel controller in plain pytest: set widget values, click Run, check results and errors."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

import pandas as pd

from parity_kit.errors import ParityKitError
from parity_kit.ui import LOCAL_FOLDER, ControlPanel, ModelCache, dtype_choice, model_choice


def _analysis(params):
    if params["dtype"] == "fp64" and params["model"] == "broken":
        raise ParityKitError("model 'broken' cannot run fp64; pick fp32")
    params["progress"](0.5, "half")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, params["n"]])
    table = pd.DataFrame({"model": [params["model"]], "dtype": [params["dtype"]], "n": [params["n"]]})
    return [table, fig]


def _panel():
    return ControlPanel(_analysis, fields={
        "model": model_choice("a", choices=["a", "b", "broken"]),
        "dtype": dtype_choice("bf16"),
        "n": 3,
    })


def test_click_renders_table_and_figure_and_replaces_previous():
    panel = _panel()
    panel.click()
    assert panel.error is None
    table, fig = panel.results
    assert table.loc[0, "dtype"] == "bf16" and isinstance(fig, Figure)
    kinds = [set(o["data"]) for o in panel.output.outputs]
    assert "text/html" in kinds[0] and "image/png" in kinds[1]

    panel.set(dtype="fp16", n=7, model="b")
    panel.click()
    assert len(panel.output.outputs) == 2, "new results replace the old ones"
    assert panel.results[0].loc[0].tolist() == ["b", "fp16", 7]
    assert "fp16" in panel.output.outputs[0]["data"]["text/html"]
    assert panel.runs == 2 and not panel.button.disabled


def test_button_click_runs_like_a_user():
    panel = _panel()
    panel.button.click()
    assert panel.results and "done" in panel.status.value


def test_errors_are_shown_readably_and_the_panel_survives():
    panel = _panel()
    panel.set(model="broken", dtype="fp64")
    panel.click()
    assert panel.results == []
    assert panel.error == "model 'broken' cannot run fp64; pick fp32"
    assert "Error" in panel.status.value and "pick fp32" in panel.status.value
    assert "traceback" in panel.output.outputs[0]["data"]["text/html"]
    panel.set(model="a", dtype="fp32")
    panel.click()
    assert panel.error is None and panel.results[0].loc[0, "dtype"] == "fp32"


def test_unexpected_exceptions_are_caught_too():
    panel = ControlPanel(lambda p: 1 / 0, fields={"n": 1})
    panel.click()
    assert panel.error.startswith("ZeroDivisionError")
    assert not panel.button.disabled and panel.progress.layout.visibility == "hidden"


def test_local_folder_text_box():
    panel = _panel()
    panel.set(model="/tmp/my-checkpoint")
    assert panel.values()["model"] == "/tmp/my-checkpoint"
    picker, path = panel.controls["model"].children
    assert picker.value == LOCAL_FOLDER and path.layout.display == ""
    path.value = ""
    panel.click()
    assert "folder box is empty" in panel.error


def test_unknown_control_and_bad_knob():
    panel = _panel()
    with pytest.raises(ParityKitError, match="no control 'nope'"):
        panel.set(nope=1)
    with pytest.raises(ParityKitError, match="knob 'x'"):
        ControlPanel(lambda p: None, fields={"x": object()})


def test_progress_reported_during_run():
    seen = []

    def run(params):
        params["progress"](0.25, "quarter")
        seen.append(panel.progress.value)
        return "ok"

    panel = ControlPanel(run, fields={"n": 1})
    panel.click()
    assert seen == [0.25] and panel.results == ["ok"]


def test_model_cache_keys_and_eviction():
    calls = []

    def loader(name, dtype, device, attn_implementation):
        calls.append((name, dtype, device, attn_implementation))
        return object(), object()

    cache = ModelCache(max_models=2, loader=loader)
    first = cache.load("m", "bf16")
    assert cache.load("m", "bfloat16") is first, "dtype aliases share one entry"
    cache.load("m", "fp32")
    cache.load("m", "fp16")
    assert len(cache) == 2 and len(calls) == 3
    cache.load("m", "bf16")
    assert len(calls) == 4, "the least recently used entry was evicted"
