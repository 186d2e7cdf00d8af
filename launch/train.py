"""Entry point for launchers: `deepspeed launch/train.py --config configs/fuse.yaml [key=value ...]`.

Thin on purpose: the same as `mmdist train`, usable with deepspeed, torchrun, srun and mpiexec
(the deepspeed launcher's trailing `--local_rank=N` is accepted and ignored; ranks come from
mmdist.launch_env).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from mmdist import console  # noqa: E402
from mmdist.commands.train import process_main  # noqa: E402

if __name__ == "__main__":
    # as `mmdist train` does: one line per loaded model, third-party output only with MMDIST_VERBOSE=1
    console.configure()
    sys.exit(process_main(sys.argv[1:]))  # a training process: keeps freed memory on a CPU device
