"""Ctrl-C and SIGTERM as a request the training loop reads between steps.

A KeyboardInterrupt can land anywhere, including between `optimizer.step()` and the line that
advances the run's position: a checkpoint saved then would hold updated weights with the old
position, and `--resume` would apply that batch twice. Inside `stop_requests()` the first SIGINT or
SIGTERM only sets a flag; the loop finishes the step it is in, records it, and saves. A second
Ctrl-C means "now": it raises KeyboardInterrupt, and the last checkpoint on disk (always
consistent) is what a resume starts from.
"""

import signal
import sys
import threading
from contextlib import contextmanager


class StopRequest:
    signum: int | None = None  # the signal that asked to stop, if one did

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once, without saving
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again: stop now, keep the last checkpoint)\n")


@contextmanager
def stop_requests():
    """Yield a StopRequest set by SIGINT/SIGTERM; the previous handlers come back on exit."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield stop
        return
    # a signal the process was started with ignored (SIGINT in a background job) stays ignored
    wanted = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, stop._handle) for s in wanted}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
