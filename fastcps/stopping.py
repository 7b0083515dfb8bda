"""How a run stops before its last epoch: a signal (SIGTERM, Ctrl-C) asks for a checkpoint at the next
step (``SignalStop``, then ``Interrupted``); too many non-finite optimizer steps in a row end it
(``NonFiniteStop``). ``fastcps.trainer.Trainer`` raises both; ``fastcps.train`` reports them."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived: checkpoint and leave."""


class NonFiniteStop(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SignalStop:
    """SIGTERM or Ctrl-C sets ``requested`` (the trainer checks it on every rank, at each rollout batch and
    at the end of each epoch, and then checkpoints); a second Ctrl-C leaves at once. ``install`` puts the
    handlers in, ``restore`` puts back the ones that were there before."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.requested = True
        log.info("got signal %d: writing a checkpoint at the next step", signum)

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
