"""The run's typed Config (training/config.py): resolved once in its stated order, saved by named section, and
runs saved before it (a flat flag dictionary, tests/legacy_meta_stage1.json: today's meta.json of a 2-step stage-1
run on the tiny world) still load through load_model and --resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

import train
from miniproclip import checkpoint as ckpt
from miniproclip import load_model
from miniproclip.embedder import EmbedSettings
from miniproclip.head import HeadConfig
from miniproclip.lora import LoRASettings
from miniproclip.training.config import Config, resolve_config
from miniproclip.training.loop import train_from_flags
from miniproclip.training.flags import parse_args

SECTIONS = {"run", "models", "data", "optimizer", "loss", "embedding", "lora", "head", "precision"}
LEGACY = Path(__file__).parent / "legacy_meta_stage1.json"


def silent(*args, **kwargs):
    pass


def common(world, out, *extra):
    """The flags of the legacy fixture's run."""
    return ["--train-data", world["data"], "--clip", world["clip"], "--llm", world["llm"], "--output", str(out),
            "--workers", "0", "--batch-size", "8", "--warmup", "2", "--precision", "amp_bf16", *extra]


def metrics(run_dir) -> dict:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def legacy_meta(world, run_dir) -> dict:
    """The fixture's flat meta, with its world and run folders."""
    text = LEGACY.read_text().replace("WORLD", str(world["dir"])).replace("RUN", str(run_dir))
    return json.loads(text)


def rewrite_meta(run_dir: Path, step: int, meta: dict) -> None:
    """Checkpoint `step` of `run_dir` and its meta.json with `meta`, as the code before the Config wrote them."""
    stem = run_dir / f"step_{step:06d}"
    weights = load_file(f"{stem}.safetensors")
    save_file(weights, f"{stem}.safetensors", metadata={"meta": json.dumps(meta)})
    for path in (f"{stem}.json", run_dir / "meta.json"):
        Path(path).write_text(json.dumps(meta))


def test_legacy_reader_gives_every_section():
    """checkpoint.config_sections on the fixture: each flag in its section, the embedding and LoRA sections built
    from their flags, the head beside them; stage 0's unfilled warmup becomes its 10% ratio."""
    meta = json.loads(LEGACY.read_text())
    sections = ckpt.config_sections(meta)
    assert set(sections) == SECTIONS and "given_flags" not in str(sections)
    config = Config.from_sections(sections)
    assert (config.run.stage, config.run.save_every, config.models.llm, config.data.text_cache) == (
        1, 1, "WORLD/llm", "WORLD/data/text_cache.safetensors")
    assert (config.optimizer.batch_size, config.optimizer.warmup, config.optimizer.lr) == (8, 2, 1e-3)
    assert (config.loss.reg_scope, config.precision.llm_dtype, config.precision.batch_tokens) == (
        "device", "bf16", 1024)
    assert config.embedding == EmbedSettings(max_length=512)
    assert config.lora == LoRASettings()  # "q,k,v,o,gate,up,down" -> q_proj, ... down_proj
    assert config.head == HeadConfig(32, 16, num_blocks=1, mlp_ratio=8)
    stage0 = {**meta, "args": {**meta["args"], "stage": 0, "warmup": None}}
    optimizer = Config.from_sections(ckpt.config_sections(stage0)).optimizer
    assert (optimizer.warmup_steps(120), optimizer.warmup_steps(5)) == (12, 1)


def test_meta_holds_sections_and_a_flat_run_loads_and_resumes(world, tmp_path):
    """Two identical 2-step runs; one's checkpoint and meta.json are rewritten in the old flat format. Both load to
    the same encoders, and both resume to the same losses, saving named sections from then on."""
    for name in ("new", "old"):
        train.main(["--stage", "1", *common(world, tmp_path / name, "--max-steps", "2", "--save-every", "1")])
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    assert set(meta["config"]) == SECTIONS and "args" not in meta and "head" not in meta
    assert meta["config"]["optimizer"]["batch_size"] == 8 and meta["config"]["models"]["clip"] == world["clip"]
    assert ckpt.load_meta(str(tmp_path / "new"))["config"] == meta["config"]  # the checkpoint holds the same
    rewrite_meta(tmp_path / "old", 2, legacy_meta(world, tmp_path / "old"))
    assert "config" not in ckpt.load_meta(str(tmp_path / "old"))
    old, new = (load_model(tmp_path / name, device="cpu", dtype=torch.float32) for name in ("old", "new"))
    assert old.model.text_head.config == new.model.text_head.config == HeadConfig(32, 16, mlp_ratio=8)
    assert (old.text.embedding, old.text.cache, old.clip_dir) == (new.text.embedding, new.text.cache, new.clip_dir)
    captions = ["a red square on grass", "two blue circles"]
    assert torch.equal(old.encode_text(captions), new.encode_text(captions))
    for name in ("new", "old"):
        train.main(["--stage", "1", "--output", str(tmp_path / name), "--resume", "latest", "--max-steps", "4",
                    "--workers", "0"])
    resumed, straight = metrics(tmp_path / "old"), metrics(tmp_path / "new")
    assert [resumed[s]["loss"] for s in (3, 4)] == pytest.approx([straight[s]["loss"] for s in (3, 4)], rel=1e-6)
    meta = ckpt.load_meta(str(tmp_path / "old"))
    assert set(meta["config"]) == SECTIONS and meta["config"]["optimizer"]["warmup"] == 2


