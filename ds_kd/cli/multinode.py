"""Pre-flight check of a multi-node run, before a run of days:

    python -m ds_kd.cli.multinode check --hostfile hostfile --out /shared/runs/teacher --data /shared/corpus

reaches every host of the hostfile over ssh (as DeepSpeed's pdsh launcher will) and reports per host and item:
Python and the repository at this machine's absolute paths, the same commit and package versions, the
interface named by ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` present with a non-loopback address (or, with
none named, the host name not resolving to loopback), ``--out`` and ``--data`` on storage every node sees (a
file written here is read there), free disk under ``--out``, and ``--master_port`` free on the first host; and
for the launching shell: pdsh installed, ssh keepalives in ``PDSH_SSH_ARGS_APPEND``, every ``.deepspeed_env``
line readable by the launcher. Hosts are probed at once, each with an ssh ConnectTimeout (``--connect-timeout``),
so a hostfile of dead hosts takes about one timeout, not one per host; each host's lines are printed as it
answers. Prints one line per (host, item); exits 1 when any is FAIL, 2 on a usage error.

Each host runs :data:`PROBE` (standard library only) with this machine's Python path over ssh; everything else
runs here, so the comparison is testable with another transport than ssh (:func:`run_check`).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ds_kd.errors import UsageError
from ds_kd.launcher_env import deepspeed_env_paths, read_deepspeed_env

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "ds-kd")
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
KEEPALIVE = "-o ServerAliveInterval=10 -o ServerAliveCountMax=3"
"""The ``PDSH_SSH_ARGS_APPEND`` the docs give: the ssh session of a node that vanished ends after about 30 s."""
PROBE_SECONDS = 60
"""How long a host that accepted the ssh connection may take to run the probe before it counts as no answer."""
MAX_PARALLEL = 64
"""Hosts probed at once (one ssh client each)."""

PROBE = r'''
import fcntl, importlib.metadata as md, json, os, shutil, socket, struct, subprocess, sys
req = json.loads(sys.argv[1])
def ipv4(name):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))[20:24])
        except OSError:
            return None
def version(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return None
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None
def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False
git = subprocess.run(["git", "-C", req["repo"], "rev-parse", "HEAD"], capture_output=True, text=True)
names = [n for _, n in socket.if_nameindex()]
try:
    resolved = socket.gethostbyname(socket.gethostname())
except OSError:
    resolved = None
print(json.dumps({
    "hostname": socket.gethostname(), "resolved": resolved, "python": sys.executable,
    "repo": os.path.isdir(req["repo"]), "commit": git.stdout.strip() or None,
    "versions": {p: version(p) for p in req["packages"]},
    "interfaces": {n: (ipv4(n) if n in names else None) for n in req["interfaces"]},
    "tokens": {d: read(path) for d, path in req["tokens"].items()},
    "free_bytes": shutil.disk_usage(req["disk"]).free,
    "port_free": port_free(req["port"]) if req["port"] else None}))
'''
"""Run on every host with this machine's Python: ``python - <request JSON>``, the script on stdin; prints one JSON."""

Transport = Callable[[str, list[str], str], subprocess.CompletedProcess]
"""(host, argv, stdin) -> the finished command on that host."""


@dataclass(frozen=True)
class Item:
    """One line of the report."""

    host: str
    item: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.host:<22} {self.item:<16} {'ok' if self.ok else 'FAIL':<5} {self.detail}"


def ssh_transport(ssh_port: int | None = None, connect_timeout: int = 10) -> Transport:
    """Runs argv on a host with ``ssh -o BatchMode=yes`` (no password prompt), as pdsh will; a host that does not
    accept the connection within ``connect_timeout`` seconds fails then, one that stops answering after it is
    given up on by the keepalives or after :data:`PROBE_SECONDS` more (``subprocess.TimeoutExpired``)."""
    def run(host: str, argv: list[str], stdin: str) -> subprocess.CompletedProcess:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}", *KEEPALIVE.split(),
               *(["-p", str(ssh_port)] if ssh_port else []), host, " ".join(shlex.quote(a) for a in argv)]
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=connect_timeout + PROBE_SECONDS)
    return run


def read_hostfile(path: Path) -> list[str]:
    """The hosts of a DeepSpeed hostfile (``host slots=N`` lines), in order; its own parser, so a hostfile the
    launcher refuses is refused here too (UsageError naming the file)."""
    if path.is_dir():
        raise UsageError(f"--hostfile {path}: is a directory, not a hostfile (a file of `host slots=N` lines)")
    if not path.is_file():
        raise UsageError(f"--hostfile {path}: no such file (lines of `host slots=N`)")
    from deepspeed.launcher.runner import fetch_hostfile

    try:
        return list(fetch_hostfile(str(path)))
    except ValueError as e:
        raise UsageError(f"--hostfile {path}: {e}") from None


