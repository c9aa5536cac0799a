"""Stage manifests: every stage writes one directory and a ``manifest.json`` in it, last.

The manifest's presence means the stage finished; it records the resolved config, the input manifests,
counts and the code version. A stage whose input manifest is missing refuses to start
(:class:`MissingStageError`). Training stages (pretraining, distillation, fine-tuning, the grid's jobs) also
record their settings and decide what a re-run into a finished or unfinished output does with one rule,
:func:`rerun_action`: the same settings are skipped, other settings refused naming them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ds_kd.errors import UsageError

MANIFEST = "manifest.json"


class MissingStageError(RuntimeError):
    """An input directory has no manifest: the stage that makes it has not finished."""


def code_version() -> str:
    """``git describe`` of this checkout (with ``-dirty``), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from ds_kd import __version__

    return __version__


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path | str, stage: str, **fields: Any) -> dict:
    """Write ``directory/manifest.json`` atomically, stamped with stage name, time and code version."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "code_version": code_version(), **fields}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return manifest


def has_manifest(directory: Path | str) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: Path | str, needed_by: str | None = None) -> dict:
    """Read ``directory/manifest.json``; a missing one raises :class:`MissingStageError` saying what to run."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        who = f" (needed by {needed_by})" if needed_by else ""
        raise MissingStageError(
            f"{path} does not exist{who}: the stage that writes {directory} has not finished. "
            f"Run that stage first (or point to the right directory)."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- re-running into an existing output ----------------------------------------------------------------------

BUDGET_KEYS = ("max_steps", "epochs")
"""Settings that only say how long to train: a finished run may be extended by raising them (``--resume``)."""


def _plain(value: Any) -> Any:
    """JSON's view of a value, so that a tuple and a list, or a Path and its string, compare equal."""
    return json.loads(json.dumps(value, default=str))


def settings_differences(recorded: dict, wanted: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (recorded value, wanted value) of every setting that differs; nested dicts are compared key
    by key, a key present on one side only differs (its missing side is ``None``)."""
    recorded, wanted = _plain(recorded), _plain(wanted)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.update(settings_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            out[f"{prefix}{key}"] = (old, new)
    return out


def describe_differences(diffs: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """``key: old -> new; ...`` (at most ``limit`` keys, then a count)."""
    items = [f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in diffs.items()]
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def read_json_file(path: Path | str) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def remove_outputs(directory: Path | str, names: tuple[str, ...]) -> None:
    """Delete the files and folders ``names`` of ``directory`` that exist (what ``--overwrite`` clears)."""
    for name in names:
        path = Path(directory) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def rerun_action(where: Path | str, what: str, recorded: dict | None, wanted: dict, *, finished: bool,
                 unfinished: bool, overwrite: bool, resume: bool, can_extend: bool = True) -> str:
    """The one rule for a command whose output directory ``where`` may already hold a run.

    ``recorded``: the settings (what determines the result: model, data, engine config, budget, lr, seed, ...;
    never logging flags) stored by the earlier run, None when it stored none; ``wanted``: this command's.
    ``finished``: the earlier run completed; ``unfinished``: it left a checkpoint to resume from.

    Returns ``"start"`` (nothing there), ``"overwrite"`` (start over: the caller clears the old outputs),
    ``"skip"`` (finished with the same settings: nothing to do), ``"resume"`` (continue an unfinished run:
    only the budget may differ) or ``"extend"`` (``--resume`` on a finished run whose settings differ only in
    the budget of :data:`BUDGET_KEYS`: continue training to the new budget; the caller checks it is larger).
    Raises :class:`FileExistsError` naming every setting that differs otherwise, UsageError for ``resume`` where
    there is nothing to resume."""
    if not (finished or unfinished):
        if resume:
            raise UsageError(f"--resume: {where} holds no checkpoint of a {what} to resume: drop --resume to start "
                             f"one there, or check --out")
        return "start"
    if overwrite:
        return "overwrite"
    diffs = (settings_differences(recorded, wanted) if recorded is not None
             else {"settings": ("not recorded (an older version wrote this run)", "this command's")})
    only_budget = bool(diffs) and all(k.split(".")[0] in BUDGET_KEYS for k in diffs)
    if finished:
        if not diffs:
            return "skip"
        if resume and only_budget and can_extend:
            return "extend"
        hint = ("pass --overwrite to start over" + (", or --resume to extend it to the larger budget"
                                                      if only_budget and can_extend else ""))
        raise FileExistsError(f"{where} holds a finished {what} with other settings ({describe_differences(diffs)})"
                              f": {hint}, or choose another output directory")
    if not resume:
        raise FileExistsError(f"{where} holds an unfinished {what}: pass --resume to continue it, --overwrite to "
                              f"start over, or choose another output directory")
    if recorded is not None and diffs and not only_budget:
        raise FileExistsError(f"{where} holds an unfinished {what} with other settings "
                              f"({describe_differences(diffs)}): --resume continues only the same settings (a "
                              f"budget may change); pass --overwrite to start over")
    return "resume"


def finished_output(out: Path | str, what: str, settings: dict, *, overwrite: bool) -> dict | None:
    """The re-run rule of the data preparation commands (``python -m data_prep ...``), the same as the training
    commands' :func:`rerun_action` for an output that is either finished (its manifest exists) or not.

    ``settings``: what determines the output (input paths, thresholds, sizes, seeds); the command records them
    under ``"settings"`` in its manifest. Returns the finished manifest when ``out`` holds one with the same
    settings (the caller prints that it skips and does no work); None when the work must run: nothing finished
    there, or ``overwrite`` (the caller replaces the old output). Raises :class:`FileExistsError` naming every
    setting that differs (and "not recorded" for a manifest of an older version), with ``--overwrite`` as the
    way to rebuild: a finished output is never silently reused for other settings."""
    if not has_manifest(out):
        return None
    manifest = read_manifest(out)
    action = rerun_action(Path(out), what, manifest.get("settings"), settings, finished=True, unfinished=False,
                          overwrite=overwrite, resume=False, can_extend=False)
    return manifest if action == "skip" else None
