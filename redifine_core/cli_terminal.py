"""What every ``redifine`` command shares at the terminal: exit statuses, Ctrl-C as a cancel request, and
third-party chatter kept off the screen unless ``--verbose``."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from .progress import CancelToken

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class SigintCancel:
    """First Ctrl-C sets the cancel token (stop at the next step); a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.token = CancelToken()
        self._old: Any = None

    def __enter__(self) -> "SigintCancel":
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handler(self, signum, frame) -> None:
        if self.token.is_set():
            raise KeyboardInterrupt
        self.token.set()
        print("\nstopping at the next step (press Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ------------------------------------------------------------------------------------------- third-party output
@contextmanager
def third_party_quiet(verbose: bool = False) -> Iterator[None]:
    """Unless ``verbose``: transformers/diffusers warnings and "Loading ..." bars and Python warnings off the screen.

    Our own progress bars are separate (``--quiet``). With both off, an error is the one line on stderr.
    """
    if verbose:
        yield
        return
    import warnings

    saved = []
    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            lg = __import__(mod, fromlist=["set_verbosity_error"])
        except Exception:  # not installed: nothing to silence
            continue
        saved.append((lg, lg.get_verbosity(), lg.is_progress_bar_enabled()))
        lg.set_verbosity_error()
        lg.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level, bars in saved:
                lg.set_verbosity(level)
                (lg.enable_progress_bar if bars else lg.disable_progress_bar)()
