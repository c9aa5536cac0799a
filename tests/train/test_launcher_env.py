"""What a rank takes from its launcher before the process group: rank variables of every launcher DeepSpeed offers,
loopback addresses refused on several nodes, ``.deepspeed_env`` lines the launcher cannot read."""
from __future__ import annotations

import os
from unittest import mock

import pytest

from ds_kd.train import engine
from ds_kd.errors import UsageError
from ds_kd.launcher_env import check_node_addresses, launcher_rank, read_deepspeed_env

PROCESS_GROUP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_SIZE", "CROSS_RANK", "DS_KD_ONE_MACHINE", "GLOO_SOCKET_IFNAME")

# rank 3 of 4, local rank 1 of 2, as each launcher states it (no RANK)
LAUNCHERS = {
    "openmpi": {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
    "mvapich": {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "1",
                "MV2_COMM_WORLD_LOCAL_SIZE": "2"},
    "slurm": {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"},
    "mpich/impi (PMI)": {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
}


@pytest.fixture
def clean_env():
    """os.environ without any process-group or launcher variable, restored whole afterwards."""
    with mock.patch.dict(os.environ):
        for name in [*PROCESS_GROUP, *(n for v in LAUNCHERS.values() for n in v)]:
            os.environ.pop(name, None)
        yield os.environ


class Joined(Exception):
    """Raised by the stand-in for deepspeed.init_distributed with the process-group variables it was given."""


def join_group(monkeypatch) -> dict:
    """Run engine.init_distributed up to deepspeed.init_distributed; returns the variables it would join with, or
    raises what init_distributed raised first."""
    import deepspeed

    def joined(**_):
        raise Joined({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT")})

    monkeypatch.setattr(deepspeed, "init_distributed", joined)
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    try:
        engine.init_distributed()
    except Joined as j:
        return j.args[0]
    raise AssertionError("init_distributed returned without joining a group")


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_each_launchers_ranks_join_one_group_of_all_its_ranks(launcher, clean_env, monkeypatch):
    clean_env.update({**LAUNCHERS[launcher], "MASTER_ADDR": "10.0.0.1", "DS_KD_ONE_MACHINE": "1"})
    assert launcher_rank() == "3"  # the log lines' rank, before the group exists
    group = join_group(monkeypatch)
    assert group == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                     "MASTER_PORT": "29500"}  # never a group of one


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_launcher_without_master_addr_is_refused_naming_it_before_any_group(launcher, clean_env, monkeypatch):
    clean_env.update(LAUNCHERS[launcher])
    with pytest.raises(UsageError, match=rf"--launcher {launcher.split()[0]}.*MASTER_ADDR.*\.deepspeed_env"):
        join_group(monkeypatch)
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_a_launcher_with_incomplete_variables_is_refused_naming_what_is_missing(clean_env, monkeypatch):
    clean_env.update({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "10.0.0.1"})  # no MPI_LOCALRANKID
    with pytest.raises(UsageError, match=r"--launcher mpich/impi \(PMI\): this rank has no MPI_LOCALRANKID"):
        join_group(monkeypatch)


def test_rank_set_by_the_deepspeed_launcher_wins_and_a_plain_run_is_a_group_of_one(clean_env, monkeypatch):
    clean_env.update({**LAUNCHERS["slurm"], "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"})  # deepspeed (pdsh) inside an allocation
    assert join_group(monkeypatch)["WORLD_SIZE"] == "2"
    for name in [*LAUNCHERS["slurm"], "RANK", "WORLD_SIZE", "LOCAL_RANK"]:
        os.environ.pop(name)
    os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"] = "0", "4"  # `python ...` in an sbatch script: no step
    assert join_group(monkeypatch)["WORLD_SIZE"] == "1"


INTERFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["192.0.2.2"]}


def check(env: dict, resolved: list[str]) -> None:
    check_node_addresses(env, "gloo", interfaces=lambda: INTERFACES, resolve=lambda _: resolved,
                         hostname=lambda: "vm")


def test_loopback_master_or_advertised_address_on_several_nodes_is_refused_naming_the_fix():
    two_nodes = {"WORLD_SIZE": "2", "LOCAL_SIZE": "1", "CROSS_SIZE": "2"}
    with pytest.raises(UsageError, match=r"MASTER_ADDR=127\.0\.0\.1 .*spans 2 nodes.*--master_addr"):
        check({**two_nodes, "MASTER_ADDR": "127.0.0.1"}, ["192.0.2.2"])
    with pytest.raises(UsageError, match=r"vm resolves to 127\.0\.1\.1.*GLOO_SOCKET_IFNAME=.*eth0 192\.0\.2\.2"):
        check({**two_nodes, "MASTER_ADDR": "192.0.2.2"}, ["127.0.1.1", "192.0.2.2"])
    with pytest.raises(UsageError, match=r"GLOO_SOCKET_IFNAME=eth1: eth1 is not an interface"):
        check({**two_nodes, "MASTER_ADDR": "192.0.2.2", "GLOO_SOCKET_IFNAME": "eth1"}, ["192.0.2.2"])
    with pytest.raises(UsageError, match=r"GLOO_SOCKET_IFNAME=lo: lo is not an interface with a non-loopback"):
        check({**two_nodes, "MASTER_ADDR": "192.0.2.2", "GLOO_SOCKET_IFNAME": "lo"}, ["192.0.2.2"])
    # passes: the interface is named, the host name resolves elsewhere, one node, or all "nodes" on one machine
    check({**two_nodes, "MASTER_ADDR": "192.0.2.2", "GLOO_SOCKET_IFNAME": "eth0"}, ["127.0.1.1"])
    check({**two_nodes, "MASTER_ADDR": "192.0.2.2"}, ["192.0.2.2"])
    check({"WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, ["127.0.1.1"])
    check({**two_nodes, "MASTER_ADDR": "127.0.0.1", "DS_KD_ONE_MACHINE": "1"}, ["127.0.1.1"])
    # the openmpi/slurm variables count nodes from the ranks per node
    with pytest.raises(UsageError, match="spans 2 nodes"):
        check({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}, ["192.0.2.2"])


def test_deepspeed_env_lines_the_launcher_cannot_read_are_named_by_line(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("GLOO_SOCKET_IFNAME=eth0\n\n# W&B\nWANDB_API_KEY=abc=def\nOMP_NUM_THREADS 4\n")
    lines = read_deepspeed_env([path])
    assert [(ln.number, ln.name, ln.value, ln.problem) for ln in lines] == [
        (1, "GLOO_SOCKET_IFNAME", "eth0", None), (2, "", "", "blank line"), (3, "# W&B", "", "comment"),
        (4, "WANDB_API_KEY", "abc=def", None), (5, "OMP_NUM_THREADS 4", "", "no NAME=value")]


def test_the_preflight_check_fails_a_launching_shell_without_keepalives_or_with_a_bad_env_file(tmp_path):
    from ds_kd.cli.multinode import KEEPALIVE, launcher_items

    path = tmp_path / ".deepspeed_env"
    path.write_text("OMP_NUM_THREADS=4\n# a comment\n")
    items = {i.item: i for i in launcher_items({}, read_deepspeed_env([path]))}
    assert not items["keepalive"].ok and f'PDSH_SSH_ARGS_APPEND="{KEEPALIVE}"' in items["keepalive"].detail
    assert not items[".deepspeed_env"].ok and f"{path}:2: comment" in items[".deepspeed_env"].detail
    items = {i.item: i for i in launcher_items({"PDSH_SSH_ARGS_APPEND": KEEPALIVE}, [])}
    assert items["keepalive"].ok and ".deepspeed_env" not in items
