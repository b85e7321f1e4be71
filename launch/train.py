"""Train dist_mha's small decoder LM: `python launch/train.py [hydra overrides]`.

Under torchrun: `torchrun --standalone --nproc-per-node 2 launch/train.py parallel.tp=2`.
Under DeepSpeed: `deepspeed --num_gpus 2 --no_local_rank launch/train.py launcher=deepspeed parallel.tp=2`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dist_mha.train.app import main  # noqa: E402

if __name__ == "__main__":
    main()
