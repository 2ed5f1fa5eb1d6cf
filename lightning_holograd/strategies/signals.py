"""SIGTERM on any rank ends the whole job within seconds (README "Failure and recovery").

Two paths, installed per rank at setup:

- **Clean stop.** The SIGTERM handler only sets ``exchange.stop_requested``. The flag rides
  in the next step's commit (docs/PROTOCOL.md §1.1), so every rank raises
  ``StopRequested`` before the same step and Lightning tears down as for any exception.
  It also forwards the signal to the ranks that Lightning's script launcher started.
- **Hard exit.** A Python signal handler runs only when the main thread is between
  bytecodes; a rank blocked in a collective (a peer died or hangs) never runs it. So the
  C-level handler's wakeup byte (``signal.set_wakeup_fd``) is read by a watchdog thread,
  which ends the process with exit code 143 if it is still alive ``grace_s`` seconds
  after the signal. Its peers then see their connections close and stop too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

__all__ = ["StopOnSignal", "check_sigterm_grace"]

log = logging.getLogger(__name__)
EXIT_CODE = 128 + signal.SIGTERM


def check_sigterm_grace(value: object) -> float:
    """``sigterm_grace`` as seconds, or ValueError naming it (the Trainer and Fabric strategies)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"sigterm_grace={value!r} must be a number of seconds > 0. HINT: 10.")
    return float(value)


class StopOnSignal:
    """The SIGTERM handling of one rank; ``install`` at setup, ``uninstall`` at teardown."""

    def __init__(self, exchange: Any, launcher: Any, grace_s: float) -> None:
        self.exchange = exchange
        self.launcher = launcher
        self.grace_s = grace_s
        self._pipe: tuple[int, int] | None = None
        self._previous_fd: int | None = None

    def notify(self, signum: int, frame: Any) -> None:
        """The Python-level handler (replaces Lightning's notifier): flag, forward, return."""
        first = not self.exchange.stop_requested
        self.exchange.stop_requested = True
        if first:
            log.warning("received signal %d: stopping every rank before the next step", signum)
            if self.launcher is not None:
                self.launcher.kill(signum)

    def install(self) -> None:
        """Start the watchdog (main thread only; elsewhere signals are not delivered to Python)."""
        if threading.current_thread() is not threading.main_thread() or self._pipe is not None:
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main interpreter
            os.close(read_fd)
            os.close(write_fd)
            return
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="holograd-sigterm-watchdog", daemon=True).start()

    def uninstall(self) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        read_fd, write_fd = self._pipe
        self._pipe = None
        os.close(write_fd)  # the watchdog reads EOF and ends
        del read_fd

    def _watch(self, read_fd: int) -> None:
        try:
            while True:
                data = os.read(read_fd, 64)
                if not data:
                    return
                if signal.SIGTERM in data:
                    timer = threading.Timer(self.grace_s, self._hard_exit)
                    timer.daemon = True
                    timer.start()
                    return
        finally:
            os.close(read_fd)

    def _hard_exit(self) -> None:
        log.error("still running %g s after SIGTERM (blocked in a collective?): exiting with code %d",
                  self.grace_s, EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)
