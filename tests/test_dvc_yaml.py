"""dvc.yaml declares, for every stage, the library modules its script imports and params it reads.

DVC reruns a stage only when a declared dep changes; a module missing from the list would let an
edit to it go unnoticed (the flaw STYLE.md warns about), and a missing params key likewise.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "braintumor"


def imported_modules(path: Path) -> set[str]:
    """braintumor modules imported anywhere in a file (including inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("braintumor"):
            found.add(node.module)  # `from braintumor.core import atomic` imports a module, not a name:
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("braintumor")}
    return found


def module_file(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"


def import_closure(script: Path) -> set[str]:
    """Repo-relative paths of every braintumor module a script needs, transitively."""
    seen: set[Path] = set()
    todo = [module_file(m) for m in imported_modules(script)]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        todo += [module_file(m) for m in imported_modules(path)]
    return {p.relative_to(REPO).as_posix() for p in seen if p.name != "__init__.py"}


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_the_modules_its_script_imports():
    for name, stage in stages().items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("python -m braintumor.core.quiet stages/"), f"stage {name}: {body['cmd']}"
        script = re.search(r"(stages/\S+\.py)", body["cmd"]).group(1)
        deps = set(body["deps"])
        assert script in deps, f"stage {name}: its script {script} is not a dep"
        missing = import_closure(REPO / script) - deps
        assert not missing, f"stage {name}: imports {sorted(missing)} but dvc.yaml does not list them"
        extra = {d for d in deps if d.startswith("src/")} - import_closure(REPO / script)
        assert not extra, f"stage {name}: lists {sorted(extra)} which its script does not import"


def test_every_params_key_a_stage_lists_exists():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in stages().items():
        for key in stage.get("do", stage).get("params", []):
            if "${" in key:
                continue  # foreach keys: checked by the DVC end-to-end test
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name}: params key {key!r} is not in params.yaml"
                node = node[part]
