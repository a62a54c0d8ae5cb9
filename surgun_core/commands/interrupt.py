"""Ctrl-C on the command line: a KeyboardInterrupt, as Python's own handler raises, and a record of it.

Measured on the `surgun` start-up (Ctrl-C at 0.5-1.7 s in steps of 20 ms): a KeyboardInterrupt raised while
torch is being imported can abort the process ("terminate called after throwing an instance of
'pybind11::error_already_set'": torch's C++ start-up calls back into Python), and one raised while diffusers
imports lazily comes out as "RuntimeError: Failed to import ..." (numpy's lazy attributes recursed), or is
swallowed. So: while the libraries load (`deferred`), Ctrl-C is only recorded and raised at the next `check`
(a second Ctrl-C raises at once); later it raises at once, and an error that surfaces after it was pressed is
still reported as the interrupt; each progress report checks for one that was swallowed.
Imports nothing slow: cli.py uses it before anything else is loaded.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pressed = threading.Event()
_deferring = threading.Event()


def _handler(signum, frame) -> None:
    first = not _pressed.is_set()
    _pressed.set()
    if first and _deferring.is_set():
        return  # raised by check() once the libraries are loaded
    raise KeyboardInterrupt


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """While inside: Ctrl-C raises KeyboardInterrupt and is remembered. The previous handler comes back after;
    a SIGINT that was ignored (a background job) or handled by someone else is left alone."""
    _pressed.clear()
    ours = threading.current_thread() is threading.main_thread()
    ours = ours and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        _pressed.clear()  # a later run in this process (tests, an embedding program) starts afresh
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside (the libraries load): a first Ctrl-C is recorded, not raised; call check() after."""
    _deferring.set()
    try:
        yield
    finally:
        _deferring.clear()


def pressed() -> bool:
    """Ctrl-C was pressed since recording() began (whatever became of its KeyboardInterrupt)."""
    return _pressed.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed and a library swallowed it."""
    if _pressed.is_set():
        raise KeyboardInterrupt
