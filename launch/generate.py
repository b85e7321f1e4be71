"""Greedy generation from a trained run: `python launch/generate.py outputs/<run id>`.

Under torchrun: `torchrun --standalone --nproc-per-node 2 launch/generate.py outputs/<run id>` (TP=2).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_mha.train.generate import main  # noqa: E402

if __name__ == "__main__":
    main()
