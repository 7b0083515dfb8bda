"""Failing together: one rank's error ends every rank within seconds, and every rank's log names the
rank that failed, its host and its error, whatever the backend noticed (gloo notices a peer's exit
only inside a collective, NCCL only at the process group's timeout, a rank waiting on its reward
never).

The channel is the process group's key-value store (the TCPStore of the ``env://`` rendezvous, hosted
by rank 0's process; under ``torchrun`` the agent's store), through clients of its own:

- a rank that fails writes ``rank r (host): <error>`` and its exit code, waits (bounded) until the others
  have read it, then exits;
- a daemon watchdog thread on every rank writes a heartbeat every ``poll_s`` and reads the store: another
  rank's failure -> it says so and ends this process with that rank's exit code; the next rank's
  heartbeat silent for ``heartbeat_timeout_s`` (killed, OOM-killed, node lost) -> it reports that rank
  as vanished (exit 5) for everyone; the store itself unreachable (its host died) -> exit 5.
  It ends the process with ``os._exit``: the main thread may be blocked inside a C++ collective that
  no Python exception can interrupt. Each rank watches one neighbour (rank r watches r+1), so the
  store serves a few requests per rank and second whatever the world size; a failure any rank sees
  reaches all through the store.
- a run that ends well closes the channel: rank 0 (the store's host under ``env://``) leaves last, after
  every rank said it is done, so that no watchdog takes a finished rank 0 for a dead one.

Exit codes (``Exit``) keep their meaning on every rank: a rank that ends because another failed exits
with that rank's code.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable


class Exit(enum.IntEnum):
    """The trainer's exit codes, the same on every rank of a run."""

    OK = 0
    ERROR = 1
    """Any other error (a bug, out of memory, an I/O error): the failing rank's log has the traceback."""
    CONFIG = 2
    """A config error, a missing file (weights, prompts, DeepSpeed JSON), or launcher variables that
    do not say who a process is."""
    REWARD = 3
    """A reward raised or returned non-finite values."""
    NONFINITE = 4
    """Too many optimizer steps in a row had a non-finite loss or gradient."""
    PEER_VANISHED = 5
    """A rank vanished without a word: killed (SIGKILL, the OOM killer), its node lost, or the
    rendezvous store's host gone."""
    COLLECTIVE_TIMEOUT = 6
    """A collective waited longer than ``distributed.step_timeout_s`` (``load_timeout_s`` while loading):
    a rank alive but stuck or far slower than the others."""
    INTERRUPTED = 130
    """Ctrl-C twice (the first one checkpoints and exits 0)."""


@dataclass(frozen=True)
class Failure:
    rank: int
    host: str
    code: int
    message: str
    reporter: int  # who wrote it: the failed rank itself, or the rank that noticed it vanish

    def describe(self) -> str:
        return f"rank {self.rank} ({self.host}) failed: {self.message} (exit {self.code})"


def symptom(err: BaseException) -> Exit | None:
    """What ``err`` says when it is only the echo of another rank's trouble, as a collective or the store
    reports it here: COLLECTIVE_TIMEOUT (the others did not come), PEER_VANISHED (a connection to a peer
    closed); None for an error of this rank's own."""
    text = f"{type(err).__name__}: {err}"
    import torch.distributed as tdist

    if not (isinstance(err, tdist.DistError) or "gloo/" in text or "NCCL" in text):
        return None
    if "Timed out waiting" in text or "operation timeout" in text or "timeout" in text.lower():
        return Exit.COLLECTIVE_TIMEOUT
    if isinstance(err, tdist.DistNetworkError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    ):
        return Exit.PEER_VANISHED
    return None


def hard_exit(code: int) -> None:
    """Flush what was said and end the process now: no interpreter teardown (a broken process group's
    destructor aborts, and a thread may be stuck in C++)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe must not stop the exit
            pass
    os._exit(int(code))


def say(line: str) -> None:
    """The last words before an exit go to stderr directly, whatever logging's configuration (its
    handlers print on rank 0 only) and before ``os._exit`` skips logging's shutdown."""
    print(f"[fastcps] {line}", file=sys.stderr, flush=True)


_GENERATION = itertools.count()  # every rank opens its channels in the same order: same key names


