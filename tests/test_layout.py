"""The tree is the pipeline, and imports only go down it.

    floor (clo/*.py)  <-  clo/model  <-  clo/train  <-  clo/eval
                      <-  clo/translate

model and translate import only the floor; train imports model; eval imports model and train
(it scores exactly what training scores); the library never imports a top-level script. Read from
the source (every `import` / `from ... import`, at any depth), so a lazy import counts too.
"""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "floor": {"floor"},
    "model": {"floor", "model"},
    "translate": {"floor", "translate"},
    "train": {"floor", "model", "train"},
    "eval": {"floor", "model", "train", "eval"},
}
SCRIPTS = {"train", "eval", "translate", "study"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "clo").rglob("*.py")):
        found[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "floor"


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from clo.train import step`
    return names


def clo_imports(path: Path, known: dict) -> set[str]:
    return {n for n in imports(path) if n in known}


def test_imports_only_go_down_the_pipeline():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in clo_imports(path, known):
            if stage(target) not in ALLOWED[stage(name)]:
                wrong.append(f"{name} ({stage(name)}) imports {target} ({stage(target)})")
        scripts = {n for n in imports(path) if n.split(".")[0] in SCRIPTS}
        wrong += [f"{name} imports the script {s}" for s in scripts]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {name: clo_imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_bench_and_tests_do_not_import_scripts_as_libraries():
    """bench/ never imports a top-level script; tests only call a script's `main(argv)` (its command line)."""
    for path in sorted((REPO / "bench").glob("*.py")):
        assert not {n for n in imports(path) if n.split(".")[0] in SCRIPTS}, path.name
    for path in sorted((REPO / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in SCRIPTS:
                assert node.attr == "main", f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}"


def test_the_scripts_import_neither_the_compiler_nor_a_framework():
    """torch._dynamo costs a command ~2 s of its start on 2 CPU cores (a mistyped flag took 5.0 s to say
    so, now 2.9 s): the scripts load it when they first need it, not at import; transformers never."""
    code = "import sys, train, eval, translate, study; print(sorted(m for m in ('torch._dynamo', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])
