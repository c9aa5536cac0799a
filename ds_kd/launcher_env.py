"""What a rank learns from its launcher's environment before the process group exists, and what is refused there.

- :func:`adopt_launcher_ranks`: ``deepspeed --launcher openmpi|slurm|mvapich`` start every rank with its
  launcher's own variables (``OMPI_COMM_WORLD_*``, ``SLURM_PROCID``..., ``MV2_COMM_WORLD_*``, ``PMI_*``) and no
  ``RANK``; without this mapping each rank would run as a group of one, all writing into the same ``--out``.
- :func:`check_node_addresses`: with more than one node, a master address or a gloo address on loopback makes
  the other nodes connect to themselves ("Connection refused, remote=[127.0.0.1]") while node 0 waits for minutes;
  refused before the first collective, naming the setting that fixes it.
- :func:`read_deepspeed_env`: the ``.deepspeed_env`` files the ``deepspeed`` launcher exports to every node, with
  the lines its reader crashes on (blank, comment, no ``=``) reported by line number.

Standard library only (imported before torch by the command-line modules).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

from ds_kd.errors import UsageError

DEFAULT_MASTER_PORT = "29500"
"""DeepSpeed's default ``--master_port`` (``TORCH_DISTRIBUTED_DEFAULT_PORT``), used by its own MPI discovery."""

ONE_MACHINE_ENV = "DS_KD_ONE_MACHINE"
"""Set to 1 when every "node" of a hostfile is this one machine (trying the multi-node flow, the tests): a
loopback master or gloo address then reaches every rank and is not refused."""


@dataclass(frozen=True)
class LauncherVariables:
    """The environment variables a launcher sets on each rank in place of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``."""

    launcher: str
    """As the user names it (``deepspeed --launcher X``), for messages."""
    rank: str
    size: str
    local_rank: str
    local_size: str | None = None


