"""What every training loop of the package shares: where a run is saved, when, and how it stops.

``RunFolder`` writes the model and its resumable state (optimizer, scheduler, RNGs, progress) into
one folder, whole (checkpoint.replacing), at the loop's request, every ``save_every_minutes`` and
when ``StopRequests`` caught SIGINT or SIGTERM; ``refuse_other_settings`` is the one-line refusal
to continue a saved run whose settings or data differ. MBC's trainer (trainer.py) and the token
memory's reader and codes (token_memory.py) both run on it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Callable

from mbc import checkpoint
from mbc.errors import MBCError
from mbc.training.state import save_training_state


class TrainingInterrupted(MBCError):
    """Training stopped on SIGINT / SIGTERM after saving a resumable state."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


class StopRequests:
    """SIGINT and SIGTERM ask training to stop at the end of the current step, saved; a second
    SIGINT stops at once (KeyboardInterrupt), losing only what the last save did not hold."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def interrupted(self, where: str, saved_in: str) -> TrainingInterrupted:
        """The error that ends a run stopped by the caught signal at ``where`` ("step 3 of 10")."""
        name = signal.Signals(self.signum).name
        return TrainingInterrupted(
            f"interrupted by {name} at {where}: {saved_in}; run the same command again to continue", self.signum
        )


class RunFolder:
    """A run's saved state in ``folder``: ``save`` writes the model (``checkpoint.write``) and
    ``save_training_state(optimizer, scheduler, progress())`` whole; ``due`` says when
    ``save_every_minutes`` have passed since the last save. With several processes only the
    ``main`` one writes, and ``barrier`` (e.g. accelerate's ``wait_for_everyone``) holds the others
    until it has."""

    def __init__(
        self,
        folder: Path,
        model,
        optimizer,
        scheduler,
        progress: Callable[[], dict],
        save_every_minutes: float,
        main: bool = True,
        barrier: Callable[[], None] = lambda: None,
    ):
        self.folder, self.model, self.optimizer, self.scheduler = Path(folder), model, optimizer, scheduler
        self.progress, self.every, self.main, self.barrier = progress, save_every_minutes, main, barrier
        self.saved_at = time.perf_counter()

    def write(self, into: Path) -> None:
        """The model and everything needed to continue, written whole into ``into``."""
        if self.main:
            with checkpoint.replacing(into) as partial:
                checkpoint.write(self.model, partial)
                save_training_state(partial, self.optimizer, self.scheduler, self.progress())
        self.barrier()

    def save(self) -> None:
        self.write(self.folder)
        self.saved_at = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.saved_at > 60 * self.every


def refuse_other_settings(
    folder: Path, what: str, saved: dict, asked: dict, remedy: str | None = "train into a new --output folder"
) -> None:
    """One line naming the settings that differ (saved -> now) when ``folder`` holds ``what`` with
    settings other than ``asked``: a run continues only with its own settings and data (or, where
    given, ``remedy``)."""
    differing = [
        f"{key} {saved.get(key)!r} -> {asked.get(key)!r}"
        for key in sorted(set(saved) | set(asked))
        if saved.get(key) != asked.get(key)
    ]
    if differing:
        raise MBCError(
            f"{folder} holds {what} with other settings (saved -> now): {'; '.join(differing[:6])}; "
            "continue it with the same settings and data" + (f", or {remedy}" if remedy else "")
        )
