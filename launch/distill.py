"""Online distillation of a frozen teacher into a LeanBERT student, both in one DeepSpeed engine.

    deepspeed launch/distill.py --deepspeed_config ds_configs/zero3.json --teacher <teacher dir> \\
        --student leanbert --data <corpus dir> --out <run dir> --epochs 4
    deepspeed launch/distill.py ... --teacher <teacher dir> --init-from <teacher dir> --init-layers 3 6 9 12
        # DistilBERT's start: a 4-layer student of the teacher's width from its embeddings and layers 3 6 9 12

    deepspeed launch/distill.py ... --recipe bistil --teacher <pair-trimmed teacher> --data <pair corpus>
        # BiStil's phase 1: half the teacher's layers, SVD embeddings, 50/50 monolingual batches, hidden-state
        # and attention-probability MSE (every setting of the recipe stays a flag: a flag given wins)

Loss = MLM + output (soft cross-entropy at masked positions) + embedding, hidden-state and attention-score MSE
(TinyBERT), each with its weight; a zero weight skips the term.
"""
import argparse
import sys


from ds_kd.cli import add_train_args, main_guard, setup_logging, train_kwargs
from ds_kd.cli.flags import HelpFormatter
from ds_kd.models.config import PRESETS
from ds_kd.models.warmstart import FROM_INIT, FROM_TEACHER


RECIPES = {
    "tinybert": {},
    "bistil": {"mlm_weight": 0.0, "output_weight": 0.0, "embedding_weight": 0.0, "hidden_weight": 1.0,
               "attention_weight": 1.0, "layer_reduction": "mean", "attention_target": "probabilities",
               "embeddings_in_hidden": True, "depth_divisor": 2, "student_dropout": 0.0, "embedding_init": "svd",
               "projection": "fixed", "lang_mix": "balanced", "packing": "off"},
}
"""The defaults each ``--recipe`` sets (flags given on the command line win)."""


def recipe_flags(recipe: str) -> str:
    """The flags ``recipe`` sets, as a command line would give them."""
    def flag(name: str, value) -> str:
        name = "--" + name.replace("_", "-")
        return name if value is True else f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"

    return " ".join(flag(k, v) for k, v in RECIPES[recipe].items())


def build_parser(recipe: str = "tinybert") -> argparse.ArgumentParser:
    """The command line, with ``recipe``'s defaults (:data:`RECIPES`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="tinybert",
                   help="a preset of the flags below: tinybert (the paper's first stage; default) or bistil "
                        f"(BiStil's bilingual phase 1: {recipe_flags('bistil')})")
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
    g.add_argument("--depth-divisor", type=int, default=3,
                   help=f"{FROM_TEACHER}: the student gets the teacher's layers divided by this, at least 1 "
                        f"(default 3: 12 -> 4; bistil 2: 12 -> 6)")
    g.add_argument("--student-dropout", type=float, default=None,
                   help="the student's dropout, hidden and attention (default: its shape's; bistil 0)")
    g.add_argument("--embedding-init", choices=["default", "svd"], default="default",
                   help="the student's word embeddings: default (random, or copied with --init-from) or svd (the "
                        "teacher's first left singular vectors; bistil)")
    g.add_argument("--projection", choices=["learned", "fixed"], default="learned",
                   help="where student and teacher widths differ: learned student-side projections (TinyBERT; "
                        "default) or a fixed SVD projection of the teacher's states, computed once from held-out "
                        "states and kept in the run (bistil)")
    g.add_argument("--projection-sentences", type=int, default=1024,
                   help="validation sentences whose teacher states give the fixed projection (default 1024)")
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
                        "the paper; default) or their mean (each weighs 1/L_student as much; bistil)")
    g.add_argument("--attention-target", choices=["scores", "probabilities"], default="scores",
                   help="the attention term compares pre-softmax scores (TinyBERT; default) or probabilities over "
                        "the real keys (bistil; needs --packing off)")
    g.add_argument("--embeddings-in-hidden", action=argparse.BooleanOptionalAction, default=False,
                   help="count the embeddings as one more layer of the hidden-state term (bistil; needs "
                        "--embedding-weight 0) (default: off)")
    add_train_args(p)
    p.set_defaults(**RECIPES[recipe])
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with the defaults of its ``--recipe``."""
    recipe = build_parser().parse_known_args(argv)[0].recipe
    return build_parser(recipe).parse_args(argv)


def main() -> int:
    args = parse_args()
    setup_logging()
    from ds_kd.distill.module import DistillConfig
    from ds_kd.distill.run import DistillRunConfig, run

    def go():
        losses = DistillConfig(args.mlm_weight, args.output_weight, args.embedding_weight, args.hidden_weight,
                               args.attention_weight, args.temperature, args.layer_map, args.layer_reduction,
                               args.attention_target, args.embeddings_in_hidden)
        run(DistillRunConfig(teacher=args.teacher, student=args.student, teacher_dtype=args.teacher_dtype,
                             losses=losses, depth_divisor=args.depth_divisor, student_dropout=args.student_dropout,
                             embedding_init=args.embedding_init, projection=args.projection,
                             projection_sentences=args.projection_sentences, **train_kwargs(args)))

    return main_guard(go)


if __name__ == "__main__":
    sys.exit(main())
