"""Run llmctl with one checkpoint's write paused half-way, so that a test can kill or interrupt it there:

    python tests/pause_save.py STEP SECONDS ARGS...    (as `python -m llmctl ARGS...`)

Once the weights of step STEP are in the checkpoint's temporary directory (before its meta.json and the rename),
the process leaves a `.saving` marker in the run directory and sleeps SECONDS. Test-side only: llmctl has no hook
for it; this wraps the `save_file` that `llmctl.checkpoint` writes the weights with.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from llmctl import checkpoint


def pause_at(step: int, seconds: float) -> None:
    write_weights, paused = checkpoint.save_file, []

    def write_then_pause(tensors, filename, *args, **kwargs):
        write_weights(tensors, filename, *args, **kwargs)
        tmp = Path(filename).parent
        if not paused and tmp.name.startswith(f".tmp-{checkpoint.step_name(step)}-"):
            paused.append(step)
            (tmp.parent / ".saving").write_text(f"{os.getpid()} {step}")
            time.sleep(seconds)

    checkpoint.save_file = write_then_pause


if __name__ == "__main__":
    pause_at(int(sys.argv[1]), float(sys.argv[2]))
    sys.argv = ["llmctl", *sys.argv[3:]]
    runpy.run_module("llmctl", run_name="__main__", alter_sys=True)
