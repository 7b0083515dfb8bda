"""A signal stops a run at the next step, not at once: SIGTERM or a first Ctrl-C only sets the flag the
trainer checks (it then checkpoints), a second Ctrl-C leaves now, and the handlers that were there before
come back after the run (``fastcps.stopping.SignalStop``, which ``Trainer.fit`` installs)."""

import os
import signal

import pytest

from fastcps.stopping import SignalStop


@pytest.fixture
def stop():
    before = {s: signal.getsignal(s) for s in SignalStop.SIGNALS}
    stop = SignalStop()
    stop.install()
    yield stop
    stop.restore()
    for s, h in before.items():
        signal.signal(s, h)


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_first_signal_asks_for_a_stop_and_does_not_interrupt(stop, first):
    assert not stop.requested
    os.kill(os.getpid(), first)  # the handler runs in this (main) thread before the next line
    assert stop.requested


def test_a_second_ctrl_c_leaves_at_once(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_restore_puts_back_the_handlers_of_before():
    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in SignalStop.SIGNALS}
    try:
        stop = SignalStop()
        stop.install()
        assert all(signal.getsignal(s) != mine for s in SignalStop.SIGNALS)
        stop.restore()
        assert all(signal.getsignal(s) is mine for s in SignalStop.SIGNALS)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
