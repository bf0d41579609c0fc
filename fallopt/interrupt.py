"""Ctrl-C that always ends a run KILLED, even when a library swallows the KeyboardInterrupt.

Python raises KeyboardInterrupt in whatever code runs when SIGINT arrives. If that is a
finalizer or a weakref callback (TensorFlow's import runs many), Python prints "Exception
ignored in ..." and carries on: the audit saw runs go on to FINISHED, exit 0, in 2 of 17
tries. Or the library fails on what the interrupt left half done (an AttributeError from
Keras, seen once in 6 tries): the error is not the cause. So the handler also remembers the
signal; `check()` raises it again where a run is about to start or finish, and a run that
fails after it (`received()`) ends KILLED.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_received = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT in this process (main thread only; an ignored SIGINT stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # e.g. nohup: the user asked for it
        return
    signal.signal(signal.SIGINT, _on_sigint)


def received() -> bool:
    """Whether SIGINT arrived since `install`."""
    return _received


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived since `install`, wherever it was swallowed."""
    if _received:
        raise KeyboardInterrupt("Ctrl-C (SIGINT) received")
