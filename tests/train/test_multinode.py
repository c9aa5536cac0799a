"""Multi-node for real: two hosts (network namespaces with their own sshd, ``tests/helpers/multinode_hosts.py``) launched
with ``deepspeed --hostfile`` and its default pdsh launcher over ssh, a node's link cut after a checkpoint, and
the pre-flight check ``python -m ds_kd.cli.multinode check``. The machine must let us make namespaces (root, ``ip``,
sshd, pdsh; ``make test`` installs the packages where it can): else every test here is skipped, saying what is
missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import multinode_hosts
from tests.conftest import DEEPSPEED, ROOT, deepspeed_cmd, free_port, run_cmd, tail
from ds_kd.logbook import read_metrics

LACKS = multinode_hosts.missing()
pytestmark = pytest.mark.skipif(bool(LACKS), reason=f"no network namespaces here: missing {', '.join(LACKS)}")

STEPS, MICRO = 8, 8
DIST_TIMEOUT_MINUTES = 0.25
"""The cut run's --dist-timeout-minutes: how long the surviving rank waits in a collective for the lost one."""


def pretrain_args(corpus: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    """ZeRO-2 in fp32, the same global batch of 16 sequences on any number of ``ranks`` in all."""
    return ["launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json", "--model", "tiny-base",
            "--data", str(corpus), "--out", str(out), "--max-steps", str(STEPS),
            "--ds-override", f"train_micro_batch_size_per_gpu={MICRO}", "--ds-override", "fp16.enabled=false",
            "--ds-override", f"gradient_accumulation_steps={2 // ranks}", "--num-workers", "1", "--log-every", "1",
            "--lr", "3e-3", "--warmup-steps", "2", "--max-len", "64", "--save-every", "2", "--seed", "7", *extra]


def over_ssh(hosts, hostfile: Path, args: list[str]) -> list[str]:
    """The deepspeed command a user runs on node 0 (pdsh over ssh; the interface comes from .deepspeed_env)."""
    return hosts.in_ns(0, DEEPSPEED, "--hostfile", str(hostfile), "--master_addr", hosts.addr[0],
                       "--master_port", str(free_port()), *args)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["optimizer_step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    made = None
    try:
        made = multinode_hosts.start(root)
        yield made
    finally:
        multinode_hosts.stop(made, root, os.getpid())


@pytest.fixture(scope="module")
def one_node(tiny_corpus, tmp_path_factory) -> Path:
    """The reference: 1 node x 2 ranks, the usual launcher."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    args = pretrain_args(tiny_corpus, out, 2)
    proc = run_cmd(deepspeed_cmd(args[0], args[1:], num_ranks=2),
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, tail(proc)
    return out


def test_two_nodes_over_ssh_train_the_model_of_one_node_with_two_ranks(hosts, one_node, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    start = time.time()
    proc = run_cmd(over_ssh(hosts, hosts.hostfile(), pretrain_args(tiny_corpus, out, 2)), env=hosts.env(),
                   timeout=600)
    print(f"2 nodes x 1 rank over ssh: {time.time() - start:.0f} s")
    assert proc.returncode == 0, tail(proc)
    for address in hosts.addr:  # pdsh prefixes each host's lines with its name
        assert f"{address}: " in proc.stdout, (address, tail(proc))
    manifest = json.loads((out / "manifest.json").read_text())
    want = json.loads((one_node / "manifest.json").read_text())
    assert manifest["config"]["engine"]["world_size"] == 2
    digests = manifest["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    got, ref = losses(out), losses(one_node)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(ref, rel=1e-6)
    assert manifest["val"]["val_ppl"] == pytest.approx(want["val"]["val_ppl"], rel=1e-6)
    import transformers

    model = transformers.AutoModelForMaskedLM.from_pretrained(out / "export")
    assert model.config.vocab_size == 300


def test_a_lost_node_ends_the_launcher_in_the_documented_bound_and_the_survivor_resumes(hosts, one_node,
                                                                                        tiny_corpus, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_corpus, out, 2, "--dist-timeout-minutes", str(DIST_TIMEOUT_MINUTES))
    proc = subprocess.Popen(over_ssh(hosts, hosts.hostfile(), args), cwd=ROOT, env=hosts.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    try:
        deadline = time.time() + 600  # a run waits while another compiles the CPU op (minutes when loaded)
        while not latest.is_file():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.02)
        hosts.cut(1)
        cut_at = time.time()
        code = proc.wait(timeout=300)
        took = time.time() - cut_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        hosts.restore(1)  # the next test of the module uses both hosts
    interval, count = 2, 3  # hosts.keepalive
    bound = DIST_TIMEOUT_MINUTES * 60 + interval * count + 30
    print(f"launcher exit {code} {took:.0f} s after the cut (bound {bound:.0f} s)")
    assert code != 0 and took < bound, (code, took)
    assert not (out / "manifest.json").exists()
    saved = int(latest.read_text().strip()[len("step"):])
    resume = pretrain_args(tiny_corpus, out, 1, "--resume")  # 1 rank x accumulation 2: the same global batch
    proc = run_cmd(hosts.in_ns(0, *deepspeed_cmd(resume[0], resume[1:], num_ranks=1)), env=hosts.env(),
                   timeout=600)
    assert proc.returncode == 0, tail(proc)
    got, want = losses(out), losses(one_node)
    for step in range(saved + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def check(hosts, hostfile: Path, *args: str, env_file_text: str | None = None) -> subprocess.CompletedProcess:
    env = hosts.env()
    if env_file_text is not None:
        env_file = hosts.root / "check_env"
        env_file.write_text(env_file_text)
        env["DS_ENV_FILE"] = str(env_file)
    proc = run_cmd(hosts.in_ns(0, sys.executable, "-m", "ds_kd.cli.multinode", "check", "--hostfile", str(hostfile),
                               "--min-free-gb", "0.1", *args), env=env)
    print(proc.stdout)
    return proc


def report(proc: subprocess.CompletedProcess) -> dict[tuple[str, str], str]:
    """(host, item) -> "ok"/"FAIL" from the check's lines."""
    rows = [(line[:22].strip(), line[23:39].strip(), line[40:45].strip()) for line in proc.stdout.splitlines()]
    return {(host, item): status for host, item, status in rows if status in ("ok", "FAIL")}


def test_the_preflight_check_is_green_on_the_two_hosts_and_names_host_and_item_when_red(hosts, tiny_corpus,
                                                                                         tmp_path):
    green = check(hosts, hosts.hostfile(), "--out", str(tmp_path / "runs" / "a"), "--data", str(tiny_corpus))
    assert green.returncode == 0, green.stdout + green.stderr
    items = report(green)
    assert set(items.values()) == {"ok"}
    for host in hosts.addr:
        assert {"repository", "commit", "packages", f"interface {multinode_hosts.IFNAME}", "shared out",
                "shared data", "free disk"} <= {item for h, item in items if h == host}
    assert (hosts.addr[0], "master port") in items

    red = check(hosts, hosts.hostfile(hosts.addr[0], hosts.alt_addr), "--out", str(hosts.root / "unshared"),
                env_file_text="GLOO_SOCKET_IFNAME=eth9\n\nOMP_NUM_THREADS=1\n")
    assert red.returncode == 1, red.stdout + red.stderr
    items = report(red)
    a, b = hosts.addr[0], hosts.alt_addr
    assert items[(b, "commit")] == "FAIL" and items[(a, "commit")] == "ok"
    assert items[(b, "shared out")] == "FAIL" and items[(a, "shared out")] == "ok"
    assert items[(a, "interface eth9")] == items[(b, "interface eth9")] == "FAIL"
    assert items[("launcher", ".deepspeed_env")] == "FAIL" and "check_env:2: blank line" in red.stdout
