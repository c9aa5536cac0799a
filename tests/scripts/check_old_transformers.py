"""Load our tokenizer directories with an older transformers in another environment and compare encodings.

The project allows transformers >= 4.44. Make a throw-away environment with the oldest allowed version, then
run this script with the project's interpreter:

    python -m venv /tmp/oldtf && /tmp/oldtf/bin/pip install "transformers==4.44.*" tokenizers
    PYTHONPATH=$PWD python tests/scripts/check_old_transformers.py --python /tmp/oldtf/bin/python

It writes, with the installed (new) versions, a trained BPE tokenizer (``python -m data_prep corpus``'s
``save_tokenizer``) and a copy brought in as an existing tokenizer (``copy_existing``), then loads each with
``AutoTokenizer`` under ``--python`` and checks the class, the special-token ids and the ids of sample texts
against the tokenizer that was trained. Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TEXTS = ["the quick brown fox jumps over the lazy dog", "le renard brun saute par-dessus le chien paresseux",
         "der schnelle braune fuchs", "日本語の文も読める", "numbers 1234 and: punctuation!"]

LOADER = """
import json, sys, transformers, tokenizers
from transformers import AutoTokenizer
out = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "dirs": {}}
for d in sys.argv[2:]:
    t = AutoTokenizer.from_pretrained(d)
    out["dirs"][d] = {"class": type(t).__name__, "ids": [t(x)["input_ids"] for x in json.loads(sys.argv[1])],
                      "special": [t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id]}
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="/tmp/oldtf/bin/python",
                   help="interpreter of the environment with the old transformers (default: %(default)s)")
    args = p.parse_args()
    from data_prep.bpe import BpeConfig, save_tokenizer, train_bpe
    from data_prep.existing_tokenizer import copy_existing

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train.tsv").write_text("".join(f"xx\t{t}\n" for t in TEXTS * 40), encoding="utf-8")
        tok = train_bpe(root / "train.tsv", BpeConfig(vocab_size=150, min_frequency=1))
        save_tokenizer(tok, root / "trained")
        copy_existing(root / "trained", root / "copied")
        dirs = [str(root / "trained"), str(root / "copied")]
        proc = subprocess.run([args.python, "-c", LOADER, json.dumps(TEXTS), *dirs], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        expected = [tok.encode(t).ids for t in TEXTS]
        ok = True
        for d, got in result["dirs"].items():
            good = got["ids"] == expected and got["special"] == [0, 1, 2, 3, 4]
            ok &= good
            print(f"{Path(d).name}: {got['class']} under transformers {result['transformers']} / tokenizers "
                  f"{result['tokenizers']}: {'same ids as the trained tokenizer' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
