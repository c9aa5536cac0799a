"""``python -m ds_kd.cli.multinode check`` without ssh: hosts are probed at once (a fake transport stands for ssh,
``run_check``'s transport argument), each host's lines come as it answers, and a bad --hostfile is named. The
check against real hosts over ssh is in tests/train/test_multinode.py."""
from __future__ import annotations

import subprocess
import threading
import time

from ds_kd.cli import multinode

TIMEOUT = 1.0
"""What a dead host costs the fake transport: ssh's ConnectTimeout."""


def fake_ssh(delays: dict[str, float], calls: list):
    """A transport where every host is dead: it answers as ssh does after ``delays[host]`` seconds."""
    def run(host: str, argv: list[str], stdin: str) -> subprocess.CompletedProcess:
        start = time.monotonic()
        time.sleep(delays[host])
        calls.append((host, start, time.monotonic(), threading.get_ident()))
        return subprocess.CompletedProcess(argv, 255, "", f"ssh: connect to host {host} port 22: Connection timed out\n")
    return run


def test_dead_hosts_are_probed_at_once_and_each_is_reported_as_it_answers(tmp_path):
    calls, answered = [], []
    hosts = ["node-a", "node-b", "node-c"]
    delays = {"node-a": TIMEOUT, "node-b": TIMEOUT, "node-c": 0.1}
    items = multinode.run_check(hosts, {"out": tmp_path}, 29500, fake_ssh(delays, calls), environ={},
                                on_items=lambda lines: answered.append([i.host for i in lines]))
    starts, ends = [c[1] for c in calls], [c[2] for c in calls]
    assert max(starts) < min(ends)  # every host was asked before any answered
    assert max(ends) - min(starts) < 1.5 * TIMEOUT  # about one timeout for two dead hosts, not two
    assert len({c[3] for c in calls}) == 3
    # the launcher's lines first, then each host as it answers: the quick one before the dead ones
    assert answered[0] == ["launcher"] * len(answered[0]) and answered[1] == ["node-c"]
    assert sorted(h for lines in answered[2:] for h in lines) == ["node-a", "node-b"]
    # the report keeps the hostfile's order; a dead host is one FAIL line naming ssh's reason
    host_items = [i for i in items if i.host != "launcher"]
    assert [(i.host, i.item, i.ok) for i in host_items] == [(h, "ssh + python", False) for h in hosts]
    assert "Connection timed out" in host_items[0].detail
    assert not list(tmp_path.glob(".ds_kd_check_*"))  # the shared-storage tokens are removed


def test_a_host_that_never_answers_is_a_fail_line_not_a_traceback(tmp_path):
    def hangs(host, argv, stdin):
        raise subprocess.TimeoutExpired(["ssh", host], 70)

    items = multinode.run_check(["node-a"], {}, 29500, hangs, environ={})
    assert [(i.host, i.ok) for i in items if i.host != "launcher"] == [("node-a", False)]
    assert "no answer within 70 s" in items[-1].detail


def test_ssh_gets_a_bounded_connect_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(multinode.subprocess, "run",
                        lambda cmd, **kw: seen.update(cmd=cmd, **kw) or subprocess.CompletedProcess(cmd, 0))
    multinode.ssh_transport(2222, connect_timeout=3)("node-a", ["python", "-"], "")
    assert "ConnectTimeout=3" in seen["cmd"] and "BatchMode=yes" in seen["cmd"] and seen["cmd"][-2] == "node-a"
    assert seen["timeout"] == 3 + multinode.PROBE_SECONDS


def test_a_directory_given_as_hostfile_is_named_as_one(tmp_path, capsys):
    assert multinode.main(["check", "--hostfile", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--hostfile {tmp_path}: is a directory, not a hostfile" in err and "no such file" not in err
    assert multinode.main(["check", "--hostfile", str(tmp_path / "hostfile")]) == 2
    assert f"--hostfile {tmp_path / 'hostfile'}: no such file" in capsys.readouterr().err
    (tmp_path / "hostfile").write_text("node-a slots=1\n")
    assert multinode.main(["check", "--hostfile", str(tmp_path / "hostfile"), "--connect-timeout", "0"]) == 2
    assert "--connect-timeout must be at least 1" in capsys.readouterr().err


def test_the_command_prints_each_line_once_and_the_tally(tmp_path, capsys, monkeypatch):
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    seen = {}
    monkeypatch.setattr(multinode, "ssh_transport", lambda port, timeout: seen.update(timeout=timeout) or
                        fake_ssh({"node-a": 0.2, "node-b": 0.0}, []))
    monkeypatch.setattr(multinode.os, "environ", {"PDSH_SSH_ARGS_APPEND": multinode.KEEPALIVE})
    assert multinode.main(["check", "--hostfile", str(tmp_path / "hostfile"), "--connect-timeout", "4"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("node-")] == ["node-b", "node-a"]  # as answered
    failed = [line for line in lines[:-1] if line[40:45].strip() == "FAIL"]
    assert len([line for line in failed if line.startswith("node-")]) == 2
    assert lines[-1] == f"{len(failed)} of {len(lines) - 1} checks failed"
    assert seen["timeout"] == 4 and "ConnectTimeout 4 s" in err
