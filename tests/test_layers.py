"""The code's layers, as the README's map gives them, and its imports: every module is in the map,
each imports only from its own layer or the layers before it, utils/deploy/ needs only the
first four, and no import loop exists (a function-level import counts too)."""
import ast
import os
import re

from tests.tiny import ROOT

DEPLOY_LAYERS = 4  # utils/deploy/: leaves, models, formats, parts; nothing of the training run


def module_files() -> dict:
    """{module name: path relative to ROOT} of evaluate.py and every .py under models/ and utils/."""
    found = {"evaluate": "evaluate.py"}
    for top in ("models", "utils"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.relpath(os.path.join(folder, name), ROOT)
                    found[path[:-3].replace(os.sep, ".").removesuffix(".__init__")] = path
    return found


MODULES = module_files()


def imports(name: str) -> set:
    """The project modules `name` imports, anywhere in its file."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`, the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def readme_layers() -> dict:
    """{layer number: the text of its section} of the README map's layered part."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"^## Map of the repository\n+```\n(.*?)^```", text, re.M | re.S).group(1)
    sections = re.split(r"^(\d) \w+.*\n", block, flags=re.M)
    return {int(number): body for number, body in zip(sections[1::2], sections[2::2])}


def entries(section: str) -> list:
    """(paths, text) of each entry of a map section: a line indented by two spaces naming one or more
    paths (a folder ends with '/'), and its continuation lines."""
    found = []
    for line in section.splitlines():
        if re.match(r"  \S", line):
            head = re.match(r"  ([^\s,]+(?:, [^\s,]+)*)", line).group(1)
            found.append((head.split(", "), line))
        elif found and line.strip():
            found[-1] = (found[-1][0], found[-1][1] + "\n" + line)
    return found


def layer_of() -> dict:
    """{module name: its layer}: the layer whose section names its file, or its folder and its file's
    name; a package's __init__ takes the layer of the modules beside it."""
    layers = {}
    for number, section in readme_layers().items():
        for paths, text in entries(section):
            for name, path in MODULES.items():
                folder = os.path.dirname(path) + "/"
                if path in paths or (folder in paths and re.search(rf"(?<![\w/]){re.escape(os.path.basename(path))}",
                                                                   text)):
                    layers.setdefault(name, number)
    for name, path in MODULES.items():
        if path.endswith("__init__.py") and name not in layers:
            beside = [layers[m] for m, p in MODULES.items()
                      if m in layers and os.path.dirname(p) == os.path.dirname(path)]
            if beside:
                layers[name] = min(beside)
    return layers


def test_every_module_is_in_the_readme_map_and_the_layers_are_in_order():
    layers = readme_layers()
    assert sorted(layers) == list(range(1, len(layers) + 1)) and len(layers) == 6, sorted(layers)
    placed = layer_of()
    missing = sorted(path for name, path in MODULES.items() if name not in placed and name != "utils")
    assert not missing, f"modules the README's map does not place in a layer: {missing}"


def test_imports_go_only_to_the_same_layer_or_below():
    layers = layer_of()
    upward = [f"{name} (layer {layers[name]}) imports {target} (layer {layers[target]})"
              for name in layers for target in imports(name) if layers[target] > layers[name]]
    assert not upward, upward


def test_deploy_needs_only_the_first_four_layers():
    layers = layer_of()
    deploy = [name for name in MODULES if name.startswith("utils.deploy")]
    assert deploy
    above = [f"{name} imports {target}" for name in deploy for target in imports(name)
             if not target.startswith("utils.deploy") and layers[target] > DEPLOY_LAYERS]
    assert not above, above


def test_no_import_loop():
    graph = {name: imports(name) for name in MODULES}
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import loop: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
