"""Distributed concerns in one place: process group, rank helpers, the DeepSpeed config and engine, and
gathering full weights under ZeRO-3. No other module calls ``torch.distributed`` or tests the rank.

The DeepSpeed JSON owns the engine settings (ZeRO stage, precision, micro batch, accumulation, clipping);
Python reads the effective values back from the engine and keeps no second copy. The only changes made to
the JSON go through :func:`apply_overrides` and :func:`resolve_precision`, which log what they changed.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ds_kd.errors import UsageError
from ds_kd.launcher_env import adopt_launcher_ranks, check_node_addresses
from ds_kd.textfile import read_json

log = logging.getLogger("ds_kd")


# ---- process group and ranks ----------------------------------------------------------------------

def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Join the process group the ``deepspeed`` launcher describes (env://), or make a group of one.

    Each rank's accelerator device is set to its ``LOCAL_RANK`` first: DeepSpeed sets it only in
    ``DeepSpeedEngine.__init__``, so a collective before the engine (the teacher's digest, a barrier) would run
    every rank on device 0 (NCCL: "Duplicate GPU detected", or a wait until the timeout). The timeout bounds how
    long a rank waits in a collective for a peer that died (then the job exits).

    Ranks started by ``--launcher openmpi|slurm|mvapich`` take their rank from that launcher's variables, and a
    job of several nodes whose ranks would dial or advertise a loopback address is refused here, before the first
    collective (:mod:`ds_kd.launcher_env`; UsageError naming the setting)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_available() and dist.is_initialized():
        return
    adopt_launcher_ranks()  # openmpi/slurm/mvapich set no RANK: never a group of one per rank
    check_node_addresses(backend=get_accelerator().communication_backend_name())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    choose_port = "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    if "RANK" not in os.environ:  # run directly with python: a single-process group
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")})
    get_accelerator().set_device(local_rank())
    if accelerator_name() == "cpu":
        skip_shm_comm_op()
    for attempt in range(3 if choose_port else 1):
        if choose_port:
            os.environ["MASTER_PORT"] = str(_free_port())
        try:
            deepspeed.init_distributed(timeout=timeout, verbose=False)
            break
        except dist.DistNetworkError:  # the free port was taken by another process in between: take another
            if not choose_port or attempt == 2:
                raise
    if accelerator_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one CPU machine share its cores: without this each rank starts one thread per core.
        local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world_size())))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


SHM_OP = "deepspeed_shm_comm"
"""The C++ op DeepSpeed's CPU accelerator would JIT-compile when the process group starts (:func:`skip_shm_comm_op`)."""


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU accelerator from compiling, loading and mapping its shared-memory op ``SHM_OP``.

    DeepSpeed uses that op only for ``inference_all_reduce`` (tensor-parallel inference); training's collectives
    on the CPU are gloo's (``TorchBackend.all_reduce``). Left on, it cost every fresh environment a compile of
    about a minute on 2 quiet cores (the demo's first launch: 60 s of 113; several minutes on a busy machine),
    a build lock that a killed process left behind for every later run to wait on, and a 69 MB file in /dev/shm
    per rank that DeepSpeed never removes. DeepSpeed builds the op only where ``deepspeed.ops.__compatible_ops__``
    says it is compatible (a dict it keeps for the process); marking it incompatible is DeepSpeed's own path for
    machines that cannot build it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Global rank 0: the only rank that logs, writes manifests and exports."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min) on the accelerator the engine uses; returns the tensor."""
    if dist.is_initialized() and world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), local_rank())


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


# ---- the DeepSpeed config ---------------------------------------------------------------------------

