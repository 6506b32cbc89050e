"""Tests for miniproclip/checkpoint.py: a full round trip (weights, meta, optimizer/scheduler/scaler state, RNG
replay), `latest` and its fallback, keep=N pruning, crash safety (an exception at every rename, a full disk,
SIGKILL mid-save), pickles refused without being run, and the exact one-line user errors."""

import collections
import errno
import json
import multiprocessing
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import miniproclip.checkpoint as checkpoint
from miniproclip.checkpoint import (CheckpointError, append_metrics, check_writable, latest_checkpoint,
                                    load_train_state, load_weights, resolve_checkpoint, rng_state, save_checkpoint,
                                    set_rng_state, write_run_meta)

SUFFIXES = (".safetensors", ".state.pt", ".json")


def weights_at(step):
    return {"head.fc.weight": torch.full((4, 3), float(step)), "head.fc.bias": torch.arange(3.0) + step}


def meta_at(step):
    return {"stage": 1, "step": step, "args": {"lr": 1e-3, "output": "runs/x"}, "metrics": {"loss": 0.25}}


def save_step(run_dir, step, keep=None):
    state = {"step": step, "cursor": {"epoch": 0, "batch": step}}
    return save_checkpoint(str(run_dir), step, weights_at(step), state, meta_at(step), keep=keep)


def stem(run_dir, step):
    return str(run_dir / f"step_{step:06d}")


def assert_checkpoint_is(run_dir, step):
    """`run_dir` resolves to step `step`, whose weights, meta and state all load and belong to that step."""
    path = resolve_checkpoint(str(run_dir))
    assert path == stem(run_dir, step) + ".safetensors"
    state_dict, meta = load_weights(path)
    assert meta == meta_at(step)
    for key, tensor in weights_at(step).items():
        assert torch.equal(state_dict[key], tensor)
    assert load_train_state(path)["step"] == step


def temp_files(run_dir):
    return sorted(name for name in os.listdir(run_dir) if name.endswith(".tmp"))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_weights_meta_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    inputs = torch.randn(5, 3)
    for _ in range(2):
        model(inputs).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    random.seed(1)
    train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "rng": rng_state(), "cursor": {"epoch": 2, "batch": 17},
                   "step": 120, "bad_steps": (0, None, True),
                   "misc": {"dtype": torch.bfloat16, "device": torch.device("cpu"), "shape": torch.Size([2, 3]),
                            "ordered": collections.OrderedDict(a=1.5), "param": torch.nn.Parameter(torch.ones(2))}}
    expected_torch_draw, expected_python_draw = torch.rand(5), random.random()  # the draws right after saving RNG
    meta = {"stage": 2, "step": 120, "args": {"lr": 0.1, "resume": None}, "metrics": [{"step": 120, "loss": 1.5}]}
    path = save_checkpoint(str(tmp_path), 120, model.state_dict(), train_state, meta)

    assert path == stem(tmp_path, 120) + ".safetensors"
    assert (tmp_path / "latest").read_text() == "step_000120\n"
    assert json.loads((tmp_path / "step_000120.json").read_text()) == meta
    state_dict, loaded_meta = load_weights(str(tmp_path))
    assert loaded_meta == meta and state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())

    assert torch.load(stem(tmp_path, 120) + ".state.pt", weights_only=True)["step"] == 120
    state = load_train_state(path)
    assert state["scheduler"] == scheduler.state_dict() and state["scaler"] == scaler.state_dict()
    assert state["scaler"]["scale"] == 1024.0 and state["cursor"] == {"epoch": 2, "batch": 17}
    assert state["misc"]["dtype"] == torch.bfloat16 and state["misc"]["shape"] == (2, 3)

    # a fresh model + optimizer restored from the checkpoint takes exactly the same next step as the original
    restored = torch.nn.Linear(3, 2)
    restored.load_state_dict(state_dict)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.1)
    restored_optimizer.load_state_dict(state["optimizer"])
    for m, opt in ((model, optimizer), (restored, restored_optimizer)):
        m(inputs).square().sum().backward()
        opt.step()
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)

    # restoring the RNG states replays the same draws
    torch.rand(7)  # move both RNGs on, then back
    random.random()
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(5), expected_torch_draw)
    assert random.random() == expected_python_draw


