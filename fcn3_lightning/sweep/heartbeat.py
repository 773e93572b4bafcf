"""Heartbeats: a trial whose worker died (``kill -9``, a lost machine) ends as FAIL instead of RUNNING forever.

Optuna has heartbeats for RDB storages only; this one works the same on every storage (SQLite, RDB URLs and the
journal file): a thread of the worker stamps its running trial's system attribute every ``interval`` seconds, and
any worker fails the RUNNING trials whose stamp is older than ``grace`` seconds before it asks for a new trial and
when it stops. Timestamps are wall-clock seconds, so workers on several machines need synchronised clocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "fcn3_sweep:heartbeat"


def last_beat(trial: FrozenTrial) -> float:
    """When the trial's worker was last known alive (its start if no heartbeat arrived yet)."""
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


class Heartbeat:
    """``with Heartbeat(storage, trial_id, interval):`` stamps the trial while the block runs."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sweep-heartbeat-{trial_id}", daemon=True)
        self.lost = False  # set when the trial was failed by another worker (this one looked dead)

    def _run(self) -> None:
        while True:
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                self.lost = True
                log.warning("trial id %d was finished by another worker (its heartbeat looked stale)", self.trial_id)
                return
            except Exception as e:  # a storage hiccup (e.g. a locked SQLite file): try again at the next beat
                log.warning("heartbeat of trial id %d not recorded: %s", self.trial_id, e)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    grace: float,
    on_failed: Callable[[FrozenTrial], None] | None = None,
    now: float | None = None,
) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials without a heartbeat for ``grace`` seconds; returns them (after ``on_failed``)."""
    now = time.time() if now is None else now
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - last_beat(t) <= grace:
            continue
        reason = f"no heartbeat for {now - last_beat(t):.0f} s"
        try:  # a finished trial takes no attributes: the reason goes first
            storage.set_trial_system_attr(t._trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, or failed by another worker
            continue
        failed.append(t)
        print(f"sweep: trial {t.number} failed: its worker sent {reason}", flush=True)
        if on_failed is not None:
            on_failed(t)
    return failed


def wait_for_dead_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    interval: float,
    grace: float,
    own: set[int],
    on_failed: Callable[[FrozenTrial], None] | None = None,
) -> None:
    """Before a worker leaves: trials of other workers that missed two heartbeats are probably dead; wait (at most
    ``grace`` seconds) until they are stale and fail them, so that a killed worker's trial does not stay RUNNING.
    Trials whose workers still beat are left alone (their workers finish them)."""
    start = time.time()
    deadline = start + grace + interval
    said = False
    while True:
        fail_stale_trials(study, storage, grace, on_failed)
        now = time.time()
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id not in own]
        # a trial is known alive only once it beats after we began waiting: a worker killed a moment ago still
        # looks fresh, and leaving then would leave its trial RUNNING
        unproven = [t for t in running if last_beat(t) <= start]
        if not unproven or now > deadline:
            return
        suspects = [t.number for t in unproven if now - last_beat(t) > 2 * interval + 1]
        if suspects and not said:
            said = True
            print(f"sweep: trials {suspects} missed their heartbeats; waiting up to {grace:.0f} s to mark them failed", flush=True)
        time.sleep(min(interval, max(0.1, deadline - now)))
