"""Environment capsule, findings files and HTML export."""

from __future__ import annotations

import base64
import io
import json
import math
import sys

import nbformat
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import parity_kit as pk
from parity_kit._util.environment import diff_capsules, environment_capsule
from parity_kit.errors import ParityKitError
from parity_kit.present import report
from parity_kit.present.report import export_html, read_findings, write_findings

REQUIRED_KEYS = {
    "python", "platform", "torch", "transformers", "cuda_version", "cuda_devices", "tf32_matmul", "tf32_cudnn",
    "float32_matmul_precision", "sdpa_flash", "sdpa_mem_efficient", "sdpa_math", "sdpa_cudnn",
    "deterministic_algorithms", "default_dtype", "torch_initial_seed", "parity_kit", "git_commit", "fla",
    "torch_num_threads",
}


def test_capsule_has_required_keys_and_serialises_to_strict_json():
    cap = environment_capsule()
    assert REQUIRED_KEYS <= set(cap)
    assert json.loads(json.dumps(cap, allow_nan=False)) == cap
    assert cap["torch"] == torch.__version__
    assert cap["python_prefix"] == sys.prefix
    assert cap["default_dtype"] == "fp32"
    assert cap["torch_num_threads"] == torch.get_num_threads()
    assert cap["cuda_devices"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def test_capsule_reads_the_live_flags():
    old_tf32, old_det, old_seed = torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(), torch.initial_seed()
    old_dtype = torch.get_default_dtype()
    try:
        torch.backends.cuda.matmul.allow_tf32 = not old_tf32
        torch.use_deterministic_algorithms(not old_det)
        torch.manual_seed(1234)
        torch.set_default_dtype(torch.float64)
        cap = environment_capsule()
        assert cap["tf32_matmul"] is (not old_tf32)
        assert cap["deterministic_algorithms"] is (not old_det)
        assert cap["torch_initial_seed"] == 1234
        assert cap["default_dtype"] == "fp64"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.use_deterministic_algorithms(old_det)
        torch.manual_seed(old_seed)
        torch.set_default_dtype(old_dtype)


def test_diff_capsules_lists_changed_added_and_nested_keys():
    a = {"torch": "2.13.0", "tf32_matmul": False, "cuda_devices": [], "extra": {"x": 1, "y": 2}}
    b = {"torch": "2.13.0", "tf32_matmul": True, "cuda_devices": ["H200"], "extra": {"x": 1, "y": 3}, "fla": "0.6.0"}
    d = diff_capsules(a, b)
    assert list(d.columns) == ["key", "a", "b"]
    assert d["key"].tolist() == ["tf32_matmul", "cuda_devices", "extra.y", "fla"]
    assert d.set_index("key").loc["fla", "a"] is None
    assert diff_capsules(a, dict(a)).empty


def test_write_findings_format_and_conversions(tmp_path):
    figures = {
        "max_rel_rms": np.float32(0.25),
        "count": np.int64(3),
        "per_layer": torch.tensor([0.5, 1.5]),
        "scalar_tensor": torch.tensor(2.0),
        "array": np.array([[1, 2], [3, 4]]),
        "nested": {"a": 1, "b": [1.0, None]},
        "first_divergence": None,
        "nan": float("nan"),
        "inf": [float("inf"), -math.inf],
    }
    path = write_findings("00_quickstart.ipynb", {"dtype": torch.bfloat16, "seq_len": np.int64(8)}, "it agrees",
                          figures, reports_dir=tmp_path / "reports")
    assert path == tmp_path / "reports" / "00_quickstart.findings.json"
    raw = json.loads(path.read_text())  # strict JSON: json.loads accepts NaN, so check the text too
    assert "NaN" not in path.read_text().replace('"NaN"', "")
    assert set(raw) == {"notebook", "parameters", "conclusion", "figures", "environment"}
    assert raw["notebook"] == "00_quickstart"
    assert raw["parameters"] == {"dtype": "bf16", "seq_len": 8}
    assert raw["conclusion"] == "it agrees"
    assert raw["figures"]["max_rel_rms"] == 0.25
    assert raw["figures"]["count"] == 3 and isinstance(raw["figures"]["count"], int)
    assert raw["figures"]["per_layer"] == [0.5, 1.5]
    assert raw["figures"]["scalar_tensor"] == 2.0
    assert raw["figures"]["array"] == [[1, 2], [3, 4]]
    assert raw["figures"]["nested"] == {"a": 1, "b": [1.0, None]}
    assert raw["figures"]["first_divergence"] is None
    assert raw["figures"]["nan"] == "NaN" and raw["figures"]["inf"] == ["Infinity", "-Infinity"]
    assert raw["environment"]["torch"] == torch.__version__
    back = read_findings(path)
    assert math.isnan(back["figures"]["nan"]) and back["figures"]["inf"] == [math.inf, -math.inf]
    assert pk.write_findings is write_findings


@pytest.mark.parametrize("bad", ["model.layers.3", True, object(), [1, "x"], {"a": {"b": "c"}}, 1 + 2j,
                                 np.array(["a"]), torch.tensor([True])])
def test_bad_figures_raise_and_write_nothing(tmp_path, bad):
    with pytest.raises(ParityKitError, match="figure"):
        write_findings("nb", {}, "conclusion", {"x": bad}, reports_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"notebook": "../escape"}, "plain name"),
    ({"notebook": ""}, "plain name"),
    ({"conclusion": "  "}, "conclusion"),
    ({"figures": [1, 2]}, "figures must be a dict"),
    ({"parameters": {"model": object()}}, "parameter 'model'"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    args = {"notebook": "nb", "parameters": {}, "conclusion": "c", "figures": {}, **kwargs}
    with pytest.raises(ParityKitError, match=match):
        write_findings(**args, reports_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failing_serialisation_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    old = write_findings("nb", {}, "old conclusion", {"x": 1}, reports_dir=tmp_path)
    before = old.read_text()

    def dump_half_then_fail(obj, f, **kwargs):
        f.write('{"notebook": "nb", "param')
        raise OSError("disk full")

    monkeypatch.setattr(report.json, "dump", dump_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_findings("nb", {}, "new conclusion", {"x": 2}, reports_dir=tmp_path)
    with pytest.raises(OSError, match="disk full"):
        write_findings("other", {}, "new conclusion", {"x": 2}, reports_dir=tmp_path)
    assert old.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.findings.json"]


def test_read_findings_errors(tmp_path):
    with pytest.raises(ParityKitError, match="no findings file"):
        read_findings(tmp_path / "missing.findings.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ParityKitError, match="not a valid findings file"):
        read_findings(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"notebook": "x"}')
    with pytest.raises(ParityKitError, match="missing keys"):
        read_findings(tmp_path / "partial.json")


def _notebook_with_figure() -> nbformat.NotebookNode:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = base64.b64encode(buf.getvalue()).decode()
    cell = nbformat.v4.new_code_cell("secret_source_marker = plot()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Story title"), cell])


def test_export_html_embeds_images_and_can_hide_code(tmp_path):
    nb_path = tmp_path / "story.ipynb"
    nbformat.write(_notebook_with_figure(), nb_path)
    full = export_html(nb_path, tmp_path / "out" / "full.html").read_text()
    assert "data:image/png;base64," in full
    assert "Story title" in full and "secret_source_marker" in full
    bare = export_html(nb_path, tmp_path / "bare.html", hide_code=True).read_text()
    assert "data:image/png;base64," in bare and "Story title" in bare
    assert "secret_source_marker" not in bare
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.html", "out", "story.ipynb"]


def test_export_html_bad_input(tmp_path):
    with pytest.raises(ParityKitError, match="no notebook"):
        export_html(tmp_path / "nope.ipynb", tmp_path / "x.html")
    (tmp_path / "bad.ipynb").write_text("not a notebook")
    with pytest.raises(ParityKitError, match="not a readable notebook"):
        export_html(tmp_path / "bad.ipynb", tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()
