"""SIGTERM, what a scheduler sends before it kills a job, as a clean stop (docs/reliability.md).

    with signals.stop_on_sigterm():        # train.train: around the GRPO stages
        ...
        if signals.requested():            # train.train_stage: before each GRPO step
            ...                            # a checkpoint of the steps done, then exit with STOPPED

The handler only notes the signal: the step in progress finishes, then the run writes its checkpoint and exits
with status STOPPED (143, as a process ended by SIGTERM); `--resume` continues exactly. Under torchrun the launcher
passes SIGTERM on to every rank, and `requested` is true on every rank when any rank has it (one all-reduce per
step), so all ranks stop after the same step and write one checkpoint together; torchrun waits
`--shutdown-timeout` seconds (default 30) for that before it kills them. A second SIGTERM stops at once. Before
GRPO (loading, the SFT) and while the final model is exported, SIGTERM ends the process as usual: --resume continues
from the last state saved (the SFT saves its own every --save-every steps).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from scaling import distributed

STOPPED = 143  # 128 + SIGTERM: the exit status of a run stopped by SIGTERM (after writing its checkpoint)
_got = [False]


def _note(signum, frame) -> None:
    if _got[0]:  # the second one: stop now, as without the handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _got[0] = True
    print("SIGTERM: stopping after this step, with a checkpoint (a second SIGTERM stops at once)", file=sys.stderr,
          flush=True)


@contextlib.contextmanager
def stop_on_sigterm():
    """Within the block, SIGTERM is noted for `requested` instead of ending the process (main thread only: Python
    delivers signals there; elsewhere the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _got[0] = False
    previous = signal.signal(signal.SIGTERM, _note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _got[0] = False


def requested() -> bool:
    """Whether a SIGTERM arrived, on any rank (under torchrun every rank must call it: one all-reduce)."""
    return distributed.all_sum(float(_got[0]))[0] > 0