class FailureChannel:
    """See the module docstring. ``exit_fn`` ends the process (tests pass one that records the code)."""

    def __init__(
        self,
        store,
        rank: int,
        world: int,
        *,
        heartbeat_timeout_s: float,
        poll_s: float = 1.0,
        host: str | None = None,
        exit_fn: Callable[[int], None] = hard_exit,
        where: str = "the rendezvous store",
        generation: int | None = None,
    ):
        self.rank, self.world, self.poll_s = rank, world, poll_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.host = host or socket.gethostname()
        self.exit_fn, self.where = exit_fn, where
        # the n-th channel of every rank's process uses the same keys (several runs in one process group)
        self.ns = f"fastcps/failure/{next(_GENERATION) if generation is None else generation}/"
        # Clients of their own, with a short timeout: the default store's client is shared with torch
        # (one request at a time) and waits up to the process group's timeout for a dead host.
        timeout = timedelta(seconds=max(heartbeat_timeout_s, 5.0))
        self.store, self._watch_store = store.clone(), store.clone()
        for s in (self.store, self._watch_store):
            s.set_timeout(timeout)
        self._stop = threading.Event()
        self._end_lock = threading.Lock()
        self._ended: int | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- keys -------------------------------------------------------------------------------------
    def _k(self, *parts) -> str:
        return self.ns + "/".join(str(p) for p in parts)

    def start(self) -> "FailureChannel":
        self.store.set(self._k("host", self.rank), self.host)
        self.store.set(self._k("hb", self.rank), "0")
        self._thread = threading.Thread(target=self._watch, name="fastcps-watchdog", daemon=True)
        self._thread.start()
        return self

    # --- reading ----------------------------------------------------------------------------------
    def first_failure(self, store=None) -> Failure | None:
        store = store or self.store
        if not store.check([self._k("first")]):
            return None
        reporter = int(store.get(self._k("first")))
        rec = json.loads(store.get(self._k("fail", reporter)))
        return Failure(**rec, reporter=reporter)

    def wait_for_failure(self, seconds: float) -> Failure | None:
        deadline = time.monotonic() + seconds
        while True:
            failure = self.first_failure()
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(min(self.poll_s, 0.5))

    # --- ending -----------------------------------------------------------------------------------
    def fail(self, code: int, message: str, *, symptom_of_peer: bool = False) -> None:
        """This rank's main thread got an error (already printed by the caller). A symptom of a peer's
        trouble first looks (bounded: long enough for a watchdog to notice a vanished rank) for the
        cause another rank published and ends with it; anything else is published as this rank's
        failure for the others, and this rank exits with ``code`` once they have read it."""
        try:
            if symptom_of_peer:
                cause = self.wait_for_failure(self.heartbeat_timeout_s + 3 * self.poll_s)
                if cause is not None and cause.reporter != self.rank:
                    self._follow(cause, self.store)
                    return
            first = self._publish(Failure(self.rank, self.host, int(code), message, self.rank))
            if first.reporter != self.rank:  # another rank failed first: its waiter counts us too
                self.store.add(self._k("ack"), 1)
            self._end(code, [], wait_for=self.world - 1)
        except Exception as err:  # the store is gone too: nobody is left to tell
            self._end(code, [f"could not tell the other ranks ({self.where}: {err})"], wait_for=0)

    def _publish(self, failure: Failure) -> Failure:
        """Write ``failure`` and make it the run's first unless another came first; returns the first."""
        rec = {k: getattr(failure, k) for k in ("rank", "host", "code", "message")}
        self.store.set(self._k("fail", failure.reporter), json.dumps(rec))
        self.store.compare_set(self._k("first"), "", str(failure.reporter))
        return self.first_failure()

    def _follow(self, cause: Failure, store) -> None:
        lines = [f"stopped: {cause.describe()}; ending rank {self.rank} ({self.host}) too"]
        if self._announce(cause.code, lines):
            try:
                store.add(self._k("ack"), 1)
            except Exception:
                pass
        self.exit_fn(self._ended)

    def _announce(self, code: int, lines: list[str]) -> bool:
        """Say ``lines`` and fix the exit code, once per process (the watchdog and the main thread may both
        get here); False when another path already did."""
        with self._end_lock:
            if self._ended is not None:
                return False
            self._ended = int(code)
        for line in lines:
            say(line)
        return True

    def _end(self, code: int, lines: list[str], wait_for: int, store=None) -> None:
        """Announce, wait (at most ``heartbeat_timeout_s``) until ``wait_for`` ranks acknowledged or had
        finished, exit. The wait matters on the store's host: its exit takes the message with it."""
        store = store or self.store
        if self._announce(code, lines) and wait_for > 0:
            deadline = time.monotonic() + self.heartbeat_timeout_s
            try:
                while time.monotonic() < deadline:
                    if store.add(self._k("ack"), 0) + store.add(self._k("closed"), 0) >= wait_for:
                        break
                    time.sleep(0.1)
            except Exception:
                pass
        self.exit_fn(self._ended)

    # --- the watchdog -----------------------------------------------------------------------------
    def _watch(self) -> None:
        store, beat = self._watch_store, 0
        watched = (self.rank + 1) % self.world
        seen, since = None, time.monotonic()  # a key never written counts as silent from the start
        while not self._stop.wait(self.poll_s):
            try:
                beat += 1
                store.set(self._k("hb", self.rank), str(beat))
                if self._ended is not None:  # the main thread is ending: keep beating while it waits
                    continue
                cause = self.first_failure(store)
                if cause is not None and cause.reporter != self.rank:
                    self._follow(cause, store)
                    return
                value = store.get(self._k("hb", watched)) if store.check([self._k("hb", watched)]) else None
                now = time.monotonic()
                if value != seen:
                    seen, since = value, now
                elif value != b"closed" and now - since > self.heartbeat_timeout_s:
                    self._report_vanished(store, watched, now - since)
                    return
            except Exception as err:
                if self._closing or self._stop.is_set():
                    return
                lines = [
                    f"stopped: lost {self.where} ({type(err).__name__}: {err}): the process hosting it "
                    "(rank 0, or torchrun's agent on its node) is gone; ending rank "
                    f"{self.rank} ({self.host}) with exit {int(Exit.PEER_VANISHED)}"
                ]
                self._end(Exit.PEER_VANISHED, lines, wait_for=0, store=store)
                return

    def _report_vanished(self, store, rank: int, silent_s: float) -> None:
        host = store.get(self._k("host", rank)).decode() if store.check([self._k("host", rank)]) else "?"
        message = (
            f"vanished: no heartbeat for {silent_s:.0f} s (distributed.heartbeat_timeout_s = "
            f"{self.heartbeat_timeout_s:g}; killed, e.g. by the OOM killer, or its node is down), "
            f"noticed by rank {self.rank}"
        )
        rec = {"rank": rank, "host": host, "code": int(Exit.PEER_VANISHED), "message": message}
        store.set(self._k("fail", self.rank), json.dumps(rec))
        store.compare_set(self._k("first"), "", str(self.rank))
        first = self.first_failure(store)
        if first.reporter != self.rank:
            self._follow(first, store)
            return
        lines = [f"stopped: {first.describe()}; ending rank {self.rank} ({self.host}) too"]
        self._end(first.code, lines, wait_for=self.world - 2, store=store)

    # --- a good end -------------------------------------------------------------------------------
    def close(self, wait_s: float) -> None:
        """This rank finished well. Rank 0 waits (at most ``wait_s``, still watching for failures and
        silent ranks) until every rank has closed: its exit may take the store with it."""
        self._closing = True
        try:
            self.store.set(self._k("hb", self.rank), "closed")
            self.store.add(self._k("closed"), 1)
            if self.rank == 0:
                self._wait_for_all_closed(wait_s)
        except Exception as err:  # the run is done here; only the farewell failed
            say(f"warning: could not confirm that every rank finished ({self.where}: {err})")
        self._stop_watchdog()

    def _wait_for_all_closed(self, wait_s: float) -> None:
        deadline, keys = time.monotonic() + wait_s, [self._k("hb", r) for r in range(self.world)]
        last: dict[int, tuple[bytes, float]] = {}
        while self.store.add(self._k("closed"), 0) < self.world:
            if time.monotonic() > deadline:
                say(f"warning: not every rank finished within {wait_s:g} s of rank 0; leaving")
                return
            cause = self.first_failure()
            if cause is not None:
                self._follow(cause, self.store)
                return
            now = time.monotonic()
            for r, value in enumerate(self.store.multi_get(keys)):
                if value != last.get(r, (None, 0.0))[0]:
                    last[r] = (value, now)
                elif value != b"closed" and now - last[r][1] > self.heartbeat_timeout_s:
                    self._report_vanished(self.store, r, now - last[r][1])
                    return
            time.sleep(self.poll_s)

    def _stop_watchdog(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(10.0, 2 * self.poll_s))
