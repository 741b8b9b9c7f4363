"""Interactive control panels (ipywidgets) for the story notebooks.

A panel is a thin shell around a *run function*: the panel collects parameter values from its
widgets, calls ``run(params)``, and renders whatever the function returns (DataFrames, Figures,
text, Markdown) into its output area, replacing the previous results. The run function calls the
same package functions as the notebook's static cells, so the interactive and headless paths cannot
drift apart.

>>> panel = ControlPanel(lambda p: [f"{p['model']} in {p['dtype']}"],
...                      fields={"model": model_choice("tiny-rwkv7"), "dtype": dtype_choice("bf16")})
>>> panel.click()
>>> panel.results
['tiny-rwkv7 in bf16']

**One call for a story notebook**: :func:`story_panel` builds the standard pickers from the
notebook's own parameters and adds a plain control for every other knob. A story's interactive cell
is then::

    def explore(p):            # p: the widget values + p["progress"](fraction, message)
        result = run_story(model=p["model"], dtype=p["dtype"], ...)   # the same package call as the static cells
        return [result.table, result.figure]                        # shown in the panel, replacing old results

    if interactive:
        display(pk.ui.story_panel(explore, model=model, dtype=dtype, device=device,
                                  attn_implementation="eager", prompt=prompt, threshold=threshold))

Load models through :data:`MODELS` (``pk.ui.MODELS.load(name, dtype, device, attn)``, the cache of
:mod:`parity_kit.models.cache`) so that re-running with another knob does not reload the weights.
"""

from __future__ import annotations

import base64
import html
import io
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets

from ..dtypes import dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.cache import MODELS, ModelCache

__all__ = ["DTYPES", "LOCAL_FOLDER", "MODELS", "ControlPanel", "Field", "ModelCache", "attention_choice", "device_choice", "dtype_choice",
           "model_choice", "show_all", "story_panel"]

RunFunction = Callable[[dict[str, Any]], Any]

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp64")
# labels such as "candidate dtype" would be cut off at ipywidgets' default description width
_WIDE_LABEL = {"description_width": "initial"}
LOCAL_FOLDER = "local folder…"


@dataclass
class Field:
    """One control: how to build its widget and how to read a parameter value back from it."""

    label: str
    build: Callable[[], widgets.Widget]
    read: Callable[[widgets.Widget], Any] = field(default=lambda w: w.value)


def model_choice(default: str, choices: Sequence[str] | None = None) -> Field:
    """A model picker: the built-in models plus a text box for a local folder or hub id.

    >>> model_choice("tiny-rwkv7").label
    'model'
    """
    if choices is None:
        from ..models import BUILTINS

        choices = list(BUILTINS)
    options = list(dict.fromkeys([*choices, LOCAL_FOLDER]))
    is_builtin = default in options

    def build() -> widgets.Widget:
        picker = widgets.Dropdown(options=options, value=default if is_builtin else LOCAL_FOLDER,
                                  description="model")
        path = widgets.Text(value="" if is_builtin else default, placeholder="/path/to/checkpoint folder",
                            description="folder", layout=widgets.Layout(width="28em"))
        path.layout.display = "none" if is_builtin else ""

        def toggle(change: dict[str, Any]) -> None:
            path.layout.display = "" if change["new"] == LOCAL_FOLDER else "none"

        picker.observe(toggle, names="value")
        return widgets.HBox([picker, path])

    def read(box: widgets.Widget) -> str:
        picker, path = box.children
        if picker.value != LOCAL_FOLDER:
            return picker.value
        if not path.value.strip():
            raise ParityKitError("model is set to 'local folder…' but the folder box is empty; "
                                 "type a checkpoint folder path or pick a built-in model")
        return path.value.strip()

    return Field("model", build, read)


def dtype_choice(default: str, label: str = "dtype", choices: Sequence[str] = DTYPES) -> Field:
    """A dtype picker (fp32, fp16, bf16, fp64).

    >>> dtype_choice("bf16").label
    'dtype'
    """
    value = dtype_name(parse_dtype(default))
    return Field(label, lambda: widgets.Dropdown(options=list(choices), value=value, description=label,
                                                 style=_WIDE_LABEL))