def shared_dir(path: Path) -> Path:
    """``path`` or, where it does not exist yet (a run directory before the run), its nearest existing parent."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def interface_names(environ: dict[str, str], env_file: dict[str, str]) -> list[str]:
    """The interfaces the ranks will be told to use: ``.deepspeed_env`` wins over the launching shell."""
    return [n for var in INTERFACE_VARIABLES for n in (env_file.get(var) or environ.get(var) or "").split(",") if n]


def launcher_items(environ: dict[str, str], env_lines) -> list[Item]:
    """What the launching shell needs: pdsh, ssh keepalives, a readable ``.deepspeed_env``."""
    items = [Item("launcher", "pdsh", bool(shutil.which("pdsh")),
                  shutil.which("pdsh") or "not installed: DeepSpeed's default launcher has no ssh fallback "
                                          "(apt-get install pdsh)")]
    ssh_args = environ.get("PDSH_SSH_ARGS_APPEND", "")
    items.append(Item("launcher", "keepalive", "ServerAliveInterval" in ssh_args,
                      f"PDSH_SSH_ARGS_APPEND={ssh_args!r}" if "ServerAliveInterval" in ssh_args else
                      f"no ServerAliveInterval in PDSH_SSH_ARGS_APPEND: a lost node keeps the launcher waiting "
                      f"forever; export PDSH_SSH_ARGS_APPEND=\"{KEEPALIVE}\""))
    for line in env_lines:
        if line.problem:
            items.append(Item("launcher", ".deepspeed_env", False,
                              f"{line.path}:{line.number}: {line.problem}: the launcher reads only NAME=value "
                              f"lines (no blank or comment lines); remove it"))
    return items


def host_items(host: str, reply: dict, want: dict, request: dict, min_free_gb: float, first: bool) -> list[Item]:
    """The report lines of one host's probe ``reply`` against this machine's (``want``)."""
    items = [Item(host, "repository", reply["repo"], str(REPO) + ("" if reply["repo"] else ": missing")),
             Item(host, "commit", reply["commit"] == want["commit"],
                  f"{reply['commit']}" + ("" if reply["commit"] == want["commit"] else f" (here {want['commit']})"))]
    differ = {p: v for p, v in reply["versions"].items() if v != want["versions"][p]}
    items.append(Item(host, "packages", not differ, ", ".join(f"{p} {v} (here {want['versions'][p]})"
                                                              for p, v in differ.items()) or "same versions"))
    for name, address in reply["interfaces"].items():
        ok = address is not None and not address.startswith("127.")
        items.append(Item(host, f"interface {name}", ok, address or "missing or without an IPv4 address"))
    if not reply["interfaces"]:
        loop = (reply["resolved"] or "").startswith("127.")
        items.append(Item(host, "interface", not loop, f"{reply['hostname']} resolves to {reply['resolved']}" +
                          ("; gloo would advertise it: set GLOO_SOCKET_IFNAME in .deepspeed_env" if loop else "")))
    for directory, token in request["want_tokens"].items():
        seen = reply["tokens"][directory] == token
        items.append(Item(host, f"shared {directory}", seen, "a file written here is read there" if seen else
                          "a file written here is not seen there: put it on storage every node mounts at this path"))
    free_gb = reply["free_bytes"] / 2**30
    items.append(Item(host, "free disk", free_gb >= min_free_gb, f"{free_gb:.1f} GB under {request['disk']}"))
    if first:
        items.append(Item(host, "master port", bool(reply["port_free"]),
                          f"{request['port']} " + ("free" if reply["port_free"] else "in use: pass another --master_port")))
    return items


def probe(host: str, request: dict, transport: Transport) -> dict | str:
    """The probe's reply on ``host``, or a one-line reason why it gave none."""
    try:
        proc = transport(host, [sys.executable, "-", json.dumps(request)], PROBE)
    except subprocess.TimeoutExpired as e:
        return f"no answer within {e.timeout:.0f} s"
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"


