"""The default corpus: LibreOffice's help pages in the eight languages (or any language Debian packages), from
Debian's packages.

``libreoffice-help-<lang>`` packages hold the same help pages in every language, with the same paragraph
ids in the same files, so paragraphs align across languages. They are fetched with ``apt-get download``
(no installation, no dependencies), unpacked with ``dpkg-deb -x`` into a cache directory, and their
paragraphs written as a raw directory for ``python -m data_prep corpus --raw``. Language code ``en`` fetches
``libreoffice-help-en-us`` (the help's source text); any other code the package of that name (``fi``,
``pt-br`` or ``pt_br``, ``zh-cn``); which exist is read from the package lists (``apt-cache pkgnames``)::

    <raw>/<lang>/help.txt         one paragraph per line
    <raw>/alignment/<lang>.tsv    line i: "<page path><TAB><paragraph id>" of line i of <lang>/help.txt
    <raw>/manifest.json           package versions and paragraph counts (written last; a re-run skips)

Pages a translation team has not translated hold the English text; a paragraph identical to the English
one with the same key is dropped from the other languages (counted as ``untranslated``), so the Hindi text
is Hindi. The text is third-party (LibreOffice, MPL-2.0) and stays in the cache and output directories.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, lang_code
from ds_kd.manifest import has_manifest, read_manifest, write_manifest
from ds_kd.schema import LANGS, check_langs
from ds_kd.textfile import read_text

PACKAGE_PREFIX = "libreoffice-help-"
ENGLISH_PACKAGE = "en-us"
"""Code ``en`` fetches US English, the help's source text (``en-gb`` is a translation like any other)."""
HELP_ROOT = Path("usr/share/libreoffice/help")
PARAGRAPH_ID = re.compile(r"^(par|hd)_id")
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
LOCAL_TEXT_HINT = (
    "Point the corpus command at a local directory of text instead: put one directory per language code "
    "holding .txt/.gz/.bz2/.xz files (one sentence or paragraph per line) or WikiExtractor output, e.g. "
    "DIR/en/wiki.txt.gz, DIR/hi/wiki.txt.gz, and run: python -m data_prep corpus --raw DIR --out OUT "
    "--langs en,hi,...")


