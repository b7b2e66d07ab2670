"""Progress bars that keep a redirected log clean.

Every bar of a run comes from :func:`bar`. On a terminal it is a live tqdm bar;
when stderr is not a terminal (``bgd quantize ... 2> log``) it is disabled, so
the log holds the log lines only, with no cursor-movement debris (``\\x1b[A``).
The CLI routes logging through tqdm (``logging_redirect_tqdm``) so log lines
print above the bars instead of through them.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, initial: int = 0,
        leave: bool = True, file=None) -> tqdm:
    """A tqdm bar on stderr; off when ``enabled`` is false or stderr is not a terminal."""
    stream = file if file is not None else sys.stderr
    disable = True if not enabled else (None if file is None else not stream.isatty())
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, disable=disable, file=stream,
                dynamic_ncols=True)


class PhaseBar:
    """The driver's view of a distillation phase: ``update(step, loss)`` as the workers report,
    with step / total, loss, steps/s and ETA (tqdm's rate and remaining time)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        self.bar = bar(total, desc, "step", enabled, initial)
        self.step = initial
        self.loss: float | None = None
        self._shown = 0.0

    def update(self, step: int, loss: float | None = None) -> None:
        if step > self.step:
            self.bar.update(step - self.step)
            self.step = step
        if loss is not None:
            self.loss = loss
            now = time.monotonic()
            if now - self._shown > 0.5:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                self._shown = now

    def rewind(self, step: int) -> None:
        """Steps after ``step`` will be run again (a worker was replaced)."""
        self.bar.reset(total=self.bar.total)
        self.bar.update(step)
        self.step = step

    def close(self) -> None:
        if self.loss is not None:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", refresh=False)
        self.bar.close()
