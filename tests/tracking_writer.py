"""Processes that track a small model until they are killed (for tests/test_tracking.py).

``python tracking_writer.py DIR MODE [MODE ...]`` imports torch and lorascope once, then forks
one child per MODE; child ``i`` tracks its own model into ``DIR/run{i}.h5`` (seed ``i``):

- ``loop``: snapshot every step (factors every step) until SIGKILL;
- ``create``: SIGKILL itself right after the tracking file was created (no snapshot yet);
- ``append:N``: SIGKILL itself inside the N-th dataset append (mid-snapshot).

Lines on stdout: ``child I PID`` per fork, ``ready I`` once child ``I``'s first snapshot is on
disk, and ``exit I SIGNAL`` (0: no signal) as each child ends; the parent exits when all have.
No transformers: three lorascope ``LoRALinear`` layers of different shapes and ranks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import torch
from torch import nn

from lorascope.tracking import Tracker, store
from lorascope.train import inject


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(48, 40)
        self.v = nn.Linear(48, 24)
        self.o = nn.Linear(40, 48)


def _say(line: str) -> None:
    """One line in one write(2): a kill cannot leave half of it on the shared pipe."""
    os.write(1, f"{line}\n".encode())


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def child(path: str, mode: str, i: int) -> None:
    torch.manual_seed(i)
    net = Net()
    inject(net, ["q", "v", "o"], r=4, alpha=8, rank_pattern={"o": 6})
    g = torch.Generator().manual_seed(i)
    layers = [m for m in net.modules() if hasattr(m, "lora_B")]
    if mode == "create":
        init = store.RunWriter.__init__

        def created(self, *a, **kw):
            init(self, *a, **kw)
            _kill()

        store.RunWriter.__init__ = created
    elif mode.startswith("append:"):
        left = [int(mode.split(":")[1])]
        append = store.RunWriter._append

        def counted(ds, value):
            left[0] -= 1
            if left[0] <= 0:
                _kill()
            append(ds, value)

        store.RunWriter._append = staticmethod(counted)

    tracker = Tracker(path, every=1, amplify_every=2, config={"seed": i})
    step = 0
    while True:
        step += 1
        with torch.no_grad():  # a stand-in for an optimizer step: every factor moves
            for m in layers:
                m.lora_A.add_(0.05 * torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.add_(0.05 * torch.randn(m.lora_B.shape, generator=g))
        tracker.step(net, step, loss=1.0 / step)
        if step == 1:
            _say(f"ready {i}")
        time.sleep(0.002)


def main() -> None:
    out, modes = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    pids = {}
    for i, mode in enumerate(modes):
        pid = os.fork()
        if pid == 0:
            try:
                child(os.path.join(out, f"run{i}.h5"), mode, i)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)
        pids[pid] = i
        _say(f"child {i} {pid}")
    while pids:
        pid, status = os.wait()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        _say(f"exit {pids.pop(pid)} {sig}")


if __name__ == "__main__":
    main()
