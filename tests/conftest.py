"""Shared fixtures: a tiny generated corpus, and running scripts through the real ``deepspeed`` launcher."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"  # tests never log to W&B (inherited by the launched ranks)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY_SIZES = {"en": 400, "fr": 200, "hi": 60}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(script: str, args: list[str], num_ranks: int = 2) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(num_ranks), "--master_port", str(free_port()), str(ROOT / script), *args]


PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Set in this process by in-process runs (a group of one): a child that inherited them would join that group's
address instead of making its own."""


def run_cmd(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a command from the repository root, without this process's process-group variables; its output is
    kept for the assertion messages."""
    env = {k: v for k, v in kw.pop("env", os.environ).items() if k not in PROCESS_GROUP_ENV}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


def run_until_checkpoint(cmd: list[str], run_dir: Path, step: int, timeout: float = 240, env: dict | None = None) -> int:
    """Start ``cmd`` (with ``env``) and ``kill -9`` the launcher and every rank as soon as a checkpoint of optimizer
    step ``step`` or later is complete; returns the step of that checkpoint."""
    import os
    import signal
    import time

    env = {k: v for k, v in (os.environ if env is None else env).items() if k not in PROCESS_GROUP_ENV}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    saved = 0
    while time.time() < deadline and saved < step:
        assert proc.poll() is None, f"the run ended before a checkpoint of step {step}"
        time.sleep(0.05)
        saved = int(latest.read_text().strip()[len("step"):]) if latest.is_file() else 0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "manifest.json").exists()
    return saved


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread is many times faster for tiny models than two contending."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name: str):
    """A script of launch/ (or of benchmarks/ for a ``bench_*`` name) as a module: they are run by path, not
    imported as a package."""
    import importlib.util

    folder = "benchmarks" if name.startswith("bench_") else "launch"
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of a script resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A three-language corpus of generated text: BPE of 300 tokens, several train shards and a val shard."""
    from data_prep.bpe import BpeConfig
    from data_prep.corpus import CorpusConfig, run
    from data_prep.read import ReadConfig
    from data_prep.sample import SampleConfig
    from data_prep.shard import ShardConfig
    from data_prep.textgen import write_raw

    root = tmp_path_factory.mktemp("tiny_corpus")
    write_raw(root / "raw", TINY_SIZES, seed=5)
    run(CorpusConfig(raw=root / "raw", out=root / "corpus", langs=tuple(TINY_SIZES), read=ReadConfig(),
                     sample=SampleConfig(total=2400, seed=1, val_per_lang=24, bucket_mb=1),
                     bpe=BpeConfig(vocab_size=300),
                     shard=ShardConfig(block_size=100, shard_mb=0.02, num_workers=1, batch_size=64)))
    return root / "corpus"


LAUNCHER_CALLS = ("deepspeed_cmd", "run_until_checkpoint", "DEEPSPEED")
"""The helpers above that start ranks through the real ``deepspeed`` launcher, and its path itself."""


def _launcher_helpers(module) -> set[str]:
    """Names of the module's functions that reach a launcher call, directly or through one another."""
    import inspect

    sources = {name: inspect.getsource(fn) for name, fn in vars(module).items()
               if inspect.isfunction(fn) and getattr(fn, "__module__", None) == module.__name__}
    found = set(LAUNCHER_CALLS)
    while True:
        more = {name for name, src in sources.items() if name not in found and any(f in src for f in found)}
        if not more:
            return found
        found |= more


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs the ``deepspeed`` launcher (itself, through a helper, or through one of its
    fixtures) ``slow``, so that ``make test-fast`` (``-m "not slow"``) runs the rest; nobody has to remember the
    mark when writing such a test."""
    import inspect

    helpers: dict[str, set[str]] = {}
    for item in items:
        module = item.module
        names = helpers.setdefault(module.__name__, _launcher_helpers(module))
        funcs = [item.function] + [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()]
        for fn in funcs:
            fn_module = sys.modules.get(getattr(fn, "__module__", ""), module)
            known = names | helpers.setdefault(fn_module.__name__, _launcher_helpers(fn_module))
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if any(name in src for name in known):
                item.add_marker(pytest.mark.slow)
                break
