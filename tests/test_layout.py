"""The house a reader walks: the method's seven modules in front, imports one way (no circle), short functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD = ("train", "eval", "grpo", "rewards", "curriculum", "data", "model")
PACKAGES = ("transit", "offline", "variants", "speed", "scaling", "plumbing", "tools")


def project_modules() -> dict[str, Path]:
    mods = {name: ROOT / f"{name}.py" for name in CARD}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def imports_of(path: Path, mods: dict) -> set[str]:
    """The project modules a file imports, anywhere in it (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out |= (subs & mods.keys()) or ({node.module} & mods.keys())
    return out


def test_top_level_holds_the_card_and_packages_only():
    tops = sorted(p.stem for p in ROOT.glob("*.py"))
    assert tops == sorted(CARD), f"top-level modules besides the card's seven: {set(tops) - set(CARD)}"
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc, f"{pkg}/__init__.py should say what the package holds"


def test_no_import_circle():
    mods = project_modules()
    graph = {m: imports_of(p, mods) - {m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [m])


def test_the_method_is_not_imported_by_what_it_uses():
    """The card's modules import the packages; of the packages only tools/ (commands around the method),
    variants/ and speed/ (the method's alternatives and fast paths) and plumbing/checkpoints.py (it saves the
    policy) import the card's modules."""
    mods = project_modules()
    allowed = ("tools", "variants", "speed", "plumbing.checkpoints")
    for m, p in mods.items():
        if m in CARD or m.startswith(allowed):
            continue
        assert not imports_of(p, mods) & set(CARD), f"{m} imports the method: {imports_of(p, mods) & set(CARD)}"


@pytest.mark.parametrize("module", CARD)
def test_no_function_over_80_lines_in_the_card(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{module}.py: functions over 80 lines: {long}"


def test_readme_is_a_map_of_at_most_200_lines():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 200, f"README.md is {len(readme)} lines"
    for path in project_modules().values():  # the code map names every file
        rel = path.relative_to(ROOT).as_posix()
        if path.stem != "__init__":
            assert rel in "\n".join(readme) or path.name in "\n".join(readme), f"README's code map lacks {rel}"
