"""Import structure: the file reader, the session, the demo and the benchmark pull in no Qt, no
matplotlib and no command line; no widget module imports another (shared parts live in the widgets'
own shared modules)."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import numpy as np
from _widget_helpers import tiny_model

import napari_hdn

GUI_PACKAGES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "matplotlib", "napari")


def test_reader_session_demo_and_bench_import_no_qt_matplotlib_or_cli(tmp_path):
    path = tmp_path / "m.hdn"
    tiny_model(np.random.default_rng(0).normal(50, 5, (64, 64)).astype(np.float32)).save(path)
    probe = (
        "import sys, json\n"
        "import napari_hdn._reader, napari_hdn._writer, napari_hdn.session, napari_hdn.demo\n"
        "import napari_hdn.bench\n"
        "from napari_hdn.session import get_session\n"
        f"e = get_session().open_model_file({str(path)!r})\n"  # what the reader does with a file
        "assert e.name == 'm' and e.model.levels == 2\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in mods if m.split(".")[0] in GUI_PACKAGES], mods
    assert not [m for m in mods if m.startswith("napari_hdn.cli")]  # the cli <-> demo cycle is gone
    assert not [m for m in mods if m.startswith("napari_hdn.widgets")]


def test_no_widget_module_imports_another():
    root = pathlib.Path(napari_hdn.__file__).parent / "widgets"
    widgets = {p.stem for p in root.glob("*_widget.py")}
    assert widgets == {"noise_widget", "train_widget", "predict_widget", "artefact_widget"}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {(node.module or "").split(".")[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        imported |= {a.name.split(".")[-1] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for a in node.names}
        if path.stem != "__init__":  # (the package lists them all)
            assert not (imported & widgets), (path.name, imported & widgets)