class FakeToy:
    """toy/defaults.py's interface without building a world: the tiny world's paths, and a recipe of marked values."""

    def __init__(self, world):
        self.world = world

    def paths(self, stage, toy_dir, llm, text_cache, val_data, clip, log):
        return {"train_data": self.world["data"], "clip": clip or self.world["clip"], "llm": llm or self.world["llm"],
                "text_cache": text_cache or str(self.world["dir"] / "toy_cache.safetensors"), "val_data": val_data}

    def recipe(self, stage, fresh_head):
        return {"lr": 5e-3, "lr_vision": 7e-4, "wd": 0.25}


def test_resolution_order_flags_resumed_run_toy_world_stage_defaults(world, tmp_path):
    """Flags > resumed run > toy world > stage defaults > argparse, each rule leaving the earlier ones' values."""
    toy = FakeToy(world)

    def resolve(*flags) -> Config:
        return resolve_config(*parse_args(["--stage", "1", "--workers", "0", *flags]), world=1, toy=toy, log=silent)[0]

    fresh = resolve("--output", str(tmp_path / "a"))
    # the toy's recipe over the stage default (a fresh head's 1e-3) and argparse's (wd 0.05); the stage's 20 epochs
    assert (fresh.optimizer.lr, fresh.optimizer.lr_vision, fresh.optimizer.wd, fresh.optimizer.epochs) == (
        5e-3, 7e-4, 0.25, 20)
    assert fresh.head == HeadConfig(32, 16)  # shaped by the flags: the LLM's width 32 to the CLIP's joint width 16
    assert Config.from_sections(json.loads(json.dumps(fresh.sections()))) == fresh  # saved and read back whole
    typed = resolve("--output", str(tmp_path / "a"), "--lr", "2e-3", "--epochs", "3")
    assert (typed.optimizer.lr, typed.optimizer.epochs, typed.optimizer.wd) == (2e-3, 3, 0.25)
    # a run on the toy world, then resumed: its saved values beat the toy's and the stage's, typed flags beat them
    train_from_flags(["--stage", "1", "--output", str(tmp_path / "run"), "--workers", "0", "--batch-size", "8",
                      "--max-steps", "1", "--lr", "4e-3", "--head-mlp-ratio", "2"], toy=toy, log=silent)
    resumed = resolve("--output", str(tmp_path / "run"), "--resume", "latest", "--epochs", "5")
    assert (resumed.optimizer.lr, resumed.optimizer.wd, resumed.optimizer.epochs) == (4e-3, 0.25, 5)
    assert (resumed.optimizer.batch_size, resumed.data.train_data, resumed.head) == (
        8, world["data"], HeadConfig(32, 16, mlp_ratio=2))
    assert resolve("--output", str(tmp_path / "run"), "--resume", "latest").data.workers == 0  # the launch's own


def test_stage0_keeps_a_typed_workers_and_counts_its_warmup(world, tmp_path):
    """Stage 0 runs its loader in-process unless --workers is typed; its warmup is 10% of the steps unless typed."""
    def resolve(*flags) -> Config:
        argv = ["--stage", "0", "--llm", world["llm"], "--train-data", "groups.jsonl", "--output", str(tmp_path),
                *flags]
        return resolve_config(*parse_args(argv), world=1, log=silent)[0]

    assert resolve().data.workers == 0 and resolve("--workers", "3").data.workers == 3
    assert resolve().optimizer.warmup_steps(200) == 20 and resolve("--warmup", "7").optimizer.warmup_steps(200) == 7
    assert resolve().head is None and resolve("--lora-targets", "q,v").lora.targets == ("q_proj", "v_proj")
