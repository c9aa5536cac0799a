"""Join the process group as training does, sum each rank's number over the ranks, and write the sum, whether
DeepSpeed built its shared-memory op, and this job's shared-memory buffers in /dev/shm.

    deepspeed --num_gpus 2 tests/scripts/shm_probe.py OUT_DIR        (the launcher puts --local_rank first)
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from deepspeed.comm import comm  # noqa: E402

from ds_kd.train import engine  # noqa: E402

engine.init_distributed()
total = engine.all_reduce(torch.tensor([float(engine.rank() + 1)]))
if engine.is_main():
    port = os.environ["MASTER_PORT"]
    buffers = sorted(str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    Path(sys.argv[-1], "probe.txt").write_text(
        f"{total.item()}\n{comm.cdb.shm_comm_op is not None}\n" + "".join(f"{b}\n" for b in buffers))
engine.barrier()
