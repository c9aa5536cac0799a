"""A ``tokenizers`` Unigram tokenizer (XLM-R / SentencePiece style) from pieces, scores and a normalisation map.

The normalisation map (codepoint -> replacement codepoints, e.g. NFKC forms, control characters deleted,
odd spaces made plain) becomes a ``normalizers.Precompiled`` charsmap, the form in which SentencePiece models
and Hugging Face XLM-R tokenizers carry theirs: a little-endian ``u32`` byte size, a double-array trie over
the UTF-8 keys (the darts-clone layout that ``tokenizers`` reads), then the replacement strings, each ending
in a zero byte. The pipeline is the one of XLM-R's ``tokenizer.json``: charsmap, runs of spaces collapsed to
one, ``▁`` for spaces and in front of the text, Unigram (Viterbi over the piece log-probabilities; an
uncovered character is ``<unk>`` at the lowest score minus 10), ``<s> ... </s>`` around every encoding.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

TOKENIZER_FILE = "tokenizer.json"
# XLM-R's special tokens and their roles; <mask> comes last in the vocabulary.
XLMR_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                 "mask_token": "<mask>"}

_LEAF, _VALUE = 1 << 8, 1 << 31
_MAX_OFFSET = 1 << 21  # offsets below this are stored directly (no 256-multiple encoding needed)


def _trie(keys: dict[bytes, int]) -> dict:
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value  # the value of the key ending here
    return root


def _double_array(keys: dict[bytes, int]) -> list[int]:
    """darts-clone double array of ``keys`` (byte string -> value < 2**31), as ``tokenizers`` searches it.

    Unit of a node: its label (the byte leading to it) in bits 0-7, a leaf flag in bit 8 and, from bit 10,
    the XOR offset from its own position to the base of its children; the child by byte c lives at
    ``base ^ c`` and a key's value at ``base`` itself (bit 31 set, so no label ever matches it). Every node
    gets its own base, so no lookup can land on another node's child with the same label.
    """
    units = [0] * 256
    used = [True] + [False] * 255  # slot 0 is the root
    bases_taken: set[int] = set()
    first_free = 1
    queue = deque([(0, _trie(keys))])
    while queue:
        position, node = queue.popleft()
        labels = sorted(k for k in node if k is not None)
        wanted = ([0] if None in node else []) + labels
        while used[first_free]:
            first_free += 1
        slot = first_free
        while True:  # the first base whose slots are all free
            base = slot ^ wanted[0]
            if base not in bases_taken and all(base ^ c >= len(used) or not used[base ^ c] for c in wanted):
                break
            slot += 1
            while slot < len(used) and used[slot]:
                slot += 1
        while base | 0xFF >= len(used):  # whole 256-blocks, so base ^ c is always inside the array
            units += [0] * 256
            used += [False] * 256
        offset = position ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("normalisation map too large for a direct-offset double array")
        bases_taken.add(base)
        units[position] = (units[position] & 0xFF) | (offset << 10) | (_LEAF if None in node else 0)
        if None in node:
            used[base] = True
            units[base] = node[None] | _VALUE
        for c in labels:
            used[base ^ c] = True
            units[base ^ c] = c
            queue.append((base ^ c, node[c]))
    return units


def precompiled_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """The ``normalizers.Precompiled`` bytes that map each codepoint of ``norm_map`` to its replacement."""
    blob, where, keys = bytearray(), {}, {}
    for codepoint, replacement in sorted(norm_map.items()):
        text = "".join(map(chr, replacement)).encode("utf-8")
        if text not in where:
            where[text] = len(blob)
            blob += text + b"\0"
        keys[chr(codepoint).encode("utf-8", "surrogatepass")] = where[text]
    units = _double_array(keys)
    trie = b"".join(u.to_bytes(4, "little") for u in units)
    return len(trie).to_bytes(4, "little") + trie + bytes(blob)


def build_unigram_tokenizer(pieces: list[str], scores: list[float], unk_id: int,
                            norm_map: dict[int, tuple[int, ...]], specials: dict[str, str] = XLMR_SPECIALS,
                            ) -> Tokenizer:
    """An XLM-R-style Unigram tokenizer over ``pieces`` (id order) with ``specials`` as added tokens.

    ``specials`` maps the roles bos/eos/... to their pieces, which must be in ``pieces``; ``<s> $A </s>`` is
    put around a sequence, ``<s> $A </s> </s> $B </s>`` around a pair (RoBERTa)."""
    missing = [t for t in specials.values() if t not in pieces]
    if missing:
        raise ValueError(f"special tokens {missing} are not among the pieces")
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk_id,
                                   byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(precompiled_charsmap(norm_map)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    bos, eos = specials["bos_token"], specials["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B:1 {eos}:1",
        special_tokens=[(bos, pieces.index(bos)), (eos, pieces.index(eos))])
    return tok


def save_unigram_tokenizer(tok: Tokenizer, out_dir: Path, specials: dict[str, str] = XLMR_SPECIALS,
                           model_max_length: int = 512) -> None:
    """``tokenizer.json`` plus the transformers files, so that ``AutoTokenizer.from_pretrained(out_dir)`` loads it
    (``<s>``/``</s>`` as cls/sep) without sentencepiece. The class written is ``PreTrainedTokenizerFast``, which
    transformers 4 and 5 both know and which takes ``tokenizer.json`` as it is (transformers 5's XLM-R class
    would rebuild the normaliser and pre-tokenizer from the vocabulary)."""
    import json

    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token=specials["bos_token"],
                                   sep_token=specials["eos_token"], model_max_length=model_max_length, **specials)
    fast.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tok.save(str(out_dir / TOKENIZER_FILE))  # the exact object built here
