"""Training-step benchmarks, each run side by side with its baseline in one process.

    python benchmarks/bench_train.py mlm       # our MLM step vs transformers.BertForMaskedLM + AdamW; masked vs dense head
    python benchmarks/bench_train.py distill   # one distillation step vs the ideal (teacher forward + student step)

Timings are medians over interleaved repeats after warm-up; the ratio is what to read.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ds_kd.cli.flags import HelpFormatter  # noqa: E402
from ds_kd.models.model import BertConfig, BertForMaskedLM  # noqa: E402


def make_batch(cfg: BertConfig, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = ids * mask
    chosen = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def time_interleaved(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step function, calls interleaved so drift hits all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step(model, optimizer, loss_of):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_of(model).backward()
        optimizer.step()
    return step


def bench_mlm(args) -> None:
    import transformers

    cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden)
    batch = make_batch(cfg, args.batch, args.seq)
    torch.manual_seed(0)
    ours = BertForMaskedLM(cfg)
    ours.save_pretrained("/tmp/.bench_mlm")
    hf = transformers.AutoModelForMaskedLM.from_pretrained("/tmp/.bench_mlm", attn_implementation="sdpa")
    dense = BertForMaskedLM(cfg)
    dense.load_state_dict(ours.state_dict())
    real = batch["attention_mask"].bool()
    steps = {
        "ours (masked-only head)": training_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4),
                                                 lambda m: m(**batch).loss),
        "ours with a dense head": training_step(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4),
                                                lambda m: m(**batch, predicted=real).loss),
        "transformers BertForMaskedLM": training_step(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4),
                                                      lambda m: m(**batch).loss),
    }
    report(steps, args, tokens=int(batch["attention_mask"].sum()),
           baseline="transformers BertForMaskedLM", shape=cfg)


def bench_distill(args) -> None:
    from ds_kd.distill.module import DistillConfig, Distiller

    def cfg_of(layers, hidden, heads):
        return BertConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=4 * hidden)

    t_cfg = cfg_of(args.layers * 3, args.hidden, args.heads)  # 12 -> 4 layers, as mBERT8 -> mLeanBERT
    s_cfg = cfg_of(args.layers, args.hidden, args.heads)
    batch = make_batch(t_cfg, args.batch, args.seq)
    torch.manual_seed(0)
    teacher, student = BertForMaskedLM(t_cfg).eval(), BertForMaskedLM(s_cfg)
    distiller = Distiller(teacher, student, DistillConfig())
    opt_kd = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-4)
    alone = BertForMaskedLM(s_cfg)
    alone.load_state_dict(student.state_dict())
    opt_alone = torch.optim.AdamW(alone.parameters(), lr=1e-4)

    def ideal():
        with torch.no_grad():
            teacher(**batch)
        training_step(alone, opt_alone, lambda m: m(**batch).loss)()

    steps = {"distillation step": training_step(distiller, opt_kd, lambda m: m(batch).loss),
             "ideal: teacher forward + student step": ideal}
    report(steps, args, tokens=int(batch["attention_mask"].sum()),
           baseline="ideal: teacher forward + student step", shape=(t_cfg, s_cfg))


def report(steps: dict, args, tokens: int, baseline: str, shape) -> None:
    torch.set_num_threads(args.threads)
    times = time_interleaved(steps, args.repeats, args.warmup)
    print(f"shape: {shape}\nbatch {args.batch} x seq {args.seq} ({tokens} real tokens), {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'step':40s} {'ms/step':>10s} {'tokens/s':>10s} {'vs ' + baseline[:24]:>28s}")
    for name, seconds in times.items():
        print(f"{name:40s} {seconds * 1e3:10.1f} {tokens / seconds:10.0f} {seconds / times[baseline]:28.3f}x time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("which", choices=["mlm", "distill"], help="which benchmark")
    p.add_argument("--vocab", type=int, default=120000, help="vocabulary (default: the paper's 120k)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width")
    p.add_argument("--layers", type=int, default=4, help="layers (the distillation teacher gets 3x)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="sequence length (padded; real lengths vary)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats of each step")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: as many as torch chooses")
    return p


def main() -> int:
    args = build_parser().parse_args()
    args.threads = args.threads or torch.get_num_threads()
    (bench_mlm if args.which == "mlm" else bench_distill)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
