"""The default corpus's extraction on hand-written help pages (the real packages are never downloaded here)."""
from __future__ import annotations

import pytest

from data_prep import libreoffice
from data_prep.libreoffice import parse_language, write_language

PAGE = """<html><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Load/Save <b>options</b></h1>
<p id="par_id2" class="paragraph">Choose <span class="switchinline"><span hidden="true" class="MAC">Preferences</span>
<span id="default">Tools - Options</span></span>.<br>Then   click OK.</p>
<p class="embedded">Embedded text without an id is not a paragraph of this page.</p>
<p id="par_id3"><img src="x.png"></p>
<p id="par_id2">A repeated id keeps its first text.</p>
</div></body></html>"""


def write_page(root, lang: str, text: str):
    page = root / lang / "text" / "shared" / "page.html"
    page.parent.mkdir(parents=True)
    page.write_text(text, encoding="utf-8")
    return root / lang / "text"


def test_paragraphs_keep_ids_and_skip_hidden_text(tmp_path):
    paragraphs = parse_language(write_page(tmp_path, "en", PAGE))
    assert paragraphs == {("shared/page.html", "hd_id1"): "Load/Save options",
                          ("shared/page.html", "par_id2"): "Choose Tools - Options. Then click OK."}


def test_untranslated_paragraphs_are_dropped_and_keys_align(tmp_path):
    english = parse_language(write_page(tmp_path / "src", "en", PAGE))
    hindi = parse_language(write_page(tmp_path / "src", "hi", PAGE.replace("Load/Save <b>options</b>",
                                                                             "लोड/सहेजें विकल्प")))
    counts = write_language(tmp_path / "raw", "hi", hindi, english)
    assert counts == {"num_paragraphs": 1, "num_untranslated": 1}
    assert (tmp_path / "raw" / "hi" / "help.txt").read_text(encoding="utf-8") == "लोड/सहेजें विकल्प\n"
    assert (tmp_path / "raw" / "alignment" / "hi.tsv").read_text() == "shared/page.html\thd_id1\n"


def test_without_apt_the_error_says_how_to_use_local_text(tmp_path, monkeypatch):
    monkeypatch.setattr(libreoffice.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match=r"apt-get/dpkg-deb not found.*--raw DIR"):
        libreoffice.fetch(tmp_path / "raw", tmp_path / "cache", ("en", "hi"))


def fake_apt_cache(monkeypatch, names: str) -> None:
    """apt-cache pkgnames answering ``names``; every other command fails the test."""
    import subprocess

    def run(cmd, **kw):
        assert cmd[:2] == ["apt-cache", "pkgnames"], cmd
        return subprocess.CompletedProcess(cmd, 0, names, "")

    monkeypatch.setattr(libreoffice.subprocess, "run", run)
    monkeypatch.setattr(libreoffice.shutil, "which", lambda name: f"/usr/bin/{name}")


def test_a_language_without_a_help_package_is_refused_naming_those_with_one(tmp_path, monkeypatch, capsys):
    fake_apt_cache(monkeypatch, "libreoffice-help-common\nlibreoffice-help-en-us\nlibreoffice-help-fi\n"
                                "libreoffice-help-pt-br\nlibreoffice-help-zh-cn\n")
    assert libreoffice.available_codes() == ["en", "fi", "pt-br", "zh-cn"]
    assert libreoffice.check_available(("en", "fi", "pt_br", "zh-cn")) is None
    assert libreoffice.main(["--raw", str(tmp_path / "raw"), "--cache", str(tmp_path / "c"), "--langs", "fi,sw"]) == 2
    err = capsys.readouterr().err
    assert "--langs: Debian has no LibreOffice help package for sw (libreoffice-help-sw)" in err
    assert "codes with one: en fi pt-br zh-cn" in err and not (tmp_path / "raw").exists()


def test_package_names_and_help_folders_of_any_language(tmp_path):
    assert [libreoffice.package_name(c) for c in ("en", "fi", "pt_br", "zh-cn")] == [
        "libreoffice-help-en-us", "libreoffice-help-fi", "libreoffice-help-pt-br", "libreoffice-help-zh-cn"]
    unpacked = tmp_path / "unpacked"
    (unpacked / libreoffice.HELP_ROOT / "media").mkdir(parents=True)
    (unpacked / libreoffice.HELP_ROOT / "pt-BR" / "text").mkdir(parents=True)
    found = libreoffice.help_text_dir(unpacked, tmp_path / "x.deb")
    assert found == unpacked / libreoffice.HELP_ROOT / "pt-BR" / "text"
