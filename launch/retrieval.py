"""Cross-lingual sentence retrieval (XTREME's Tatoeba task) with any number of encoders, no fine-tuning.

    python launch/retrieval.py --models mBERT8=out/demo/runs/mbert8-base/export Vanilla=out/demo/runs/vanilla-leanbert/export \\
        --heldout out/demo/heldout --out out/demo/retrieval

    python launch/retrieval.py --models e5=out/demo/e5_trim student=out/demo/runs/e5-3l-kd/export \\
        --layer-of e5=last student=last --all-layers --heldout out/demo/heldout --out out/demo/retrieval

    python launch/retrieval.py --models mBERT8=DIR --heldout ~/xtreme/download/tatoeba --min-chars 0 \\
        --out out/retrieval-tatoeba

Writes OUT/retrieval.json (X->en and en->X top-1 accuracy per language and model, the pooled layer of each,
and with --all-layers every layer's average) and OUT/retrieval.md.
A model is any HF BERT checkpoint directory holding its tokenizer files (an export of ours or a public one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_kd.cli import checkpoint_dirs, name_value
from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, lang_code
from ds_kd.eval.retrieval import RetrievalConfig, heldout_langs, run


def build_parser() -> argparse.ArgumentParser:
    d = RetrievalConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", type=name_value, help="encoders to evaluate")
    p.add_argument("--heldout", type=Path, required=True,
                   help="aligned text: <dir>/<lang>/help.txt + <dir>/alignment/<lang>.tsv (as `python -m "
                        "data_prep demo_tasks --heldout` writes), line-aligned <dir>/<lang>.txt files (line i of "
                        "each the same sentence), or Tatoeba's <dir>/[tatoeba.]<lang>-<pivot>.{<lang>,<pivot>}")
    p.add_argument("--out", type=Path, required=True, help="folder for retrieval.json and retrieval.md")
    add_list_argument(p, "--langs", default=None, item_type=lang_code,
                      help="languages to retrieve against the pivot, space- or comma-separated: any codes the "
                           "held-out directory holds (default: every language it aligns to the pivot, the paper's "
                           "in its order first)")
    p.add_argument("--layer", default=d.layer, help='hidden layer to mean-pool: "xtreme" (round(2L/3), layer 8 of '
                                                    '12 as XTREME), "last", or a number (0 = embeddings)')
    p.add_argument("--layer-of", nargs="*", default=[], metavar="NAME=LAYER", type=name_value,
                   help="pool model NAME at another layer than --layer (xtreme, last or a number), e.g. a sentence "
                        "encoder such as e5 at its last layer, where it was trained (default: none)")
    p.add_argument("--all-layers", action="store_true",
                   help="also record the X->en average of every layer (the whole encoder runs; default: off)")
    p.add_argument("--max-pairs", type=int, default=d.max_pairs, help="pairs per language at most (default: %(default)s)")
    p.add_argument("--min-chars", type=int, default=d.min_chars, help="shortest text kept (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=d.max_len, help="sub-word tokens per sentence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the pair sample (default: %(default)s)")
    p.add_argument("--pivot", default=d.pivot, type=lang_code, help="language the others are aligned to (default: %(default)s)")
    p.add_argument("--retention", nargs="*", default=[], metavar="STUDENT=TEACHER", type=name_value,
                   help="judge the claim that STUDENT keeps at least 90%% of TEACHER's X->pivot average, under the "
                        "table and in retrieval.json's claims (default: none)")
    p.add_argument("--at-least", nargs="*", default=[], metavar="A=B", type=name_value,
                   help="judge the claim that A retrieves at least as well as B: agree, disagree or cannot tell "
                        "(a difference within two standard errors of the pair sample) (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.heldout.is_dir():
        print(f"error: --heldout {args.heldout}: no such directory (held-out aligned text: `python -m data_prep "
              f"demo_tasks --heldout`, or your own; docs/evaluation.md)", file=sys.stderr)
        return 2
    if args.langs is None:
        args.langs = heldout_langs(args.heldout, args.pivot)
        if not args.langs:
            print(f"error: {args.heldout}: no language aligned to {args.pivot} (alignment/<code>.tsv, <code>.txt "
                  f"beside {args.pivot}.txt, or [tatoeba.]<code>-{args.pivot}.<code>); give --langs or --pivot, or "
                  f"write held-out text with `python -m data_prep demo_tasks --heldout`", file=sys.stderr)
            return 2
    cfg = RetrievalConfig(args.layer, args.max_pairs, args.min_chars, args.max_len, args.batch_size, args.seed,
                          args.pivot, args.all_layers)
    try:
        result = run(checkpoint_dirs(args.models), args.heldout, args.out, args.langs, cfg, dict(args.layer_of),
                     dict(args.retention), dict(args.at_least))
    except (FileNotFoundError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "retrieval.md").read_text(encoding="utf-8"))
    print(f"[retrieval] {result['seconds']:.0f}s -> {args.out / 'retrieval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
