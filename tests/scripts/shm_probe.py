"""Join the process group as training does, sum each rank's number over the ranks, and write the sum.

    deepspeed --num_gpus 2 tests/scripts/shm_probe.py OUT_DIR        (the launcher puts --local_rank first)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from ds_kd.train import engine  # noqa: E402

engine.init_distributed()
total = engine.all_reduce(torch.tensor([float(engine.rank() + 1)]))
if engine.is_main():
    names = [str(engine.shm_buffer_path(r)) for r in range(engine.world_size())]
    Path(sys.argv[-1], "sum.txt").write_text(f"{total.item()}\n" + "\n".join(names) + "\n")
engine.barrier()
