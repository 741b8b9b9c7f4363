"""Progress bars in an executed notebook, as they ended.

A tqdm bar in a kernel is a widget; its ``text/plain`` fallback is the text at the moment it was first shown
(``0%``), and that is what an HTML export or a reader without the widget state sees. The final state is in
the notebook's saved widget state; :func:`settle_progress_bars` writes it into the fallback text. A bar
drawn as text (``\\r``-separated redraws in a stream) keeps only its last redraw.
"""

from __future__ import annotations

import html
import re
from typing import Any

_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_TAGS = re.compile(r"<[^>]+>")


def _text(value: Any) -> str:
    return html.unescape(_TAGS.sub("", str(value or ""))).replace("\u2007", " ").strip()


def _bar_text(model_id: str, models: dict[str, Any]) -> str | None:
    """``"desc: 100%|██████████| 6/6 [00:12<00:00]"`` of a tqdm widget (an HBox of HTML, progress, HTML)."""
    box = models.get(model_id, {})
    if box.get("model_name") != "HBoxModel":
        return None
    children = [models.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in box.get("state", {}).get("children", [])]
    progress = [c for c in children if c.get("model_name") in ("FloatProgressModel", "IntProgressModel")]
    if len(children) != 3 or len(progress) != 1 or children[1] is not progress[0]:
        return None
    state = progress[0].get("state", {})
    total, value = state.get("max") or 0, state.get("value") or 0
    width = 10
    filled = int(width * value / total) if total else 0
    bar = f"|{'█' * filled}{' ' * (width - filled)}|" if total else ""
    left = _text(children[0].get("state", {}).get("value"))
    right = _text(children[2].get("state", {}).get("value"))
    if state.get("bar_style") == "danger":
        right += " (stopped)"
    return f"{left}{bar} {right}".strip()


def _last_redraw(text: str) -> str:
    return "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                     for line in text.split("\n"))


def settle_progress_bars(nb: Any) -> int:
    """Replace each progress-bar widget's frozen fallback text by its final state; keep only the last
    redraw of text bars in streams. Returns how many outputs changed.

    >>> import nbformat
    >>> out = nbformat.v4.new_output("stream", name="stderr", text="load:   0%|  | 0/4\\rload: 100%|##| 4/4\\n")
    >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[out])])
    >>> settle_progress_bars(nb), nb.cells[0].outputs[0].text
    (1, 'load: 100%|##| 4/4\\n')
    """
    models = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    changed = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.output_type == "stream" and "\r" in output.text:
                settled = _last_redraw(output.text)
                changed += settled != output.text
                output.text = settled
            data = output.get("data", {}) if output.output_type in ("display_data", "execute_result") else {}
            view = data.get(_WIDGET_VIEW)
            final = _bar_text(view.get("model_id", ""), models) if isinstance(view, dict) else None
            if final is not None and data.get("text/plain") != final:
                data["text/plain"] = final
                changed += 1
    return changed
