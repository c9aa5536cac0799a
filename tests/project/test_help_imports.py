"""Every command's ``--help`` answers without importing torch, DeepSpeed or transformers (each takes seconds to
import, more on a busy machine): they are imported inside the functions that need them, after the command line
is parsed. Wall time is too noisy on a shared machine to assert; which modules were imported is not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "transformers")
PROBE = """
import json, runpy, sys, time
start = time.perf_counter()
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args, "--help"]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = None
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules],
                  "seconds": time.perf_counter() - start}), file=sys.stderr)
""" % (HEAVY,)
COMMAND_LINES = ([[str(p.relative_to(ROOT))] for p in sorted((ROOT / "launch").glob("*.py"))]
                 + [["data_prep", name] for name in COMMANDS] + [["data_prep"]]
                 + [["ds_kd.cli.multinode", "check"], ["ds_kd.multinode", "check"]])  # the latter an alias


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    """Each command's ``--help`` in its own interpreter, all started at once."""
    procs = {" ".join(c): subprocess.Popen([sys.executable, "-c", PROBE, *c], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True) for c in COMMAND_LINES}
    found = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        found[name] = {**json.loads(err.strip().splitlines()[-1]), "out": out}
    return found


def test_every_launch_script_and_data_prep_command_is_probed():
    assert {"launch/pretrain.py", "launch/distill.py", "launch/finetune.py", "launch/grid.py"} <= {
        c[0] for c in COMMAND_LINES} and ["data_prep", "tasks"] in COMMAND_LINES


@pytest.mark.parametrize("command", [" ".join(c) for c in COMMAND_LINES])
def test_help_imports_no_torch_deepspeed_or_transformers(probes, command):
    probe = probes[command]
    assert probe["code"] == 0 and "usage:" in probe["out"], probe
    assert probe["heavy"] == [], f"{command} --help imported {probe['heavy']} ({probe['seconds']:.2f}s)"
