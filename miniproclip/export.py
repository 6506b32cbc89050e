"""Export a trained run as a Hugging Face CLIP folder plus the text head, to share or to load anywhere.

    python -m miniproclip.export runs/stage2 exported/            # the LLM folder is named by its path
    python -m miniproclip.export runs/stage2 exported/ --copy-llm # the LLM folder is copied inside

OUT holds what transformers' `CLIPModel.from_pretrained(OUT)` loads: `config.json` (the CLIP folder's own),
`model.safetensors` (the trained image tower, projection and temperature with the original text tower, all float32),
`preprocessor_config.json` and the tokenizer files. Next to them: `text_head.safetensors` (the head, under
`TextHead`'s names) and `proclip.json` (head config, LLM folder, embedding settings, where it came from), so that
`miniproclip.load_model(OUT)` gives the same encoders as the run. A run from an open_clip folder (ViT or EVA02)
exports in open_clip's format instead: `open_clip_config.json` + `open_clip_model.safetensors`, which
`open_clip.create_model('local-dir:OUT')` loads. A stage-1 run exports too: its image tower is the original one. OUT
is written under a temporary name beside it and renamed when complete, and an existing non-empty OUT is never
written into.
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from .api import EXPORT_JSON, HEAD_FILE, load_model
from .errors import UserError, exit_with
from .files import atomic_folder
from .openclip import is_siglip, write_tuned_folder
from .precision import DTYPES
from .weights import INDEX_FILE, SINGLE_FILE, ModelFolderError, is_open_clip_folder, load_safetensors_folder, \
    read_open_clip_config, weight_files

CLIP_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json")  # copied as they are when the CLIP folder has them
LLM_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", INDEX_FILE)  # --copy-llm: these and the weight files, no pickles


def _copy_present(source: str, target: str, names) -> None:
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


def _write_clip_folder(trained, folder: str) -> None:
    """config.json, model.safetensors (tuned image side + original text side), preprocessing and tokenizer; for a
    run from an open_clip folder (ViT or EVA02), open_clip_config.json + open_clip_model.safetensors instead."""
    if is_open_clip_folder(trained.clip_dir):
        if is_siglip(read_open_clip_config(trained.clip_dir)["model_cfg"]):
            raise ModelFolderError(f"{trained.clip_dir}: a run on an open_clip SigLIP folder cannot be exported (no "
                                   f"inverse of openclip.siglip_to_ours yet); use the run folder with load_model")
        tuned = {k: v for k, v in trained.model.state_dict().items() if not k.startswith("text_head.")}
        write_tuned_folder(trained.clip_dir, tuned, folder)
        _copy_present(trained.clip_dir, folder, CLIP_FILES)
        return
    # the CLIP folder's tensors, whose image tower and temperature are then replaced by the trained ones
    weights = load_safetensors_folder(trained.clip_dir, dtype=torch.float32, ignore=("position_ids",))
    tuned = {k: v for k, v in trained.model.state_dict().items() if not k.startswith("text_head.")}
    if "logit_bias" not in weights:  # a sigmoid-loss run on a CLIP folder: CLIPModel has no bias (nor needs one
        tuned.pop("logit_bias", None)  # to rank: it shifts every logit alike); a SigLIP folder's is replaced
    # a SigLIP folder stores its temperature as (1,), ProCLIP as a scalar: the folder's shapes are kept
    weights.update({k: v.detach().float().cpu().reshape(weights[k].shape if k in weights else v.shape).contiguous()
                    for k, v in tuned.items()})
    save_file(weights, os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})  # "pt": what HF writes
    with open(os.path.join(trained.clip_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key in ("torch_dtype", "dtype"):  # the weights are float32 now (transformers 4.x / 5.x name the key)
        if key in config:
            config[key] = "float32"
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    _copy_present(trained.clip_dir, folder, CLIP_FILES)


def _copy_llm(llm_dir: str, target: str) -> None:
    """The LLM folder's config, tokenizer and safetensors weights (sharded or not) into `target`."""
    os.makedirs(target)
    _copy_present(llm_dir, target, LLM_FILES)
    for path in weight_files(llm_dir):
        shutil.copy2(path, os.path.join(target, os.path.basename(path)))


def export(run: str, out: str, copy_llm: bool = False, clip: str | None = None, llm: str | None = None) -> str:
    """Write the export of `run` (a run folder, a checkpoint or an exported folder) to `out`; returns `out`."""
    out = os.path.normpath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ModelFolderError(f"{out} exists and is not empty; choose a new folder (nothing in it is overwritten)")
    trained = load_model(run, clip=clip, llm=llm, device="cpu", dtype=torch.float32)  # the LLM is not loaded
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # written under a fresh hidden name beside OUT, then renamed: OUT appears whole or not at all
    with atomic_folder(out) as partial:  # OUT (absent or empty, checked above) appears only once complete
        _write_clip_folder(trained, partial)
        head = {k: v.detach().float().contiguous() for k, v in trained.model.text_head.state_dict().items()}
        save_file(head, os.path.join(partial, HEAD_FILE))
        if copy_llm:
            _copy_llm(trained.text.llm_dir, os.path.join(partial, "llm"))
        settings = trained.text.embedding
        config = {"head": trained.model.text_head.config.__dict__,
                  "llm": "llm" if copy_llm else os.path.abspath(trained.text.llm_dir),  # relative: inside OUT
                  "embedding": settings.__dict__,
                  "llm_dtype": next(name for name, dtype in DTYPES.items() if dtype == trained.text.llm_dtype),
                  "source": {"checkpoint": os.path.abspath(trained.name), "stage": trained.meta.get("stage"),
                             "step": trained.meta.get("step"), "clip": os.path.abspath(trained.clip_dir)}}
        with open(os.path.join(partial, EXPORT_JSON), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a ProCLIP run as a Hugging Face CLIP folder plus its text head.")
    p.add_argument("run", help="a train.py run folder (its latest checkpoint) or a step_NNNNNN.safetensors file")
    p.add_argument("out", help="the folder to write; it must not exist or be empty")
    p.add_argument("--copy-llm", action="store_true", help="copy the LLM folder into OUT/llm (else OUT names it)")
    p.add_argument("--clip", default=None, help="the CLIP folder, if the one the run names has moved")
    p.add_argument("--llm", default=None, help="the LLM folder, if the one the run names has moved")
    args = p.parse_args(argv)
    try:
        out = export(args.run, args.out, args.copy_llm, args.clip, args.llm)
    except UserError as err:
        exit_with(err)
    reader = (f"open_clip: open_clip.create_model('local-dir:{out}').encode_image(...)" if is_open_clip_folder(out)
              else f"transformers: CLIPModel.from_pretrained({out!r}).get_image_features(...)")
    print(f"exported {args.run} to {out}\n"
          f"  {reader}  (the tuned image tower)\n"
          f"  miniproclip:  miniproclip.load_model({out!r}).encode_text([...])  (the LLM text side)")


if __name__ == "__main__":
    main()