def run_check(hosts: list[str], dirs: dict[str, Path], port: int, transport: Transport,
              environ: dict[str, str] | None = None, min_free_gb: float = 10.0,
              on_items: Callable[[list[Item]], None] | None = None) -> list[Item]:
    """Probe every host at once (up to :data:`MAX_PARALLEL`) and return the report, the launcher's lines first,
    then the hosts' in hostfile order; ``dirs``: name (``out``, ``data``) -> directory that every node must share
    (a token file is written into each here and removed afterwards). ``on_items`` gets the launcher's lines, then
    each host's as that host answers (the first to answer first)."""
    environ = dict(os.environ if environ is None else environ)
    env_lines = read_deepspeed_env(deepspeed_env_paths(environ))
    env_file = {line.name: line.value for line in env_lines if not line.problem}
    places = {name: shared_dir(d) for name, d in dirs.items()}
    tokens = {name: (places[name] / f".ds_kd_check_{secrets.token_hex(8)}", secrets.token_hex(16))
              for name in places}
    request = {"repo": str(REPO), "packages": list(PACKAGES), "interfaces": interface_names(environ, env_file),
               "tokens": {name: str(path) for name, (path, _) in tokens.items()},
               "disk": str(places.get("out", REPO)), "port": 0}
    want = json.loads(subprocess.run([sys.executable, "-", json.dumps(request)], input=PROBE, capture_output=True,
                                     text=True, check=True).stdout)
    request["want_tokens"] = {name: token for name, (_, token) in tokens.items()}
    items = launcher_items(environ, env_lines)
    if on_items:
        on_items(items)

    def check_host(index: int, host: str) -> list[Item]:
        host_request = {**request, "port": port if index == 0 else 0}
        reply = probe(host, host_request, transport)
        if isinstance(reply, str):
            return [Item(host, "ssh + python", False, f"{sys.executable} over ssh: {reply}")]
        return host_items(host, reply, want, host_request, min_free_gb, first=index == 0)

    per_host: list[list[Item]] = [[] for _ in hosts]
    try:
        for path, token in tokens.values():
            path.write_text(token)
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(hosts)))) as pool:
            pending = {pool.submit(check_host, index, host): index for index, host in enumerate(hosts)}
            for done in as_completed(pending):
                per_host[pending[done]] = done.result()
                if on_items:
                    on_items(per_host[pending[done]])
    finally:
        for path, _ in tokens.values():
            path.unlink(missing_ok=True)
    return items + [item for host_lines in per_host for item in host_lines]


def print_items(items: list[Item]) -> None:
    """Print report lines now (a host's, as it answers)."""
    for item in items:
        print(item.line(), flush=True)


def build_parser() -> argparse.ArgumentParser:
    from ds_kd.cli.flags import HelpFormatter

    c = argparse.ArgumentParser(prog="python -m ds_kd.cli.multinode", description=__doc__, formatter_class=HelpFormatter)
    c.add_argument("command", choices=["check"], help="check: every host of --hostfile, before a multi-node run")
    c.add_argument("--hostfile", type=Path, required=True,
                   help="DeepSpeed hostfile (`host slots=N` lines), the one given to deepspeed --hostfile")
    c.add_argument("--out", type=Path, default=None,
                   help="the run directory --out (or a parent of it) that every node must see (default: not checked)")
    c.add_argument("--data", type=Path, default=None,
                   help="the corpus directory --data that every node must see (default: not checked)")
    c.add_argument("--master_port", "--master-port", type=int, default=29500,
                   help="the port deepspeed --master_port will use, checked free on the first host")
    c.add_argument("--ssh-port", type=int, default=None,
                   help="ssh port of every host, as deepspeed --ssh_port (default: ssh's own, usually 22)")
    c.add_argument("--min-free-gb", type=float, default=10.0,
                   help="free disk wanted under --out (or the repository) on every host, in GB")
    c.add_argument("--connect-timeout", type=int, default=10,
                   help="seconds ssh waits for a host to accept the connection (ssh's ConnectTimeout); hosts are "
                        "checked at once, so dead hosts cost this much once, not once each")
    return c


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hosts = read_hostfile(args.hostfile)
        dirs = {name: d for name, d in (("out", args.out), ("data", args.data)) if d is not None}
        if args.data is not None and not args.data.is_dir():
            raise UsageError(f"--data {args.data}: no such directory")
        if args.connect_timeout < 1:
            raise UsageError(f"--connect-timeout must be at least 1 second, got {args.connect_timeout}")
        print(f"checking {len(hosts)} host(s) at once over ssh (ConnectTimeout {args.connect_timeout} s); each "
              f"host's lines come as it answers", file=sys.stderr, flush=True)
        items = run_check(hosts, dirs, args.master_port, ssh_transport(args.ssh_port, args.connect_timeout),
                          min_free_gb=args.min_free_gb,
                          on_items=print_items)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [i for i in items if not i.ok]
    print(f"{len(failed)} of {len(items)} checks failed" if failed else f"all {len(items)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
