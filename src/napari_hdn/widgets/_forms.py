"""Small Qt form helpers shared by the widgets: fields that do not widen the dock, status lines,
a scrolling body, a collapsible section, file dialogs, and notifications (GUI thread only)."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QLabel,
    QMessageBox,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..engine.options import bounds, check_option

MAX_SEED = 999_999
#: the largest value a QSpinBox holds
_INT_MAX = 2**31 - 1
ERROR_STYLE = "color: #f77;"  # readable on napari's dark and light themes


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def narrow(w: QComboBox, min_chars: int = 10) -> QComboBox:
    """Let a combo box shrink below its longest item (a docked widget must not widen the window)."""
    w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    w.setMinimumContentsLength(min_chars)
    w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    return w


def combo(items=(), tip: str = "", min_chars: int = 10) -> QComboBox:
    """A combo box of ``items`` (strings, or (label, data) tuples)."""
    w = narrow(QComboBox(), min_chars)
    for it in items:
        if isinstance(it, tuple):
            w.addItem(*it)
        else:
            w.addItem(it)
    if tip:
        w.setToolTip(tip)
    return w


def rule_range(key: str, *, special: bool = False, least=None, most=None) -> tuple:
    """A spin box's (minimum, maximum) for the option ``key`` of the engine's option rules, so that
    a form never offers what the engine refuses.

    ``least``/``most`` narrow the range where a form offers less than the rule allows (each must
    be a value the rule accepts); ``special`` puts 0 below the range, for a spin box's special value
    ("auto", "no limit").
    """
    lo, hi = bounds(key)
    lo = lo if least is None else check_option(key, least)
    hi = hi if most is None else check_option(key, most)
    if isinstance(lo, int) and isinstance(hi, int):
        hi = min(hi, _INT_MAX)
    return (0 if special else lo), hi


def spin(lo: int, hi: int, value: int, step: int = 1, tip: str = "", special: str = "") -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    if tip:
        w.setToolTip(tip)
    if special:
        w.setSpecialValueText(special)
    return w


def dspin(lo: float, hi: float, value: float, step: float = 0.1, decimals: int = 2,
          tip: str = "") -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setDecimals(decimals)
    w.setSingleStep(step)
    w.setValue(value)
    if tip:
        w.setToolTip(tip)
    return w


def form(rows=()) -> QFormLayout:
    """A form layout whose fields grow with the dock; ``rows`` are (label, widget) pairs."""
    f = QFormLayout()
    f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    f.setContentsMargins(0, 0, 0, 0)
    for label, widget in rows:
        f.addRow(label, widget)
    return f


def status_label(text: str = "") -> QLabel:
    """A wrapping, selectable line of text (messages can be copied)."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return lab


def set_message(label: QLabel, text: str, error: bool = False) -> None:
    """Show ``text`` in a status line, in the error colour when ``error``."""
    label.setStyleSheet(ERROR_STYLE if error else "")
    label.setText(text)


def scroll_body(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a vertical scroll area and return the layout of its content.

    Docked widgets get the height napari's window leaves them; a long form must scroll rather
    than squash its rows.
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area)
    return QVBoxLayout(inner)


class Collapsible(QWidget):
    """A section with a toggle button that shows or hides its content (for 'Advanced')."""

    def __init__(self, title: str, parent=None) -> None:
        super().__init__(parent)
        self.button = QToolButton(text=title, checkable=True, checked=False)
        self.button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.button.setArrowType(Qt.ArrowType.RightArrow)
        self.button.setStyleSheet("QToolButton { border: none; }")
        self.content = QFrame()
        self.content.setVisible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.button)
        lay.addWidget(self.content)
        self.button.toggled.connect(self.set_expanded)

    def set_expanded(self, on: bool) -> None:
        self.button.setChecked(on)
        self.button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.content.setVisible(on)


# -- file dialogs --------------------------------------------------------------------------------

MODEL_FILTER = "HDN model (*.hdn *.zip);;All files (*)"
NOISE_FILTER = "Noise model (*.hdnoise);;All files (*)"


def ask_open(parent, title: str, filters: str, path=None) -> Path | None:
    """``path`` as it is, or one chosen in a file dialog (None when cancelled)."""
    if path is None:
        path, _ = QFileDialog.getOpenFileName(parent, title, "", filters)
    return Path(path) if path else None


def ask_save(parent, title: str, default_name: str, filters: str, suffix: str, path=None) -> Path | None:
    """A path to save to, ending in ``suffix`` (asked for when ``path`` is None).

    The dialog asks before replacing the file the user chose; when ``suffix`` had to be added, the
    file with the suffix is another one, so replacing that one is asked here.
    """
    asked = path is None
    if asked:
        path, _ = QFileDialog.getSaveFileName(parent, title, default_name, filters)
        if not path:
            return None
    path = Path(path)
    if path.suffix == suffix:
        return path
    path = path.with_name(path.name + suffix)
    if asked and path.exists() and not confirm_replace(parent, title, path):
        return None
    return path


def confirm_replace(parent, title: str, path: Path) -> bool:
    """Ask whether to replace the existing file ``path``."""
    answer = QMessageBox.question(parent, title, f"{path.name} already exists in {path.parent}.\n"
                                  "Do you want to replace it?",
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
