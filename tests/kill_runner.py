"""Run the train stage in this process and SIGKILL it at a chosen point (tests only).

    python -m tests.kill_runner step N PARAMS          # dies as step N (0-based) begins: steps since the last
                                                       # checkpoint are lost
    python -m tests.kill_runner checkpoint-write N PARAMS   # dies inside the N-th torch.save of a checkpoint,
                                                            # after its adapter file is written

SIGKILL cannot be caught: no finally block, no atexit, no cleanup runs, exactly as `kill -9` from outside, but at a
point the test chooses instead of a moment a timer happens to hit.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from qlora_pipeline.pipelines import cli
from qlora_pipeline.stages import train
from qlora_pipeline.stages.lm import checkpoints


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, at: int, params_path: str) -> int:
    if mode == "step":
        real_lr_at = train.lr_at

        def lr_at(step: int, t, total: int):  # called first thing in every step
            if step == at:
                _die()
            return real_lr_at(step, t, total)

        train.lr_at = lr_at
    elif mode == "checkpoint-write":
        real_save, calls = torch.save, [0]

        def save(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                _die()
            return real_save(*args, **kwargs)

        checkpoints.torch.save = save
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.argv = ["qlora", "stage", "train", "--params", params_path]
    cli.main()  # exits: 0 done, 2 one-line error
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
