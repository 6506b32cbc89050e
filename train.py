"""Train ProCLIP (arXiv 2510.18795) in its two stages, and optionally its LLM embedder first (stage 0).

On one CPU, on the built-in toy world (built into ./toyworld on first use; README gives the flow's time):
    python train.py --stage 0              # optional: LoRA on SmolLM2 -> RUN/llm (the world builds one itself)
    python train.py --stage 1
    python train.py --stage 2 --init runs/<stage-1 run>
On one GPU, on your data (JSONL/CSV rows or webdataset tar shards; the LLM embeddings are cached on first use):
    python train.py --stage 1 --train-data pairs.jsonl --clip CLIP_DIR --llm LLM_DIR --batch-size 1024
    python train.py --stage 2 --init runs/<stage-1 run> --train-data 'shards/{00000..00999}.tar' --batch-size 512 \\
        --grad-checkpointing
On N GPUs (DDP; --gather-with-grad gives every rank the gradient of the global-batch losses):
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/<stage-1 run> --train-data ... --gather-with-grad
Interrupted runs continue with `--resume latest --output RUN`. This file is flag parsing plus the calls: the flags
(training/flags.py) -> the run's Config, resolved once (training/config.py) -> `setup` and `train`, the loop
(training/loop.py). stages.py holds the Stage protocol and stages 1-2, stage0.py stage 0, build.py the setup of
stages 1-2; the model math is in the library, miniproclip/ (model.py, losses.py).
"""

import sys

from miniproclip.distributed import exit_torchrun_rank, init_distributed
from miniproclip.errors import TrainingError, UserError, exit_with
from miniproclip.toy import defaults as toy_defaults
from miniproclip.training.config import resolve_config
from miniproclip.training.loop import setup, train
from miniproclip.training.flags import parse_args


def main(argv=None):
    args, given = parse_args(argv)
    try:
        rank, world, args.device = init_distributed(args.device)  # under torchrun: this rank's GPU
        log = print if rank == 0 else (lambda *a, **k: None)
        config, checkpoints = resolve_config(args, given, world, toy=toy_defaults, log=log)
        run = setup(config, checkpoints, rank, world, log)
    except UserError as err:
        exit_with(err)
    except KeyboardInterrupt:  # before the first step nothing needs saving (the text cache is written atomically)
        sys.exit("interrupted before training started; nothing was lost, run the same command again")
    try:
        train(config, run, log)
    except TrainingError as err:  # a fatal condition mid-run; the last checkpoint is intact
        exit_with(err)


if __name__ == "__main__":
    main()
    exit_torchrun_rank()  # under torchrun: without the interpreter teardown, where gloo can abort a finished rank