class ParagraphParser(HTMLParser):
    """Collects the text of elements whose id is a help paragraph id (par_id..., hd_id...).

    Text inside ``hidden`` elements (platform variants such as the macOS menu names) is left out.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, hidden) of open non-void elements
        self.current: tuple[str, int, list[str]] | None = None  # (id, stack depth, text parts)

    def handle_starttag(self, tag, attrs):
        if tag in VOID_TAGS:
            if tag == "br" and self.current is not None:
                self.current[2].append(" ")  # a line break separates words and sentences
            return
        attrs = dict(attrs)
        self.stack.append((tag, "hidden" in attrs))
        if self.current is None and PARAGRAPH_ID.match(attrs.get("id") or ""):
            self.current = (attrs["id"], len(self.stack), [])

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            if self.current is not None and len(self.stack) == self.current[1]:
                self.paragraphs.append((self.current[0], " ".join("".join(self.current[2]).split())))
                self.current = None
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.current is not None and not any(hidden for _, hidden in self.stack):
            self.current[2].append(data)


def parse_page(path: Path) -> list[tuple[str, str]]:
    """(paragraph id, text) of one help page, first occurrence of each id, empty texts left out."""
    parser = ParagraphParser()
    parser.feed(read_text(path, errors="replace"))
    seen, out = set(), []
    for pid, text in parser.paragraphs:
        if text and pid not in seen:
            seen.add(pid)
            out.append((pid, text))
    return out


def parse_language(help_dir: Path) -> dict[tuple[str, str], str]:
    """{(page path relative to the language's help dir, paragraph id): text} in page order."""
    paragraphs = {}
    for page in sorted(help_dir.rglob("*.html")):
        rel = page.relative_to(help_dir).as_posix()
        for pid, text in parse_page(page):
            paragraphs[(rel, pid)] = text
    return paragraphs


def package_name(code: str) -> str:
    """The Debian package of a language code's help pages: ``en`` -> libreoffice-help-en-us, ``pt_br`` ->
    libreoffice-help-pt-br."""
    return PACKAGE_PREFIX + (ENGLISH_PACKAGE if code == "en" else code.replace("_", "-"))


def available_codes() -> list[str] | None:
    """Language codes whose help package the package lists hold (``apt-cache pkgnames``), ``en`` for en-us;
    None where apt-cache is missing or its lists are empty (then the download itself says what is missing)."""
    if shutil.which("apt-cache") is None:
        return None
    result = subprocess.run(["apt-cache", "pkgnames", PACKAGE_PREFIX], capture_output=True, text=True)
    suffixes = {name[len(PACKAGE_PREFIX):] for name in result.stdout.split()} - {"common"}
    if result.returncode != 0 or not suffixes:
        return None
    return sorted("en" if suffix == ENGLISH_PACKAGE else suffix for suffix in suffixes)


def check_available(langs: tuple[str, ...]) -> None:
    """Raise ValueError naming --langs, the codes without a help package and the codes that have one."""
    codes = available_codes()
    if codes is None:
        return
    packaged = {package_name(code) for code in codes}
    missing = [lang for lang in langs if package_name(lang) not in packaged]
    if missing:
        raise UsageError(f"--langs: Debian has no LibreOffice help package for {' '.join(missing)} "
                         f"({' '.join(package_name(lang) for lang in missing)}); codes with one: {' '.join(codes)}. "
                         + LOCAL_TEXT_HINT)


def help_text_dir(unpacked: Path, deb: Path) -> Path:
    """``usr/share/libreoffice/help/<dir>/text`` of an unpacked package (``<dir>``: en-US, pt-BR, fi ...)."""
    found = sorted(d / "text" for d in (unpacked / HELP_ROOT).glob("*") if (d / "text").is_dir())
    if len(found) != 1:
        raise UsageError(f"{deb}: expected the help pages of one language under {HELP_ROOT}/<lang>/text, found "
                         f"{len(found)}. " + LOCAL_TEXT_HINT)
    return found[0]


def download(packages: list[str], cache_dir: Path) -> list[Path]:
    """``apt-get download`` the packages into ``cache_dir`` (kept there); returns the .deb files."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in packages if not list(cache_dir.glob(f"{p}_*.deb"))]
    if wanted:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SystemExit("error: apt-get/dpkg-deb not found, so the default corpus (Debian's LibreOffice "
                             "help packages) cannot be fetched. " + LOCAL_TEXT_HINT)
        result = run_apt(wanted, cache_dir)
        if result.returncode != 0 and os.geteuid() == 0:
            print("[libreoffice] apt-get download failed; refreshing the package lists (apt-get update)")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            result = run_apt(wanted, cache_dir)
        if result.returncode != 0:
            raise SystemExit(f"error: apt-get download {' '.join(wanted)} failed:\n{result.stderr.strip()}\n"
                             + LOCAL_TEXT_HINT)
    return [next(cache_dir.glob(f"{p}_*.deb")) for p in packages]


def run_apt(packages: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    print(f"[libreoffice] apt-get download {' '.join(packages)} -> {cache_dir}", flush=True)
    return subprocess.run(["apt-get", "download", *packages], cwd=cache_dir, capture_output=True, text=True)


def unpack(deb: Path, cache_dir: Path) -> Path:
    target = cache_dir / "unpacked" / deb.stem
    if not target.is_dir():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(target)
    return target


def write_language(raw_dir: Path, lang: str, paragraphs: dict, reference: dict | None) -> dict:
    """Write help.txt and the alignment keys of one language; returns its counts."""
    (raw_dir / lang).mkdir(parents=True, exist_ok=True)
    (raw_dir / "alignment").mkdir(exist_ok=True)
    num_kept = num_untranslated = 0
    with open(raw_dir / lang / "help.txt", "w", encoding="utf-8") as text_out, \
            open(raw_dir / "alignment" / f"{lang}.tsv", "w", encoding="utf-8") as key_out:
        for (page, pid), text in paragraphs.items():
            if reference is not None and reference.get((page, pid)) == text:
                num_untranslated += 1
                continue
            text_out.write(text + "\n")
            key_out.write(f"{page}\t{pid}\n")
            num_kept += 1
    return {"num_paragraphs": num_kept, "num_untranslated": num_untranslated}


def fetch(raw_dir: Path, cache_dir: Path, langs: tuple[str, ...] = LANGS) -> dict:
    """Fetch, unpack and extract the help paragraphs of ``langs`` into ``raw_dir`` (skipped when done).

    ValueError naming --langs for a code of another form or without a help package (listing those with one)."""
    check_langs(langs)
    if has_manifest(raw_dir) and set(langs) <= set(read_manifest(raw_dir).get("languages", {})):
        print(f"[libreoffice] {raw_dir} done already, skipped", flush=True)
        return read_manifest(raw_dir)
    needed = ["en", *[lang for lang in langs if lang != "en"]]  # English is the untranslated-text reference
    check_available(tuple(needed))
    debs = download([package_name(lang) for lang in needed], cache_dir)
    counts, versions, reference = {}, {}, None
    for lang, deb in zip(needed, debs):
        paragraphs = parse_language(help_text_dir(unpack(deb, cache_dir), deb))
        if lang == "en":
            reference = paragraphs
        if lang in langs:
            counts[lang] = write_language(raw_dir, lang, paragraphs, None if lang == "en" else reference)
            versions[lang] = deb.name
            print(f"[libreoffice] {lang}: {counts[lang]['num_paragraphs']} paragraphs "
                  f"({counts[lang]['num_untranslated']} untranslated dropped)", flush=True)
    return write_manifest(raw_dir, "libreoffice", languages=counts, packages=versions, cache=str(cache_dir))


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds_kd" / "libreoffice"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep libreoffice", formatter_class=HelpFormatter,
                                description="Fetch the default corpus (LibreOffice help pages in eight languages, "
                                            "Debian packages) into a raw directory for the corpus command.")
    p.add_argument("--raw", type=Path, required=True, help="raw directory to write (<raw>/<lang>/help.txt)")
    p.add_argument("--cache", type=Path, default=default_cache(),
                   help="where the .deb packages are kept and unpacked (default: %(default)s)")
    add_list_argument(p, "--langs", default=list(LANGS), metavar="LANG", item_type=lang_code,
                      help="languages, space- or comma-separated: codes with a Debian package "
                           "libreoffice-help-<code> (en: en-us; pt_br or pt-br: pt-br); `apt-cache pkgnames "
                           "libreoffice-help-` lists them, and a code without one is refused with the list")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fetch(args.raw, args.cache, tuple(args.langs))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