def device_choice(default: str = "cpu") -> Field:
    """A device picker: cpu and every CUDA device this machine has.

    >>> device_choice().label
    'device'
    """
    import torch

    options = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if default == "cuda" and len(options) > 1:
        default = "cuda:0"
    if default not in options:
        options.append(default)
    return Field("device", lambda: widgets.Dropdown(options=options, value=default, description="device"))


def attention_choice(default: str = "eager", label: str = "attn_implementation") -> Field:
    """An attention-implementation picker (eager or sdpa).

    >>> attention_choice().label
    'attn_implementation'
    """
    return Field(label, lambda: widgets.Dropdown(options=["eager", "sdpa"], value=default, description="attention"))


def _field_for_value(name: str, value: Any) -> Field:
    """The natural widget for a plain knob value: a checkbox, a number box or a text box."""
    if isinstance(value, Field):
        return value
    if isinstance(value, bool):
        return Field(name, lambda: widgets.Checkbox(value=value, description=name))
    if isinstance(value, int):
        return Field(name, lambda: widgets.IntText(value=value, description=name))
    if isinstance(value, float):
        return Field(name, lambda: widgets.FloatText(value=value, description=name))
    if isinstance(value, str):
        return Field(name, lambda: widgets.Text(value=value, description=name,
                                                layout=widgets.Layout(width="28em")))
    if value is None:
        return Field(name, lambda: widgets.Text(value="", placeholder="(default)", description=name),
                     lambda w: w.value or None)
    raise ParityKitError(f"panel knob {name!r} has a value of type {type(value).__name__}; "
                         "use a bool, int, float, str or None, or pass a ui.Field")


