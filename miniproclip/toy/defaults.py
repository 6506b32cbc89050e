"""What `train.py` takes from the toy world when no --train-data is given: its data, models and recipes.

training/config.py's `resolve_config` (given this module by train.py) applies these after a resumed run's own
settings and before each stage's defaults; `paths` builds the world (or the part of it the stage needs) first. Only flags that were not typed, and that a
resumed run did not bring, take the recipes' values.
"""

import os
from pathlib import Path

from ..embed import text_cache_path
from .embedder import STAGE0_RECIPE  # stage 0's, chosen on the world's validation groups
from .world import build_toyworld, stage0_sources

# Stages 1-2: the toy's small ViT barely moves at a pretrained CLIP's 1e-5. Stage 1 distils long captions too, against
# the 77-token teacher's view of them (the description diluted by filler, without the corner mark), as the official
# code does: chosen on validation over leaving them out (RESULTS.md, "Validation, second round")
CLIP_STAGE_RECIPE = {"lr_vision": 1e-4}
# Stage 2 after stage 1: the inherited head at 3e-6, chosen on world v4's validation (RESULTS.md): a faster head
# fits the stage-2 pictures at the cost of what stage 1 gave it
TRAINED_HEAD_LR = 3e-6


def brought_llm(toy_dir: Path, llm: str | None) -> bool:
    """Is --llm a folder outside the toy world? The world is then built without its own LLM, which it leaves as is."""
    return llm is not None and not Path(llm).resolve().is_relative_to(Path(toy_dir).resolve())


def toy_models(toy_dir, llm: str | None, text_cache: str | None, log=print) -> tuple[str, str]:
    """(LLM folder, text cache) of stages 1-2 on the toy world, built first. The LLM defaults to the world's stage-0
    embedder (built with the world); another LLM (the raw TOY_DIR/smollm2, or your own folder) is used as given.
    Each LLM gets its own cache, TOY_DIR/text_cache_<LLM>.safetensors (stage0_llm, smollm2, ...)."""
    toy_dir = Path(toy_dir)
    own = brought_llm(toy_dir, llm)
    manifest = build_toyworld(toy_dir, stage0=llm is None, with_llm=not own, log=log)
    llm = llm or manifest["embedder_dir"]
    tag = Path(llm).name if own else Path(llm).resolve().relative_to(toy_dir.resolve()).as_posix()
    return llm, text_cache or text_cache_path(str(toy_dir), tag)


def paths(stage: int, toy_dir: str, llm: str | None, text_cache: str | None, val_data: str | None,
          clip: str | None, log=print) -> dict:
    """The toy world's data and model folders for `stage`, after building what it needs: stage 0 the world up to
    its teacher (not its own embedder) and its LLM unless `llm` brings one; stages 1-2 the whole world with its
    embedder unless `llm` is given."""
    if stage == 0:
        manifest = build_toyworld(toy_dir, stage0=False, with_llm=not brought_llm(toy_dir, llm), log=log)
        train_data, toy_val = stage0_sources(toy_dir)
        return {"train_data": train_data, "val_data": val_data or toy_val, "llm": llm or manifest["llm_dir"]}
    llm, text_cache = toy_models(toy_dir, llm, text_cache, log)
    return {"llm": llm, "text_cache": text_cache,
            # stages 1 and 2 train on the same captions, as in the paper (none names a held-out class)
            "train_data": os.path.join(toy_dir, "train_stage2.jsonl"),
            "val_data": val_data or os.path.join(toy_dir, "val.jsonl"), "clip": clip or os.path.join(toy_dir, "clip")}


def recipe(stage: int, fresh_head: bool) -> dict:
    """The toy world's values for flags the user did not type (a resumed run keeps its own); `fresh_head`: stage 2
    with --init scratch, whose head starts untrained."""
    if stage == 0:
        return STAGE0_RECIPE
    return {**CLIP_STAGE_RECIPE, **({"lr": TRAINED_HEAD_LR} if stage == 2 and not fresh_head else {})}