def test_shared_storage_and_non_contiguous_weights_save(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    weights = {"tied.a": base, "tied.b": base, "slice": base[1:], "transposed": base.t()}
    save_checkpoint(str(tmp_path), 1, weights, {}, {})
    loaded, _ = load_weights(str(tmp_path))
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert loaded["transposed"].is_contiguous()


def test_wrapper_prefixes_are_stripped_anywhere(tmp_path):
    weights = {"module._orig_mod.head.fc.weight": torch.ones(2), "vision._orig_mod.layers.0.weight": torch.zeros(1),
               "submodule.weight": torch.full((1,), 3.0)}
    save_checkpoint(str(tmp_path), 1, weights, {}, {})
    loaded, _ = load_weights(str(tmp_path / "step_000001"))
    assert sorted(loaded) == ["head.fc.weight", "submodule.weight", "vision.layers.0.weight"]
    assert loaded["submodule.weight"].item() == 3.0


def test_train_state_that_weights_only_would_refuse_is_rejected_before_writing(tmp_path):
    counters = collections.defaultdict(int)
    with pytest.raises(pickle.UnpicklingError):  # the allowlist agrees with torch: this really is unloadable
        torch.save(counters, tmp_path / "probe.pt")
        torch.load(tmp_path / "probe.pt", weights_only=True)
    with pytest.raises(TypeError) as error:
        save_checkpoint(str(tmp_path / "run"), 1, weights_at(1), {"cursor": {"counters": counters}}, {})
    assert str(error.value) == ("train_state['cursor']['counters'] is a defaultdict, which "
                                "torch.load(weights_only=True) refuses; store only tensors, numbers, strings, None, "
                                "lists, tuples and dicts")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- latest, fallback, pruning


def test_latest_follows_saves_and_keep_prunes(tmp_path):
    for step in range(1, 6):
        save_step(tmp_path, step, keep=2)
        assert (tmp_path / "latest").read_text() == f"step_{step:06d}\n"
    assert sorted(os.listdir(tmp_path)) == ["latest"] + sorted(f"step_{s:06d}{x}" for s in (4, 5) for x in SUFFIXES)
    assert_checkpoint_is(tmp_path, 5)
    # a save at a lower step (training resumed from an earlier checkpoint) is the latest and survives keep=1,
    # together with the highest step; step 4 goes
    save_step(tmp_path, 3, keep=1)
    steps = sorted({name[:11] for name in os.listdir(tmp_path) if name.startswith("step_")})
    assert steps == ["step_000003", "step_000005"]
    assert_checkpoint_is(tmp_path, 3)


def test_missing_or_garbled_latest_falls_back_to_highest_complete_step(tmp_path, caplog):
    for step in (1, 2, 3):
        save_step(tmp_path, step)
    os.remove(stem(tmp_path, 3) + ".state.pt")  # step 3 incomplete
    (tmp_path / "latest").write_bytes(b"\xff\x00garbage")
    with caplog.at_level("WARNING", logger="miniproclip.checkpoint"):
        assert latest_checkpoint(str(tmp_path)) == stem(tmp_path, 2) + ".safetensors"
    assert caplog.messages == [f"{tmp_path}: 'latest' is missing or does not name a complete checkpoint; "
                               f"using step_000002, the highest complete one"]
    os.remove(tmp_path / "latest")
    assert_checkpoint_is(tmp_path, 2)
    (tmp_path / "latest").write_text("step_000001\n")
    assert_checkpoint_is(tmp_path, 1)
    assert resolve_checkpoint(stem(tmp_path, 2)) == stem(tmp_path, 2) + ".safetensors"
    assert resolve_checkpoint(stem(tmp_path, 2) + ".safetensors") == stem(tmp_path, 2) + ".safetensors"
    assert latest_checkpoint(str(tmp_path / "nothing_here")) is None


# ----------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])  # the renames of state.pt, json, safetensors, latest
def test_crash_at_any_rename_keeps_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    save_step(tmp_path, 1)
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise RuntimeError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crashing_replace)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_step(tmp_path, 2)
    monkeypatch.undo()
    assert len(calls) == failing_call
    assert temp_files(tmp_path) == [] and not any(name.startswith("step_000002") for name in os.listdir(tmp_path))
    assert_checkpoint_is(tmp_path, 1)


