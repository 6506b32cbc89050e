"""The toy world's stage-0 embedder: `python train.py --stage 0` in a child process, the command a user runs.

The world's build (world.py) makes its embedder this way, and so does the paraphrase demo (groups.py): each toy
run of stage 0 goes through train.py's own loop and recipe (defaults.py), with nothing of its own.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ToyWorldError

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"  # the stage-0 trainer every toy run goes through
QUICK_STAGE0 = ["--max-steps", "2", "--batch-size", "4"]  # a quick world's embedder (smoke tests)


def run_train_stage0(flags: list[str], log=print) -> None:
    """`python train.py --stage 0 FLAGS` in a child process (its output shown), raising if it fails."""
    if not TRAIN_PY.is_file():
        raise ToyWorldError(f"{TRAIN_PY} not found: the toy world runs stage 0 through the repository's train.py")
    command = [sys.executable, str(TRAIN_PY), "--stage", "0", *flags]
    log("running: " + " ".join(command[1:]))
    if subprocess.run(command).returncode != 0:
        raise ToyWorldError(f"stage 0 failed (its error is above): {' '.join(command[1:])}")


def build_toy_embedder(toy_dir, llm_dir, quick: bool, log=print) -> dict:
    """The toy world's stage-0 embedder: `python train.py --stage 0 --toy-dir TOY_DIR --output TOY_DIR/stage0`
    (the command a user runs, with its toy defaults; tiny when `quick`), whose merged LLM is TOY_DIR/stage0/llm.
    Returns the manifest entry: the run's settings, validation numbers and time."""
    start, output = time.time(), Path(toy_dir) / "stage0"
    shutil.rmtree(output, ignore_errors=True)  # an interrupted earlier build: start again
    run_train_stage0(["--toy-dir", str(toy_dir), "--llm", str(llm_dir), "--output", str(output),
                      *(QUICK_STAGE0 if quick else [])], log)
    with open(output / "meta.json") as f:
        args = json.load(f)["args"]
    with open(output / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    return {"steps": last["step"], "batch_size": args["batch_size"], "lr": args["lr"], "final_loss": last["loss"],
            "validation": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
            "seconds": round(time.time() - start, 1)}
