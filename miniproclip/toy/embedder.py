"""The toy world's stage-0 embedder: `python train.py --stage 0 FLAGS`, a command a user can run, run in this process.

The world's build (world.py) makes its embedder this way, and so does the paraphrase demo (groups.py): each toy
run of stage 0 goes through train.py's training loop (training/loop.py), with the toy recipe below (which
defaults.py gives `train.py --stage 0` on the toy world) and nothing of its own.
"""

import json
import shutil
import time
from pathlib import Path

from ..errors import ToyWorldError, UserError
from ..training.config import Config
from ..training.loop import train_from_flags

TOY_TEMPERATURE = 0.05  # stage 0 on the toy world's groups
# Stage 0's recipe, chosen on the world's validation groups (RESULTS.md, "Stage 0"): a faster rate than LLM2CLIP's,
# which starts from an embedder already trained, no adapter dropout, and `max_steps` batches of 32 pairs
STAGE0_RECIPE = {"lr": 1e-3, "lora_dropout": 0.0, "batch_size": 32, "max_steps": 120, "temperature": TOY_TEMPERATURE}
QUICK_STAGE0 = ["--max-steps", "2", "--batch-size", "4"]  # a quick world's embedder (smoke tests)


def run_train_stage0(flags: list[str], log=print) -> Config:
    """`python train.py --stage 0 FLAGS`, in this process and on one process; returns the run's Config."""
    log("running: train.py --stage 0 " + " ".join(flags))
    try:
        return train_from_flags(["--stage", "0", *flags], log=log)
    except UserError as err:
        raise ToyWorldError(f"stage 0 failed: {err} (train.py --stage 0 {' '.join(flags)})") from err


def build_toy_embedder(toy_dir, llm_dir, quick: bool, sources: tuple[str, str], log=print, output=None,
                       seed: int = 0) -> dict:
    """The toy world's stage-0 embedder: `python train.py --stage 0 --train-data TRAIN --val-data VAL --output
    OUTPUT --seed SEED` with STAGE0_RECIPE's flags (what `train.py --stage 0` takes on the toy world; tiny when
    `quick`), whose merged LLM is OUTPUT/llm. OUTPUT defaults to the world's own, TOY_DIR/stage0; the reproduction
    trains one per seed. `sources`: the world's stage-0 (training, validation) groups.
    Returns the manifest entry: the run's settings, validation numbers and time."""
    start, output = time.time(), Path(output or Path(toy_dir) / "stage0")
    shutil.rmtree(output, ignore_errors=True)  # an interrupted earlier build: start again
    recipe = [item for key, value in STAGE0_RECIPE.items() for item in ("--" + key.replace("_", "-"), str(value))]
    config = run_train_stage0(["--train-data", sources[0], "--val-data", sources[1], "--llm", str(llm_dir),
                               "--output", str(output), "--seed", str(seed), *recipe,
                               *(QUICK_STAGE0 if quick else [])], log)
    with open(output / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    return {"steps": last["step"], "batch_size": config.optimizer.batch_size, "lr": config.optimizer.lr,
            "final_loss": last["loss"],
            "validation": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
            "seconds": round(time.time() - start, 1)}
