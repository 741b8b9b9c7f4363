"""The panel controller in plain pytest: set widget values, click Run, check results and errors."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from parity_kit.errors import ParityKitError
from parity_kit.present.panels import (
    LOCAL_FOLDER,
    ControlPanel,
    ModelCache,
    dtype_choice,
    model_choice,
)


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


# ------------------------------------------------------------------------------ the quickstart's panel
def _quickstart_panel(**overrides):
    from parity_kit.analyses.runs import FROM_CONFIG_LLAMA
    from parity_kit.stories.quickstart import quickstart_panel

    settings = dict(model=FROM_CONFIG_LLAMA, seq_len=6, modules="re:model\\.layers\\.\\d+$", smoke=True)
    return quickstart_panel(**{**settings, **overrides})


def test_quickstart_panel_reruns_with_a_new_candidate_dtype():
    panel = _quickstart_panel()
    assert panel.values()["ref_dtype"] == "fp32" and panel.values()["dtype"] == "bf16"
    panel.click()
    assert panel.error is None, panel.error
    conclusion, table, *figures = panel.results
    assert set(table["cand_dtype"]) == {"bf16"} and len(figures) == 2 and isinstance(figures[0], Figure)
    bf16_error = table["rel_rms"].max()

    panel.set(dtype="fp16")
    panel.click()
    conclusion, table, *figures = panel.results
    assert set(table["cand_dtype"]) == {"fp16"} and "fp16" in conclusion
    assert 0 < table["rel_rms"].max() < bf16_error, "fp16 keeps 3 more mantissa bits than bf16"
    kinds = [set(o["data"]) for o in panel.output.outputs]
    assert kinds[1] >= {"text/html"} and all("image/png" in k for k in kinds[2:])
    assert "fp16" in panel.output.outputs[1]["data"]["text/html"]

    panel.set(dtype="fp32")
    panel.click()
    assert (panel.results[1]["rel_rms"] == 0).all(), "the same weights in the same dtype agree exactly"


def test_quickstart_panel_uses_the_model_cache():
    from parity_kit.present.panels import MODELS

    MODELS.clear()
    panel = _quickstart_panel()
    panel.click()
    assert len(MODELS) == 2, "reference and candidate"
    panel.set(threshold=0.5)
    panel.click()
    assert len(MODELS) == 2 and panel.error is None


def test_quickstart_panel_says_when_a_builtin_model_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_KIT_DATA", str(tmp_path))
    panel = _quickstart_panel()
    panel.set(model="tiny-internlm2")
    panel.click()
    assert panel.results == []
    assert "built-in model 'tiny-internlm2' has no files" in panel.error and "parity-kit train" in panel.error
    assert "parity-kit train" in panel.status.value
    panel.set(model="/nonexistent/checkpoint")
    panel.click()
    assert "does not exist" in panel.error


def test_quickstart_panel_reports_a_bad_knob():
    panel = _quickstart_panel(seq_len=0)
    panel.click()
    assert "seq_len=0" in panel.error and not panel.button.disabled


def test_story_panel_builds_standard_pickers_and_knobs():
    from parity_kit.present.panels import story_panel

    seen = []
    panel = story_panel(lambda p: seen.append(dict(p)) or "ok", model="tiny-rwkv7", dtype="bf16", device="cpu",
                        attn_implementation="sdpa", prompt="hi", max_new_tokens=8, extra_models=["mine"])
    assert list(panel.controls) == ["model", "dtype", "device", "attn_implementation", "prompt", "max_new_tokens"]
    assert "mine" in panel.controls["model"].children[0].options
    panel.set(model="mine", max_new_tokens=3)
    panel.click()
    assert {k: v for k, v in seen[0].items() if k != "progress"} == {
        "model": "mine", "dtype": "bf16", "device": "cpu", "attn_implementation": "sdpa", "prompt": "hi",
        "max_new_tokens": 3}
