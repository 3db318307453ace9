"""docs/layout.md's rules, read from the code: every module's imports (ast), the graph they make, and the
rules the lesson and the machinery keep. No circle, no project import tucked inside a function, model.py a
leaf, the machinery below the scripts."""
import ast
import os
import sys

import pytest

from conftest import ROOT

LESSON = ("model", "data", "sft", "dpo", "sample")
SCRIPTS = ("sft", "dpo", "sample", "rlhf")  # the lesson's scripts and the appendix
FOLDERS = ("machinery", "experiments", "benchmarks")


def project_modules():
    """{module name: path} of every module of the project (tests aside)."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                module = folder if name == "__init__.py" else f"{folder}.{name[:-3]}"
                found[module] = os.path.join(ROOT, folder, name)
    return found


MODULES = project_modules()


def imports(path):
    """[(imported module, line, inside a function)] of a file, `from package import module` resolved to the
    module where it is one."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in MODULES else child.module, child.lineno, in_function))
            visit(child, nested)
    visit(tree, False)
    return found


GRAPH = {module: imports(path) for module, path in MODULES.items()}


def project_edges(module):
    return sorted({name for name, _, _ in GRAPH[module] if name in MODULES and name != module})


def test_the_import_graph_has_no_circle():
    state, path = {}, []

    def walk(module):
        state[module] = "open"
        path.append(module)
        for target in project_edges(module):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("an import circle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            walk(module)


def test_no_project_import_is_placed_inside_a_function():
    hidden = [f"{module}:{line} imports {name}" for module, found in GRAPH.items() for name, line, inside in found
              if inside and name in MODULES]
    assert hidden == []


def test_model_imports_torch_and_the_standard_library_only():
    for name, line, _ in GRAPH["model"]:
        root = name.split(".")[0]
        assert root == "torch" or root in sys.stdlib_module_names, f"model.py:{line} imports {name}"


def test_data_imports_the_model_and_what_reads_other_formats_only():
    assert project_edges("data") == ["machinery", "machinery.formats", "model"]


def test_no_script_imports_sft_or_dpo():
    for script in SCRIPTS:
        assert not {"sft", "dpo"} & set(project_edges(script)) - {script}, script


def test_the_machinery_imports_the_lesson_files_model_and_data_only():
    for module in MODULES:
        if module.split(".")[0] == "machinery":
            above = [name for name in project_edges(module) if name.split(".")[0] != "machinery"]
            assert set(above) <= {"model", "data"}, (module, above)


def test_no_file_edits_the_import_path():
    for module, path in MODULES.items():
        source = open(path, encoding="utf-8").read()
        assert "sys.path.insert" not in source and "sys.path.append" not in source, module


def test_docs_layout_states_these_rules():
    with open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    for rule in ("model.py imports torch and the standard library only",
                 "data.py imports model.py and machinery/formats.py",
                 "No script imports sft.py or dpo.py",
                 "The machinery imports model.py and data.py, never a script",
                 "No import circle",
                 "no import of the project inside a function",
                 "no file edits sys.path"):
        assert rule in text, rule
