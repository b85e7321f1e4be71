"""Export a `model=hf` training run to a Hugging Face checkpoint: `python launch/export_hf.py <run_dir> <out_dir>`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_mha.train.export_hf import main  # noqa: E402

if __name__ == "__main__":
    main()
