"""Two real "hosts" on one machine for the multi-node tests: two Linux network namespaces joined by a veth pair,
each with its own sshd, reached with a key made for the test (nothing written to ``~/.ssh`` or ``/etc/hosts``).

Host A (node 0, where the launcher runs) and host B each have an interface named ``dskd0`` (the name a
``GLOO_SOCKET_IFNAME`` gives every node). Host B also answers on a second address with a second sshd whose mount
namespace shows another commit of the repository (its git ``HEAD`` bind-mounted) and a private ``unshared/``
directory (a tmpfs), for the pre-flight check's red cases. Everything is torn down by pid and name, also when
the set-up fails half way. Needs root, ``ip``, ``unshare``, ``/usr/sbin/sshd`` and ``pdsh``: :func:`missing`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
IFNAME = "dskd0"


def missing() -> list[str]:
    """What this machine lacks for the namespace tests (empty when it can run them)."""
    lacks = [] if os.geteuid() == 0 else ["root (network namespaces)"]
    lacks += [tool for tool in ("ip", "unshare", "pdsh", "ssh", "ssh-keygen", "git") if not shutil.which(tool)]
    return lacks + ([] if os.path.exists(SSHD) else [f"{SSHD} (openssh-server)"])


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


@dataclass
class Hosts:
    """The two namespaces: their names, addresses and the files the ssh client and the launcher need."""

    root: Path
    ns: tuple[str, str]
    addr: tuple[str, str]
    alt_addr: str
    """Host B's second address: the sshd that sees another commit and a private ``unshared/``."""
    bin_dir: Path
    """Holds an ``ssh`` that uses the test's key and config; first on PATH for the launcher and the check."""
    env_file: Path
    """The ``.deepspeed_env`` (``DS_ENV_FILE``) of the runs."""
    keepalive: str = "-o ServerAliveInterval=2 -o ServerAliveCountMax=3"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The launching shell's environment: the test's ssh first on PATH, keepalives, the env file."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PATH=f"{self.bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
                   PDSH_SSH_ARGS_APPEND=self.keepalive, DS_ENV_FILE=str(self.env_file))
        return {**env, **extra}

    def in_ns(self, index: int, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[index], *cmd]

    def hostfile(self, *addresses: str) -> Path:
        path = self.root / f"hostfile-{len(list(self.root.glob('hostfile-*')))}"
        path.write_text("".join(f"{a} slots=1\n" for a in addresses or self.addr))
        return path

    def cut(self, index: int) -> None:
        """Cut host ``index``'s link: its packets stop, no connection is reset (as a node that lost power)."""
        sh("ip", "-n", self.ns[index], "link", "set", IFNAME, "down")

    def restore(self, index: int) -> None:
        """Bring host ``index``'s link back up (the hosts are shared by the module's tests)."""
        sh("ip", "-n", self.ns[index], "link", "set", IFNAME, "up")


def write_ssh_files(root: Path) -> tuple[Path, Path]:
    """A client key, an ``ssh_config`` and an ``ssh`` wrapper using it; returns (wrapper dir, public key)."""
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key"))
    (root / "ssh_config").write_text(
        f"Host *\n  IdentityFile {root / 'id'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {root / 'ssh_config'} \"$@\"\n")
    (bin_dir / "ssh").chmod(0o755)
    return bin_dir, root / "id.pub"


def sshd_config(root: Path, name: str, address: str) -> Path:
    path = root / f"sshd_{name}.conf"
    path.write_text(f"ListenAddress {address}\nHostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'id.pub'}\n"
                    f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                    f"PidFile {root / f'sshd_{name}.pid'}\nMaxStartups 50\nMaxSessions 50\n")
    return path


