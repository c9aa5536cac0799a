"""One optimizer step on 8 fixed sentences, split into micro-batches and ranks as the DeepSpeed JSON says.

    python tests/scripts/accumulation_probe.py OUT MICRO ACCUMULATION            (one rank)
    deepspeed --num_gpus 2 tests/scripts/accumulation_probe.py OUT MICRO ACCUMULATION

Runs ``ds_kd.train.loop.train`` for one step of MLM pretraining and one of distillation (fp32, ZeRO-2, plain SGD at
lr 1, no clipping, no dropout), and writes the step's loss and the updated weights (rank 0) to
OUT/<mode>.pt: the update is minus the gradient, so equal weights mean equal gradients.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

VOCAB, NUM_SENTENCES = 60, 8


def sentences() -> dict[str, torch.Tensor]:
    """8 sentences of 5..30 tokens, padded; masked counts differ per sentence (1 to 9)."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 30, 9, 22, 6, 17, 28, 12]
    ids = torch.zeros(NUM_SENTENCES, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 2, 3
        mask[i, :n] = 1
        picked = torch.randperm(n - 2, generator=g)[: 1 + n // 4] + 1
        labels[i, picked] = ids[i, picked]
        ids[i, picked] = 4
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def models(mode: str):
    from ds_kd.distill import DistillConfig, Distiller
    from ds_kd.models.model import BertForMaskedLM, make_config

    def make(preset, seed):
        torch.manual_seed(seed)
        return BertForMaskedLM(make_config(preset, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0))

    if mode == "mlm":
        return make("tiny-base", 1)
    return Distiller(make("tiny-base", 1), make("tiny-leanbert", 2), DistillConfig())


def step_fn(mode: str):
    from ds_kd.train.pretrain import mlm_step

    if mode == "mlm":
        return mlm_step
    return lambda engine, batch, denominators: (lambda out: (out.loss, out.terms))(engine(batch, denominators))


def rank_batches(batch: dict, micro: int, accumulation: int, rank: int, world: int) -> list[dict]:
    """The global batch in order, cut into world x accumulation micro-batches; this rank's, cut to their length."""
    assert micro * accumulation * world == NUM_SENTENCES
    out = []
    for m in range(accumulation):
        start = (rank * accumulation + m) * micro
        part = {k: v[start:start + micro] for k, v in batch.items()}
        longest = int(part["attention_mask"].sum(1).max())
        out.append({k: v[:, :longest] for k, v in part.items()})
    return out


def main() -> None:
    from ds_kd.train import engine as dist
    from ds_kd.train.engine import apply_overrides, load_ds_config
    from ds_kd.logbook import Logbook, WandbConfig
    from ds_kd.train.loop import LoopConfig, train

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    out, micro, accumulation = Path(args[0]), int(args[1]), int(args[2])
    dist.init_distributed()
    for mode in ("mlm", "distill"):
        model = models(mode)
        params = model.trainable_parameters() if mode == "distill" else model.parameters()
        config = apply_overrides(load_ds_config(Path(__file__).resolve().parents[2] / "ds_configs/zero2.json"), {
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "fp16.enabled": False, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True})
        engine = dist.build_engine(model, config, torch.optim.SGD(params, lr=1.0))
        batches = rank_batches(sentences(), micro, accumulation, dist.rank(), dist.world_size())
        run_dir = out / f"{mode}-{dist.world_size()}x{micro}x{accumulation}"
        run_dir.mkdir(parents=True, exist_ok=True)
        book = Logbook(run_dir, dist.is_main(), WandbConfig(mode="disabled"), {}, 1)
        result = train(engine, iter(batches), step_fn(mode), dict, book, run_dir / "ckpt", LoopConfig(1), 0, dict)
        book.close()
        state = dist.gather_full_state_dict(engine.module)
        if dist.is_main():
            torch.save({"loss": result.losses[0], "state": state}, out / f"{mode}.pt")


if __name__ == "__main__":
    main()
