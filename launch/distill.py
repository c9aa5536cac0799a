"""Online distillation of a frozen teacher into a LeanBERT student, both in one DeepSpeed engine.

    deepspeed launch/distill.py --deepspeed_config ds_configs/zero3.json --teacher <teacher dir> \\
        --student leanbert --data <corpus dir> --out <run dir> --epochs 4
    deepspeed launch/distill.py ... --teacher <teacher dir> --init-from <teacher dir> --init-layers 3 6 9 12
        # DistilBERT's start: a 4-layer student of the teacher's width from its embeddings and layers 3 6 9 12

Loss = MLM + output (soft cross-entropy at masked positions) + embedding, hidden-state and attention-score MSE
(TinyBERT), each with its weight; a zero weight skips the term.
"""
import argparse
import sys


from ds_kd.cli import add_train_args, main_guard, setup_logging, train_kwargs
from ds_kd.cli.flags import HelpFormatter
from ds_kd.models.config import PRESETS
from ds_kd.models.warmstart import FROM_INIT, FROM_TEACHER


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True,
                   help="teacher directory: an export of launch/pretrain.py or any HF BERT checkpoint "
                        "(BertForMaskedLM, or BertModel: then the output loss is off) with the shards' tokenizer")
    g.add_argument("--student", default=None, choices=[*sorted(PRESETS), FROM_INIT, FROM_TEACHER],
                   help=f"student preset; {FROM_INIT}: the shape of --init-from with as many layers as "
                        f"--init-layers names; {FROM_TEACHER}: the teacher's width, heads, FFN and positions with a "
                        f"third of its layers, at least 1 (12 -> 4, 6 -> 2) (default: {FROM_TEACHER}; {FROM_INIT} "
                        f"when --init-from is given)")
    g.add_argument("--teacher-dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="teacher precision; auto: fp16 where supported (GPU), else bf16, else fp32 (logged)")
    g = p.add_argument_group("losses")
    for term, what in [("mlm", "MLM cross-entropy on the labels"),
                       ("output", "soft cross-entropy against the teacher's predictions at masked positions"),
                       ("embedding", "MSE of the (projected) embedding outputs"),
                       ("hidden", "MSE of the (projected) hidden states, summed over the layer map"),
                       ("attention", "MSE of the pre-softmax attention scores, summed over the layer map")]:
        g.add_argument(f"--{term}-weight", type=float, default=1.0, help=f"weight of the {what} (0 skips it)")
    g.add_argument("--temperature", type=float, default=1.0, help="temperature of the output loss")
    g.add_argument("--layer-map", type=int, nargs="+", default=None, metavar="L",
                   help="teacher layer (1-based) for each student layer; default: --init-layers when the student "
                        "starts from the teacher's layers, else every L_teacher/L_student-th")
    g.add_argument("--layer-reduction", choices=["sum", "mean"], default="sum",
                   help="combine the hidden-state and attention terms over the layer map by their sum (TinyBERT, "
                        "the paper; default) or their mean (each weighs 1/L_student as much)")
    add_train_args(p)
    return p


def main() -> int:
    args = build_parser().parse_args()
    setup_logging()
    from ds_kd.distill.module import DistillConfig
    from ds_kd.distill.run import DistillRunConfig, run

    def go():
        losses = DistillConfig(args.mlm_weight, args.output_weight, args.embedding_weight, args.hidden_weight,
                               args.attention_weight, args.temperature, args.layer_map, args.layer_reduction)
        run(DistillRunConfig(teacher=args.teacher, student=args.student, teacher_dtype=args.teacher_dtype,
                             losses=losses, **train_kwargs(args)))

    return main_guard(go)


if __name__ == "__main__":
    sys.exit(main())