def other_commit_head(root: Path) -> tuple[Path, Path]:
    """(this checkout's git HEAD file, a file naming its parent commit) for host B's second sshd."""
    repo = Path(__file__).resolve().parents[2]
    head = Path(sh("git", "-C", str(repo), "rev-parse", "--path-format=absolute", "--git-path", "HEAD").stdout.strip())
    other = root / "OTHER_HEAD"
    other.write_text(sh("git", "-C", str(repo), "rev-parse", "HEAD~1").stdout)
    return head, other


def wait_for_ssh(hosts: Hosts, index: int, address: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while True:
        proc = subprocess.run(hosts.in_ns(index, "ssh", address, "true"), env=hosts.env(), capture_output=True,
                              text=True)
        if proc.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"sshd on {address} does not answer: {proc.stderr.strip()}")
        time.sleep(0.2)


def start(root: Path) -> Hosts:
    """Create the namespaces, link and sshds (the caller tears them down with :func:`stop`, also on failure)."""
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    bin_dir, _ = write_ssh_files(root)
    env_file = root / "deepspeed_env"
    env_file.write_text(f"GLOO_SOCKET_IFNAME={IFNAME}\nOMP_NUM_THREADS=1\nWANDB_MODE=disabled\n"
                        f"TOKENIZERS_PARALLELISM=false\n")
    hosts = Hosts(root, (f"dskdA{tag}", f"dskdB{tag}"), (f"{subnet}.1", f"{subnet}.2"), f"{subnet}.3", bin_dir,
                  env_file)
    if not Path("/run/sshd").exists():  # sshd's privilege-separation directory (the package's init makes it)
        Path("/run/sshd").mkdir(mode=0o755)
        (root / "made_run_sshd").touch()
    for ns in hosts.ns:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
    for index, (veth, ns) in enumerate(zip((f"va{tag}", f"vb{tag}"), hosts.ns)):
        sh("ip", "link", "set", veth, "netns", ns)
        sh("ip", "-n", ns, "link", "set", veth, "name", IFNAME)
        sh("ip", "-n", ns, "addr", "add", f"{hosts.addr[index]}/24", "dev", IFNAME)
        sh("ip", "-n", ns, "link", "set", IFNAME, "up")
    sh("ip", "-n", hosts.ns[1], "addr", "add", f"{hosts.alt_addr}/24", "dev", IFNAME)
    for index, address in enumerate(hosts.addr):
        cfg = sshd_config(root, f"n{index}", address)
        hosts.procs.append(subprocess.Popen(hosts.in_ns(index, SSHD, "-D", "-f", str(cfg), "-E",
                                                        str(root / f"sshd_n{index}.log"))))
    head, other = other_commit_head(root)
    (root / "unshared").mkdir()
    alt = sshd_config(root, "alt", hosts.alt_addr)
    script = (f"mount --make-rprivate / && mount -t tmpfs none {root / 'unshared'} && mount --bind {other} {head} "
              f"&& exec {SSHD} -D -f {alt} -E {root / 'sshd_alt.log'}")
    hosts.procs.append(subprocess.Popen(hosts.in_ns(1, "unshare", "-m", "sh", "-c", script)))
    for index, address in ((0, hosts.addr[0]), (0, hosts.addr[1]), (0, hosts.alt_addr), (1, hosts.addr[0])):
        wait_for_ssh(hosts, index, address)
    return hosts


def stop(hosts: Hosts | None, root: Path, tag_pid: int) -> None:
    """Kill every process left in the namespaces (started by the tests), the sshds, then delete the namespaces
    (which removes the veth pair) and ``/run/sshd`` if it was made here."""
    tag = f"{tag_pid % 10000}"
    for ns in (f"dskdA{tag}", f"dskdB{tag}"):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in hosts.procs if hosts else []:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    for ns in (f"dskdA{tag}", f"dskdB{tag}"):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    subprocess.run(["ip", "link", "delete", f"va{tag}"], capture_output=True)  # if set-up stopped before the move
    if (root / "made_run_sshd").exists():
        shutil.rmtree("/run/sshd", ignore_errors=True)

