"""The toy world's stage-0 embedder: `python train.py --stage 0`, the command a user runs, run in this process.

The world's build (world.py) makes its embedder this way, and so does the paraphrase demo (groups.py): each toy
run of stage 0 goes through the training loop and recipe of train.py (training/loop.py, defaults.py), with nothing
of its own.
"""

import json
import shutil
import time
from pathlib import Path

from ..errors import USER_ERRORS, ToyWorldError
from ..training.config import Config
from ..training.loop import train_from_flags

QUICK_STAGE0 = ["--max-steps", "2", "--batch-size", "4"]  # a quick world's embedder (smoke tests)


def run_train_stage0(flags: list[str], log=print) -> Config:
    """`python train.py --stage 0 FLAGS`, in this process and on one process; returns the run's Config."""
    from . import defaults  # which imports the world, which imports this file

    log("running: train.py --stage 0 " + " ".join(flags))
    try:
        return train_from_flags(["--stage", "0", *flags], toy=defaults, log=log)
    except USER_ERRORS as err:
        raise ToyWorldError(f"stage 0 failed: {err} (train.py --stage 0 {' '.join(flags)})") from err


def build_toy_embedder(toy_dir, llm_dir, quick: bool, log=print) -> dict:
    """The toy world's stage-0 embedder: `python train.py --stage 0 --toy-dir TOY_DIR --output TOY_DIR/stage0`
    (the command a user runs, with its toy defaults; tiny when `quick`), whose merged LLM is TOY_DIR/stage0/llm.
    Returns the manifest entry: the run's settings, validation numbers and time."""
    start, output = time.time(), Path(toy_dir) / "stage0"
    shutil.rmtree(output, ignore_errors=True)  # an interrupted earlier build: start again
    config = run_train_stage0(["--toy-dir", str(toy_dir), "--llm", str(llm_dir), "--output", str(output),
                               *(QUICK_STAGE0 if quick else [])], log)
    with open(output / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    return {"steps": last["step"], "batch_size": config.optimizer.batch_size, "lr": config.optimizer.lr,
            "final_loss": last["loss"],
            "validation": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
            "seconds": round(time.time() - start, 1)}
