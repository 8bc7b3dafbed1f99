"""The signals that end a command: Ctrl-C (SIGINT), SIGTERM (what a cluster scheduler or ``kill``
sends before it kills a job) and SIGHUP (the terminal closed).

All three mean the same to napari-hdn. Around the long work of a command (:class:`._common.SigintStop`)
the first asks the work to stop, keep and save what it has done; elsewhere in a command
(:func:`interrupt_on_signals`) SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so that
every command ends through its ``finally`` blocks (temporary files removed, output locks given
back), prints "napari-hdn: interrupted" and exits with 130. A signal that was ignored when the
command started (``nohup`` ignores SIGHUP) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

#: the signals that stop a command, those this platform has
STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

#: seconds within which a repeated SIGTERM or SIGHUP is the same request delivered twice (a
#: scheduler that signals every process of a job while a launcher forwards the signal too), not a
#: second one asking to abort
DUPLICATE_S = 1.0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover - not a known signal
        return f"signal {signum}"


def install(handler: Callable, signals=STOP_SIGNALS) -> dict:
    """Set ``handler`` for ``signals`` (in the main thread; nothing elsewhere) and return the
    previous handlers for :func:`restore`. A signal ignored now stays ignored (except Ctrl-C, whose
    handler napari-hdn always sets, as before)."""
    old: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for s in signals:
        try:
            previous = signal.getsignal(s)
            if previous is signal.SIG_IGN and s != signal.SIGINT:
                continue
            old[s] = signal.signal(s, handler)
        except (OSError, ValueError):  # pragma: no cover - not settable here
            continue
    return old


def restore(old: dict) -> None:
    for s, h in old.items():
        with contextlib.suppress(OSError, ValueError, TypeError):
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def say(text: str) -> None:
    """Print ``text`` on stderr from a signal handler. After SIGHUP the terminal may be gone:
    writing to it fails, and so would every later progress bar and message; stdout and stderr are
    then sent to the null device, so that the work can finish and save what it has."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        silence_terminal()


def silence_terminal() -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - nothing more can be done
        return
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal_name(signum))


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does."""
    others = tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)
    old = install(_interrupt, others)
    try:
        yield
    finally:
        restore(old)
