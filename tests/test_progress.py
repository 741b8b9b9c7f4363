"""What a headless run shows: per-cell progress in the terminal, progress bars in the executed copy as they
ended (not frozen at 0%), and no warning about the kernel's transport."""

from __future__ import annotations

import io
import time

import nbformat
import pytest

from parity_kit.app.demo import execute_notebook
from parity_kit.app.progress import CellProgress, previous_durations
from parity_kit.present.progress_bars import settle_progress_bars


def _widget_notebook(value: float, total: float) -> nbformat.NotebookNode:
    """An executed cell whose tqdm widget was shown at 0% and then ran to ``value`` of ``total``."""
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    out = nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": view,
                                                       "text/plain": "work:   0%|          | 0/6 [00:00<?, ?it/s]"})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("run()", outputs=[out])])
    state = {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]}},
        "l": {"model_name": "HTMLModel", "state": {"value": "work:\u2007100%"}},
        "p": {"model_name": "FloatProgressModel", "state": {"value": value, "max": total, "bar_style": "success"}},
        "r": {"model_name": "HTMLModel", "state": {"value": "\u20076/6\u2007[00:12&lt;00:00]"}},
    }
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    return nb


def test_a_widget_bar_gets_its_final_state_as_text():
    nb = _widget_notebook(6, 6)
    assert settle_progress_bars(nb) == 1
    text = nb.cells[0].outputs[0].data["text/plain"]
    assert text == "work: 100%|██████████| 6/6 [00:12<00:00]"
    half = _widget_notebook(3, 6)
    settle_progress_bars(half)
    assert "|█████     |" in half.cells[0].outputs[0].data["text/plain"]


def test_other_widgets_and_plain_outputs_are_left_alone():
    nb = _widget_notebook(6, 6)
    nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]["box"]["model_name"] = "VBoxModel"
    assert settle_progress_bars(nb) == 0
    assert "0%" in nb.cells[0].outputs[0].data["text/plain"]


def test_cell_progress_names_the_step_and_estimates_from_the_previous_run():
    cells = [nbformat.v4.new_markdown_cell("## 2. Record both runs"), nbformat.v4.new_code_cell("a()"),
             nbformat.v4.new_code_cell("b()")]
    clock = iter([0.0, 0.0, 0.0, 0.0, 10.0, 10.0, 40.0])  # init, start, (print, start) per cell, finish
    out = io.StringIO()
    progress = CellProgress("01_story", {"a()": 12.0, "b()": 30.0}, stream=out, now=lambda: next(clock))
    progress.start(cells)
    for index in (1, 2):
        progress.cell_start(cells, index)
        progress.cell_complete()
    progress.finish()
    lines = out.getvalue().splitlines()
    assert lines[0] == "01_story  2 code cells, about 0:42 (the previous run)"
    assert lines[1].startswith("01_story  cell 1/2  2. Record both runs  elapsed 0:00  about 0:42 left")
    assert lines[2].startswith("01_story  cell 2/2  2. Record both runs  elapsed 0:10  about 0:30 left")
    assert lines[-1].startswith("01_story  finished in")


def test_a_long_cell_gets_heartbeat_lines():
    cells = [nbformat.v4.new_code_cell("slow()")]
    out = io.StringIO()
    progress = CellProgress("02_story", stream=out, heartbeat_s=0.01)
    progress.cell_start(cells, 0)
    deadline = time.monotonic() + 10
    while "still in cell 1/1" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.finish()
    assert "still in cell 1/1" in out.getvalue()
    assert "no estimate yet" in out.getvalue()


def test_previous_durations_need_the_same_smoke_setting(tmp_path):
    cell = nbformat.v4.new_code_cell("a()")
    cell.metadata["papermill"] = {"duration": 4.5}
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["papermill"] = {"parameters": {"smoke": True}}
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert previous_durations(tmp_path / "x.ipynb", {"smoke": True}) == {"a()": 4.5}
    assert previous_durations(tmp_path / "x.ipynb", {"smoke": False}) == {}


@pytest.mark.slow
def test_a_real_run_prints_cells_and_leaves_no_frozen_bar(tmp_path, capfd):
    params = nbformat.v4.new_code_cell("n = 3")
    params.metadata["tags"] = ["parameters"]
    work = nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(n), desc='steps'):\n    pass")
    heading = nbformat.v4.new_markdown_cell("## 1. Count")
    nb = nbformat.v4.new_notebook(cells=[params, heading, work])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "count.ipynb")

    assert execute_notebook(tmp_path / "count.ipynb", tmp_path / "done.ipynb", {"n": 5}) is None
    terminal = capfd.readouterr().err
    assert "done  cell 3/3  1. Count  elapsed" in terminal and "done  finished in" in terminal
    assert "running over TCP" not in terminal
    executed = nbformat.read(tmp_path / "done.ipynb", as_version=4)
    shown = [o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in executed.cells[-1].outputs]
    assert any("steps: 100%" in text and "5/5" in text for text in shown), shown
    assert not any(" 0%|" in text for text in shown), shown
