"""Per-token losses are means over the whole global batch, however it is split into micro-batches and ranks.

One optimizer step of MLM pretraining and of distillation on 8 fixed sentences of different lengths and
masked counts, through ``ds_kd.train.loop.train`` and a real DeepSpeed engine (fp32, ZeRO-2, SGD at lr 1, so the
update is minus the gradient): micro batch 8 x accumulation 1, 4 x 2 and 2 ranks x 4 (through the launcher)
give the loss and the gradient of the whole batch computed in one piece.
"""
from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import ROOT, deepspeed_cmd, run_cmd, tail

PROBE = "tests/scripts/accumulation_probe.py"
SPLITS = {"8 x 1": (1, 8, 1), "4 x 2": (1, 4, 2), "2 ranks x 4": (2, 4, 1)}


def probe():
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    import accumulation_probe

    return accumulation_probe


def reference(mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The step computed in one piece: the loss of all 8 sentences and the weights after w - grad."""
    p = probe()
    model = p.models(mode)
    batch = p.sentences()
    loss = model(batch).loss if mode == "distill" else model(batch["input_ids"], batch["attention_mask"],
                                                                 labels=batch["labels"]).loss
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= param.grad
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    results = {}
    for name, (ranks, micro, accumulation) in SPLITS.items():
        out = tmp_path_factory.mktemp("probe")
        args = [str(out), str(micro), str(accumulation)]
        cmd = deepspeed_cmd(PROBE, args, ranks) if ranks > 1 else [sys.executable, PROBE, *args]
        proc = run_cmd(cmd)
        assert proc.returncode == 0, tail(proc)
        results[name] = {mode: torch.load(out / f"{mode}.pt", weights_only=False) for mode in ("mlm", "distill")}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mlm", "distill"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_every_split_gives_the_loss_and_gradient_of_the_whole_batch(probes, mode, split):
    want_loss, want_state = reference(mode)
    got = probes[split][mode]
    assert got["loss"] == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    state = got["state"]
    prefix = "student." if mode == "distill" else ""
    compared = 0
    for name, want in want_state.items():
        if name.startswith("teacher.") or (prefix + name.removeprefix(prefix)) not in state:
            continue
        compared += 1
        assert torch.allclose(state[name], want, rtol=1e-5, atol=1e-6), (split, name,
                                                                           (state[name] - want).abs().max())
    assert compared > 20