def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        return read_json(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def apply_overrides(config: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``config`` with dotted-key overrides (``zero_optimization.stage=2``), each change logged."""
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        old = node.get(leaf, "<unset>")
        if old != value:
            log.info("DeepSpeed config override: %s: %s -> %s", dotted, old, value)
        node[leaf] = value
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with a JSON value (``8``, ``true``, ``"x"``) or a bare string."""
    if "=" not in text:
        raise UsageError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


CPU_BF16_ENV = "DS_KD_CPU_BF16"
"""Set to 1 or 0 to state whether this CPU computes bf16 natively, over :func:`cpu_bf16_native`'s detection."""


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``; where
    there is no such file, oneDNN's own check). Without them torch emulates bf16: a [1024, 384] x [384, 1536]
    matmul took 973 ms in bf16 against 17.6 ms in fp32 on one AVX2 EPYC core (55x;
    ``benchmarks/bench_cpu_precision.py``), so such a CPU trains in fp32. ``DS_KD_CPU_BF16=1|0`` overrides."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


def half_precision_support(accel: str) -> dict[str, bool]:
    """Which half-precision modes train well (natively, at least as fast as fp32) on this accelerator: on a CPU
    fp16 never (no loss-scaling kernels) and bf16 only where :func:`cpu_bf16_native` (emulated bf16 is tens of
    times slower than fp32)."""
    if accel == "cpu":
        return {"fp16": False, "bf16": cpu_bf16_native()}
    if accel == "cuda":
        return {"fp16": True, "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    return {"fp16": True, "bf16": True}


def resolve_precision(config: dict, accel: str | None = None) -> dict:
    """Apply the JSON's precision if the hardware trains well in it (:func:`half_precision_support`), else fall
    back (fp16 -> bf16 -> fp32), logged: the shipped JSONs ask for fp16, which a CPU runs in bf16 where it has
    native bf16 and in fp32 otherwise."""
    accel = accel or accelerator_name()
    support = half_precision_support(accel)
    wants = [m for m in ("fp16", "bf16") if config.get(m, {}).get("enabled")]
    if not wants or support[wants[0]]:
        return config
    want = wants[0]
    fallback = "bf16" if want == "fp16" and support["bf16"] else "fp32"
    changes = {f"{want}.enabled": False}
    if fallback != "fp32":
        changes[f"{fallback}.enabled"] = True
    log.warning("%s requested by the DeepSpeed config but not supported on %s: falling back to %s",
                want, accel, fallback)
    return apply_overrides(config, changes)


def precision_dtype(config: dict) -> torch.dtype:
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


# ---- the engine -------------------------------------------------------------------------------------

def build_engine(model: torch.nn.Module, config: dict, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
    """``deepspeed.initialize`` with the merged config dict as the only source of settings."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    return engine


def engine_settings(engine) -> dict:
    """The effective engine values, read back from the engine (for logs and manifests)."""
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "micro_batch_per_rank": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "global_batch": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "precision": "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32",
        "world_size": world_size(),
        "accelerator": accelerator_name(),
    }


def gather_full_state_dict(module: torch.nn.Module, optimizer=None) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights of ``module``, gathered under any ZeRO stage; every rank must call it; rank 0 gets the
    dict, the others None.

    A trained parameter comes from the optimizer's fp32 master copy where it keeps one: ZeRO's partitions, and
    at ZeRO stage 0 in fp16/bf16 the engine's ``optimizer`` (DeepSpeed's fp16/bf16 optimizer keeps the masters
    apart from the module, whose half copy is rounded). Frozen parameters and buffers come from the module."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _half_precision_masters(optimizer)
    state = {}
    seen: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights: gather once
            if is_main():
                state[name] = state[seen[id(param)]]
            continue
        seen[id(param)] = name
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            full = masters.get(id(param))
        if full is None:  # frozen or not managed by the optimizer: gather the module weight itself
            full = _gather_param(param)
        if is_main():
            state[name] = full.detach().to("cpu", torch.float32).clone()
    for name, buf in module.named_buffers():
        if is_main():
            state[name] = buf.detach().to("cpu").clone()
    return state if is_main() else None


def _half_precision_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(module parameter) -> its fp32 master weight, for DeepSpeed's fp16/bf16 optimizer of ZeRO stage 0.

    With a client optimizer (ours: ``ds_kd.train.optim.build_optimizer``) DeepSpeed wraps it in
    ``FP16_UnfusedOptimizer``, which keeps one fp32 copy per parameter but gives the parameter no
    ``_hp_mapping``, so ``safe_get_full_fp32_param`` returns None there."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return {}
    return {id(param): master for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for param, master in zip(group, masters)}


def _gather_param(param: torch.nn.Parameter) -> torch.Tensor:
    import deepspeed

    if hasattr(param, "ds_id"):  # partitioned by ZeRO-3
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.clone()
    return param.data


def replica_digests(module: torch.nn.Module) -> list[str]:
    """Every rank's sha256 of the full weights of ``module`` (gathered under ZeRO-3): equal digests mean the
    ranks hold one model. Every rank must call it."""
    import hashlib

    h = hashlib.sha256()
    for _, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        h.update(_gather_param(param).detach().to("cpu", torch.float32).numpy().tobytes())
    digests: list[str] = [""] * world_size()
    if dist.is_initialized() and world_size() > 1:
        dist.all_gather_object(digests, h.hexdigest())
    else:
        digests = [h.hexdigest()]
    return digests