LAUNCHER_VARIABLES = (
    # Open MPI (mpirun of `--launcher openmpi`); checked first: under an sbatch allocation mpirun's ranks also
    # inherit the batch step's SLURM_PROCID=0.
    LauncherVariables("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                      "OMPI_COMM_WORLD_LOCAL_SIZE"),
    LauncherVariables("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                      "MV2_COMM_WORLD_LOCAL_SIZE"),
    # srun of `--launcher slurm`: SLURM_STEP_NUM_TASKS exists only inside a job step, so a plain `python ...` in an
    # sbatch script (whose SLURM_NTASKS counts the whole allocation) stays a group of one.
    LauncherVariables("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
    # MPICH/Intel MPI hydra and PMI-2 launchers (DeepSpeed's mpich/impi runners set RANK themselves).
    LauncherVariables("mpich/impi (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
"""Checked in this order; the first launcher whose size variable is set is the one that started us (only a
launcher of several processes sets one)."""


def launcher_rank(environ: Mapping[str, str] = os.environ) -> str:
    """This process's global rank as its launcher states it (``RANK``, else a launcher's own variable), "0" when
    none does; for log lines written before the process group exists."""
    if "RANK" in environ:
        return environ["RANK"]
    found = started_by(environ)
    return environ.get(found.rank, "0") if found else "0"


def started_by(environ: Mapping[str, str]) -> LauncherVariables | None:
    """The launcher of :data:`LAUNCHER_VARIABLES` whose size variable is set, if any."""
    return next((v for v in LAUNCHER_VARIABLES if v.size in environ), None)


def adopt_launcher_ranks(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``, ``MASTER_PORT`` where missing) from
    the variables of the launcher that started this process; returns that launcher's name, or None when ``RANK``
    is already set (the ``deepspeed`` pdsh/local launcher, torchrun, DeepSpeed's mpich/impi runners) or no
    launcher is found (a plain ``python`` run: a group of one).

    Raises UsageError naming the launcher, leaving ``environ`` unchanged, when its variables are incomplete or
    when a group of more than one rank has no ``MASTER_ADDR`` (the openmpi, slurm and mvapich runners of
    DeepSpeed 0.19.8 pass neither ``--master_addr`` nor ``MASTER_ADDR``). DeepSpeed's own fallback
    (``deepspeed.comm.mpi_discovery``) needs mpi4py and covers Open MPI only."""
    if "RANK" in environ:
        return None
    found = started_by(environ)
    if found is None:
        return None
    missing = [name for name in (found.rank, found.size, found.local_rank) if name not in environ]
    if missing:
        raise UsageError(f"--launcher {found.launcher}: this rank has no {', '.join(missing)} (set: "
                         f"{found.size}={environ[found.size]}): start ranks with the "
                         f"launcher itself, or with deepspeed's default pdsh launcher (docs/multi-node.md)")
    size = int(environ[found.size])
    if size > 1 and "MASTER_ADDR" not in environ:
        raise UsageError(f"--launcher {found.launcher}: MASTER_ADDR is not set, and this launcher does not pass "
                         f"--master_addr to the ranks: put MASTER_ADDR=<an address of the first host that every "
                         f"node reaches> (and MASTER_PORT=<free port>) into .deepspeed_env (docs/multi-node.md)")
    environ.update({"RANK": environ[found.rank], "WORLD_SIZE": str(size), "LOCAL_RANK": environ[found.local_rank]})
    if found.local_size and found.local_size in environ:
        environ.setdefault("LOCAL_WORLD_SIZE", environ[found.local_size])
    environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    return found.launcher


def num_nodes(environ: Mapping[str, str] = os.environ) -> int:
    """How many machines the job spans, from the launcher's variables: ``CROSS_SIZE`` (DeepSpeed's launcher),
    else ``WORLD_SIZE`` over the ranks per node (``LOCAL_WORLD_SIZE``/``LOCAL_SIZE``), else 1."""
    if "CROSS_SIZE" in environ:
        return int(environ["CROSS_SIZE"])
    world = int(environ.get("WORLD_SIZE", "1"))
    local = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world)))
    return max(1, -(-world // max(1, local)))


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (a host name is resolved first; one that does not resolve is not loopback)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(address)).is_loopback
        except OSError:
            return False


def interface_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses on this machine (psutil, a DeepSpeed dependency)."""
    import psutil

    return {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items()}


def hostname_addresses(hostname: str) -> list[str]:
    """What ``hostname`` resolves to, in resolver order (gloo advertises the first it can bind)."""
    try:
        return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)))
    except OSError:
        return []


def check_node_addresses(environ: Mapping[str, str] = os.environ, backend: str = "gloo",
                         interfaces: Callable[[], dict[str, list[str]]] = interface_addresses,
                         resolve: Callable[[str], list[str]] = hostname_addresses,
                         hostname: Callable[[], str] = socket.gethostname) -> None:
    """Refuse, before the first collective, a job of more than one node whose ranks would advertise or dial a
    loopback address: ``MASTER_ADDR`` on loopback, or (gloo) ``GLOO_SOCKET_IFNAME`` naming an interface that is
    missing or has no other address, or, without it, this host's name resolving to loopback first (Debian's
    ``127.0.1.1 <hostname>`` line: gloo advertises what the host name resolves to).

    A single node, or ``DS_KD_ONE_MACHINE=1``, passes. NCCL picks a non-loopback interface itself, so only the
    master address is checked for other backends. Raises UsageError naming the variable or flag to set."""
    nodes = num_nodes(environ)
    if nodes < 2 or environ.get(ONE_MACHINE_ENV) == "1":
        return
    master = environ.get("MASTER_ADDR", "")
    if master and is_loopback(master):
        raise UsageError(f"MASTER_ADDR={master} (deepspeed --master_addr) is a loopback address but the job spans "
                         f"{nodes} nodes: the others would dial themselves; pass --master_addr <an address of the "
                         f"first host that every node reaches>")
    if backend != "gloo":
        return
    addresses = interfaces()
    usable = ", ".join(f"{name} {a}" for name, addrs in sorted(addresses.items())
                       for a in addrs if not ipaddress.ip_address(a).is_loopback) or "none"
    named = environ.get("GLOO_SOCKET_IFNAME")
    if named:
        for name in named.split(","):
            if not any(not ipaddress.ip_address(a).is_loopback for a in addresses.get(name, [])):
                raise UsageError(f"GLOO_SOCKET_IFNAME={named}: {name} is not an interface with a non-loopback "
                                 f"address on {hostname()} (here: {usable}); name one that every node has, in "
                                 f".deepspeed_env")
        return
    host = hostname()
    resolved = resolve(host)
    if resolved and ipaddress.ip_address(resolved[0]).is_loopback:
        raise UsageError(f"this host's name {host} resolves to {resolved[0]} and the job spans {nodes} nodes: gloo "
                         f"would advertise that loopback address to the others; put GLOO_SOCKET_IFNAME=<interface> "
                         f"into .deepspeed_env (interfaces here: {usable})")


@dataclass(frozen=True)
class EnvFileLine:
    """One line of a ``.deepspeed_env`` file: ``NAME=value``, or a line the launcher cannot read (``problem``)."""

    path: Path
    number: int
    name: str
    value: str
    problem: str | None = None


def deepspeed_env_paths(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> list[Path]:
    """The ``.deepspeed_env`` files that DeepSpeed's runner would export from (home first, then ``cwd``)."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    paths = [Path(os.path.expanduser("~")) / name, (cwd or Path.cwd()) / name]  # an absolute name is one file
    return [p for p in dict.fromkeys(paths) if p.is_file()]


def read_deepspeed_env(paths: list[Path]) -> list[EnvFileLine]:
    """Every line of ``paths``; DeepSpeed's runner splits each line at its first ``=`` and crashes on a line
    without one (a blank line: ``ValueError: not enough values to unpack``), and would export a ``# NAME=x``
    comment as a variable named ``# NAME`` (cutting the remote command short): both are reported as problems."""
    lines = []
    for path in paths:
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            name, equals, value = text.partition("=")
            problem = ("blank line" if not text.strip() else "comment" if text.lstrip().startswith("#")
                       else "no NAME=value" if not equals or not name.strip().isidentifier() else None)
            lines.append(EnvFileLine(path, number, name.strip(), value.strip(), problem))
    return lines