def test_full_disk_while_writing_weights_raises_one_line_and_keeps_previous(tmp_path, monkeypatch):
    save_step(tmp_path, 1)

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError) as error:
        save_step(tmp_path, 2)
    assert str(error.value) == (f"cannot save step_000002 in {tmp_path}: No space left on device; the previous "
                                f"checkpoint is kept; free space or choose another output folder")
    assert isinstance(error.value, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert temp_files(tmp_path) == [] and not any(name.startswith("step_000002") for name in os.listdir(tmp_path))
    assert_checkpoint_is(tmp_path, 1)


SIZE = 4_000_000  # floats per tensor: 16 MB, so a save spends real time writing


def save_big_step(run_dir, step):
    """A checkpoint whose every tensor is filled with its step (and step + 1), so mixed files are detectable."""
    big = torch.full((SIZE,), float(step))
    save_checkpoint(run_dir, step, {"w": big}, {"step": step, "m": big + 1}, {"step": step}, keep=2)


def save_until_killed(run_dir, step):
    """The killed writer: saves consecutive steps back to back, forever."""
    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    while True:
        save_big_step(run_dir, step)
        step += 1


def assert_consistent(path):
    """The weights, JSON meta and training state of a save_until_killed checkpoint load and are of one step."""
    state_dict, meta = load_weights(path)
    step = meta["step"]
    assert json.loads(Path(path.removesuffix(".safetensors") + ".json").read_text()) == {"step": step}
    assert torch.equal(state_dict["w"], torch.full((SIZE,), float(step)))
    state = load_train_state(path)
    assert state["step"] == step and torch.equal(state["m"], torch.full((SIZE,), step + 1.0))
    return step


def save_frozen_in(run_dir, step, phase, frozen_event):
    """A writer that freezes inside one phase of saving `step` (its file half written), to be killed there."""
    torch.set_num_threads(1)
    module, name = {"state": (torch, "save"), "weights": (checkpoint, "save_file"),
                    "latest": (checkpoint, "write_text_atomic")}[phase]
    real_writer = getattr(module, name)

    def freeze(*args, **kwargs):
        if phase != "latest":
            real_writer(*args, **kwargs)
            os.truncate(args[1], os.path.getsize(args[1]) // 2)  # args[1]: the path being written
        frozen_event.set()
        time.sleep(600)

    setattr(module, name, freeze)  # only in this forked child
    save_big_step(run_dir, step)


@pytest.mark.parametrize("phase", ["state", "weights", "latest"])
def test_sigkill_inside_each_phase_of_a_save(tmp_path, phase):
    fork = multiprocessing.get_context("fork")
    save_big_step(str(tmp_path), 1)
    frozen = fork.Event()
    writer = fork.Process(target=save_frozen_in, args=(str(tmp_path), 2, phase, frozen))
    writer.start()
    assert frozen.wait(60), "the writer never reached the phase"
    writer.kill()  # SIGKILL: no cleanup code runs
    writer.join()
    left = {"state": [".state.pt"], "weights": [".json", ".safetensors", ".state.pt"], "latest": []}[phase]
    assert temp_files(tmp_path) == [f"step_000002{suffix}.tmp" for suffix in left]  # the kill hit mid-save
    assert assert_consistent(resolve_checkpoint(str(tmp_path))) == 1  # `latest` still names step 1
    os.remove(tmp_path / "latest")  # the fallback scan takes step 2 only once its three files are complete
    assert assert_consistent(resolve_checkpoint(str(tmp_path))) == (2 if phase == "latest" else 1)


def test_sigkill_at_arbitrary_moments_of_saves_in_a_loop(tmp_path):
    # forked writers (no torch import to wait for) killed at 10 moments spread over several save cycles; each
    # round resumes in the folder the previous kill left, stale temp files and all
    fork = multiprocessing.get_context("fork")
    save_big_step(str(tmp_path), 0)
    last_step = progressed = 0
    for round_index in range(10):
        writer = fork.Process(target=save_until_killed, args=(str(tmp_path), last_step + 1))
        writer.start()
        time.sleep(0.05 + 0.043 * round_index)
        writer.kill()
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        step = assert_consistent(resolve_checkpoint(str(tmp_path)))
        progressed, last_step = progressed + (step > last_step), step
        if (tmp_path / "latest").exists():  # without `latest`, the fallback scan must find a loadable one too
            os.rename(tmp_path / "latest", tmp_path / "latest.bak")
            last_step = max(last_step, assert_consistent(resolve_checkpoint(str(tmp_path))))
            os.rename(tmp_path / "latest.bak", tmp_path / "latest")
    assert progressed >= 3, "the writers were killed before finishing any save: too slow a machine?"
    save_step(tmp_path, 9999)  # a later save clears the temp files a kill left behind
    assert temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- pickles are never run


class Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    save_step(tmp_path / "run", 1)
    state_path = stem(tmp_path / "run", 1) + ".state.pt"
    torch.save({"step": 1, "payload": Exploit(marker)}, state_path)
    with pytest.raises(CheckpointError) as error:
        load_train_state(str(tmp_path / "run"))
    message = str(error.value)
    # torch's own diagnosis sits in the middle: "Trying to load unsupported GLOBAL posix.system ..." in torch 2.13
    assert message.startswith(f"cannot load {state_path}: ") and "system" in message and "\n" not in message
    assert message.endswith("; resume from another step_NNNNNN (a training state may hold only tensors and plain data)")

    evil_weights = tmp_path / "model.pt"
    torch.save({"w": Exploit(marker)}, evil_weights)
    for load in (resolve_checkpoint, load_weights):
        with pytest.raises(CheckpointError) as error:
            load(str(evil_weights))
        assert str(error.value) == (f"{evil_weights} is a pickle, which is never loaded as weights (it can run "
                                    f"code); pass a step_NNNNNN.safetensors file or its run folder")
    assert not marker.exists()
    torch.load(state_path, weights_only=False)  # the control: the payload is live when unpickled unsafely
    assert marker.exists()


# ----------------------------------------------------------------------------- user errors


def test_error_messages(tmp_path):
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(str(missing))
    assert str(error.value) == (f"checkpoint {missing} does not exist; pass a run folder, a step_NNNNNN.safetensors "
                                f"file or its step_NNNNNN stem")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "step_000005.json").write_text("{}")  # an incomplete checkpoint does not count
    with pytest.raises(CheckpointError) as error:
        load_weights(str(empty))
    assert str(error.value) == (f"no checkpoint in {empty}; give a run folder holding step_*.safetensors "
                                "(to resume (resume, --resume), start without it)")

    run = tmp_path / "run"
    weights_path = save_step(run, 1)
    os.remove(stem(run, 1) + ".state.pt")
    with pytest.raises(CheckpointError) as error:
        load_train_state(weights_path)
    assert str(error.value) == (f"{stem(run, 1)}.state.pt does not exist; without it training cannot resume from "
                                f"this checkpoint (its weights alone can still be loaded)")
    Path(weights_path).write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError) as error:
        load_weights(weights_path)
    assert str(error.value).startswith(f"{weights_path} is not a readable safetensors file (")
    torch.save({"step": 2}, stem(run, 2) + ".state.pt")
    Path(stem(run, 2) + ".state.pt").write_bytes(Path(stem(run, 2) + ".state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        load_train_state(stem(run, 2) + ".state.pt")
    assert str(error.value) == (f"cannot load {stem(run, 2)}.state.pt: PytorchStreamReader failed reading zip archive: "
                                f"failed finding central directory; resume from another step_NNNNNN (a training "
                                f"state may hold only tensors and plain data)")

    under_a_file = tmp_path / "file" / "sub"
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError) as error:
        save_step(under_a_file, 1)
    assert str(error.value) == (f"cannot save step_000001 in {under_a_file}: Not a directory; the previous "
                                f"checkpoint is kept; free space or choose another output folder")


def test_check_writable(tmp_path, monkeypatch):
    run = tmp_path / "new" / "run"
    check_writable(str(run), need_bytes=1)
    assert run.is_dir() and os.listdir(run) == []  # created, probe removed

    under_a_file = tmp_path / "file" / "sub"  # root ignores chmod, but not a regular file in the path
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError) as error:
        check_writable(str(under_a_file))
    assert str(error.value) == (f"run folder (output, --output) {under_a_file} is not writable: Not a directory; "
                                f"choose a folder you can write to")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10e9, 8.5e9, 1.5e9))
    check_writable(str(run), need_bytes=1_000_000_000)
    with pytest.raises(CheckpointError) as error:
        check_writable(str(run), need_bytes=4_000_000_000)
    assert str(error.value) == (f"run folder (output, --output) {run} has 1.50 GB free, a checkpoint needs ~4.00 GB; free some space "
                                f"or choose another output folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    with pytest.raises(CheckpointError) as error:
        check_writable(str(read_only))
    assert str(error.value) == (f"run folder (output, --output) {read_only} is not writable: Permission denied; "
                                f"choose a folder you can write to")


def test_metrics_lines_and_run_meta(tmp_path):
    append_metrics(str(tmp_path), {"step": 1, "loss": torch.tensor(0.5)})
    append_metrics(str(tmp_path), {"step": 2, "loss": 0.25, "lr": [1e-3]})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "lr": [1e-3]}]
    write_run_meta(str(tmp_path / "run"), {"stage": 1, "latest_step": 0})
    write_run_meta(str(tmp_path / "run"), {"stage": 1, "latest_step": 120, "clip": Path("/models/clip")})
    assert json.loads((tmp_path / "run" / "meta.json").read_text()) == {"stage": 1, "latest_step": 120,
                                                                       "clip": "/models/clip"}
    assert os.listdir(tmp_path / "run") == ["meta.json"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError) as error:
        write_run_meta(str(tmp_path / "file" / "run"), {"stage": 1})
    assert str(error.value) == (f"cannot write meta.json in {tmp_path / 'file' / 'run'}: Not a directory; "
                                f"free space or choose another output folder")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_round_trip(tmp_path):
    torch.cuda.manual_seed_all(3)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    save_checkpoint(str(tmp_path), 1, weights_at(1), {"rng": state}, {})
    torch.rand(9, device="cuda")
    set_rng_state(load_train_state(str(tmp_path))["rng"])
    assert torch.equal(torch.rand(4, device="cuda"), expected)
