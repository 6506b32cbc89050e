"""Make torchvision importable where its C ops cannot load; run by conftest.py in the test process and, through
PYTHONPATH, at the start of every Python subprocess a test launches (train.py, bench/, torchrun).

PyPI's torchvision wheels are CUDA builds: on a CPU-only torch their extension does not load, and torchvision 0.28
then dies at import registering fake kernels for two of its ops (`torchvision::nms`, `qnms`), which also breaks
transformers (it imports torchvision when it is installed). requirements-dev.txt installs torchvision with timm and
open_clip, the references of tests/test_openclip*.py; none of them uses its C ops. Declaring the two schemas, only
when the extension does not load, lets the pure-Python parts import. Without torchvision this does nothing.
"""

import importlib.util
import os


def declare_missing_torchvision_ops():
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    import torch
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except (OSError, RuntimeError):
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> "
                                                           "Tensor")
            except RuntimeError:  # declared already
                pass


declare_missing_torchvision_ops()
