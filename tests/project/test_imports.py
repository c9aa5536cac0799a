"""The import structure of the package: no cycles between modules, no private names across modules, no import
from a package to one later in the pipeline, and the library never imports the data-preparation commands
(``data_prep`` may import ``ds_kd``, never the reverse)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ds_kd", "data_prep")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the module, at any depth
    (an import inside a function is a dependency too); ``from package import submodule`` counts as an import
    of the submodule."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(m, [], node.lineno) for m in submodules]
            if taken := [n for n in names if f"{base}.{n}" not in known]:  # names, not submodules, of ``base``
                found.append((base, taken, node.lineno))
    return [(m, n, line) for m, n, line in found if m in known and m != name]


def graph() -> dict[str, dict[str, int]]:
    trees = modules()
    known = set(trees)
    return {name: {m: line for m, _, line in imports(name, tree, known)} for name, tree in trees.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles_between_modules():
    found = cycles(graph())
    assert not found, "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(group) for group in found)


def test_no_private_name_is_imported_from_another_module():
    trees = modules()
    known = set(trees)
    private = [f"{name}:{line} takes {m}.{n}" for name, tree in trees.items()
               for m, names, line in imports(name, tree, known) for n in names
               if n.startswith("_") and not n.endswith("__")]
    assert not private, private


LAYERS = ["core", "data", "models", "train", "distill", "finetune", "eval"]
"""The pipeline's order: a package imports only itself and those before it. ``cli`` (flags and the train
commands' shared arguments) may import ``train`` and below, and no library package imports it."""
CLI_REACH = LAYERS.index("train")


def package_of(module: str) -> str:
    """``ds_kd.train.loop`` -> ``train``; ``ds_kd.errors`` (a core module) -> ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS + ["cli"] else "core"


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    """Every import, in the library, of a package the importer may not reach (see ``LAYERS``)."""
    found = []
    for name, deps in edges.items():
        if not name.startswith("ds_kd"):
            continue
        src = package_of(name)
        reach = CLI_REACH if src == "cli" else LAYERS.index(src)
        for m, line in deps.items():
            dst = package_of(m)
            if m.startswith("ds_kd") and (dst == "cli" and src != "cli" or dst != "cli" and LAYERS.index(dst) > reach):
                found.append(f"{name} ({src}) imports {m} ({dst}), line {line}")
    return found


def test_no_package_imports_one_later_in_the_pipeline():
    found = upward_imports(graph())
    assert not found, "upward imports: " + "; ".join(found)


def test_the_library_never_imports_data_prep():
    edges = graph()
    upward = [f"{name} imports {m} (line {line})" for name, deps in edges.items() if name.startswith("ds_kd")
              for m, line in deps.items() if m.startswith("data_prep")]
    assert not upward, upward


def test_the_checks_see_a_cycle_a_private_name_and_upward_imports():
    """The checks themselves: a made-up loop is found, and the real graph is not empty."""
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    edges = graph()
    assert "ds_kd.data.reader" in edges and "ds_kd.data.order" in edges["ds_kd.data.reader"]
    tree = ast.parse("from ds_kd.data.reader import _hidden\nfrom data_prep.corpus import run\n")
    taken = imports("ds_kd.fake", tree, set(edges))
    assert ("ds_kd.data.reader", ["_hidden"], 1) in taken and ("data_prep.corpus", ["run"], 2) in taken
    assert upward_imports({"ds_kd.data.shards": {"ds_kd.models.model": 3}, "ds_kd.eval.grid": {"ds_kd.data.tasks": 1},
                           "ds_kd.models.model": {"ds_kd.cli.flags": 2}, "ds_kd.cli": {"ds_kd.train.loop": 4},
                           "ds_kd.cli.flags": {"ds_kd.eval.report": 5}}) == [
        "ds_kd.data.shards (data) imports ds_kd.models.model (models), line 3",
        "ds_kd.models.model (models) imports ds_kd.cli.flags (cli), line 2",
        "ds_kd.cli.flags (cli) imports ds_kd.eval.report (eval), line 5"]