class ControlPanel:
    """Widgets for a story's parameters, a Run button, a progress bar and an output area.

    ``fields`` maps parameter names to a :class:`Field` (see :func:`model_choice`, :func:`dtype_choice`,
    :func:`device_choice`, :func:`attention_choice`) or to a plain default value (bool, int, float, str).
    ``run(params)`` returns one displayable object or a list of them; it may report progress by
    calling ``params["progress"](fraction, message)``.

    >>> panel = ControlPanel(lambda p: p["n"] * 2, fields={"n": 3})
    >>> panel.set(n=5); panel.click(); panel.results
    [10]
    """

    def __init__(self, run: RunFunction, fields: Mapping[str, Field | Any], *, title: str = "Run the analysis"):
        self._run = run
        self.fields = {name: _field_for_value(name, spec) for name, spec in fields.items()}
        self.controls = {name: f.build() for name, f in self.fields.items()}
        self.button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="", bar_style="info")
        self.progress.layout.visibility = "hidden"
        self.status = widgets.HTML(value="")
        self.output = widgets.Output()
        self.results: list[Any] = []
        self.error: str | None = None
        self.runs = 0
        self.button.on_click(lambda _button: self.click())
        self.widget = widgets.VBox([
            widgets.HTML(f"<b>{html.escape(title)}</b>"),
            *self.controls.values(),
            widgets.HBox([self.button, self.progress]),
            self.status,
            self.output,
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def set(self, **values: Any) -> None:
        """Set controls by parameter name (as a user would), e.g. ``panel.set(dtype="fp16")``."""
        for name, value in values.items():
            if name not in self.controls:
                raise ParityKitError(f"panel has no control {name!r}; it has {sorted(self.controls)}")
            control = self.controls[name]
            if name == "model" and isinstance(control, widgets.HBox):
                picker, path = control.children
                if value in picker.options:
                    picker.value = value
                else:
                    picker.value, path.value = LOCAL_FOLDER, str(value)
            else:
                control.value = value

    def values(self) -> dict[str, Any]:
        """The current parameter values, read from the widgets."""
        return {name: f.read(self.controls[name]) for name, f in self.fields.items()}

    def _report_progress(self, fraction: float, message: str = "") -> None:
        self.progress.value = max(0.0, min(1.0, float(fraction)))
        self.progress.description = message[:20]

    def click(self) -> None:
        """Run the analysis with the current values; results or a readable error replace the old ones."""
        self.runs += 1
        self.button.disabled = True
        self.progress.layout.visibility = "visible"
        self._report_progress(0.0, "running")
        self.status.value = "<i>running…</i>"
        self.output.outputs = ()
        try:
            params = self.values()
            with self.output:  # in a kernel, tqdm bars and prints from the run show here while it works
                returned = self._run({**params, "progress": self._report_progress})
            self.results = list(returned) if isinstance(returned, (list, tuple)) else [returned]
            self.error = None
            self.output.outputs = tuple(_display_bundle(obj) for obj in self.results)
            self.status.value = f"<span style='color:#2a7'>done (run {self.runs})</span>"
        except Exception as exc:  # the panel must survive any failure of the analysis and say what happened
            self.results = []
            self.error = _readable_error(exc)
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.status.value = f"<span style='color:#c22'><b>Error:</b> {html.escape(self.error)}</span>"
            self.output.outputs = (_html_bundle(
                f"<details><summary>traceback</summary><pre>{html.escape(details)}</pre></details>"),)
        finally:
            self.progress.layout.visibility = "hidden"
            self.button.disabled = False


def _readable_error(exc: BaseException) -> str:
    if isinstance(exc, ParityKitError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _html_bundle(markup: str) -> dict[str, Any]:
    return {"output_type": "display_data", "data": {"text/html": markup, "text/plain": markup}, "metadata": {}}


def _display_bundle(obj: Any) -> dict[str, Any]:
    """A Jupyter display message for one result, built without a kernel so it also works in tests."""
    from matplotlib.figure import Figure

    if isinstance(obj, Figure):
        buffer = io.BytesIO()
        obj.savefig(buffer, format="png", bbox_inches="tight", dpi=90)
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"output_type": "display_data",
                "data": {"image/png": png, "text/plain": f"<Figure: {obj.get_suptitle() or 'figure'}>"},
                "metadata": {}}
    if hasattr(obj, "to_html"):  # pandas DataFrame / Styler
        return _html_bundle(obj.to_html())
    if hasattr(obj, "_repr_html_"):
        return _html_bundle(obj._repr_html_())
    if hasattr(obj, "_repr_markdown_"):
        return {"output_type": "display_data",
                "data": {"text/markdown": obj._repr_markdown_(), "text/plain": str(obj)}, "metadata": {}}
    return {"output_type": "display_data", "data": {"text/plain": str(obj)}, "metadata": {}}




def story_panel(
    run: RunFunction,
    *,
    model: str | None = None,
    dtype: str | None = None,
    ref_dtype: str | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    extra_models: Sequence[str] = (),
    title: str = "Run the analysis",
    **knobs: Any,
) -> ControlPanel:
    """A :class:`ControlPanel` with the standard pickers for the parameters a story passes, plus one
    plain control per other knob (bool → checkbox, int/float → number box, str → text box).

    ``model`` → model picker (built-ins, ``extra_models``, a local-folder box), ``dtype`` /
    ``ref_dtype`` → dtype pickers (candidate / reference), ``device`` → cpu and every CUDA device,
    ``attn_implementation`` → eager / sdpa. Parameters left ``None`` get no control.

    >>> panel = story_panel(lambda p: f"{p['model']} {p['dtype']} {p['prompt']}",
    ...                     model="tiny-rwkv7", dtype="bf16", prompt="hello")
    >>> panel.set(dtype="fp16"); panel.click(); panel.results
    ['tiny-rwkv7 fp16 hello']
    """
    fields: dict[str, Field | Any] = {}
    if model is not None:
        from ..models import BUILTINS

        fields["model"] = model_choice(model, choices=[*extra_models, *BUILTINS])
    if ref_dtype is not None:
        fields["ref_dtype"] = dtype_choice(ref_dtype, label="reference dtype")
    if dtype is not None:
        fields["dtype"] = dtype_choice(dtype, label="candidate dtype" if ref_dtype is not None else "dtype")
    if device is not None:
        fields["device"] = device_choice(device)
    if attn_implementation is not None:
        fields["attn_implementation"] = attention_choice(attn_implementation)
    fields.update(knobs)
    return ControlPanel(run, fields=fields, title=title)


def show_all(objects: Iterable[Any]) -> None:
    """Display each result statically (the headless path of a notebook)."""
    from IPython.display import display

    for obj in objects:
        display(obj)
