"""The package's shape: no import cycles, no stage module imports another, and dvc.yaml lists for every
stage each project module its command imports, so a code change re-runs exactly the stages it can affect
(tests/test_pipeline_e2e.py shows it on a real `dvc status`)."""

from __future__ import annotations

import yaml

from flows.tasks import STAGE_FUNCTIONS
from tests.imports import project_closure
from tests.support import PROJECT_ROOT

STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
RUNNER = project_closure("flows.stages") | {"flows/__main__.py"}  # `python -m flows <stage>`


def _code_deps(stage: str) -> set[str]:
    return {dep for dep in STAGES[stage]["deps"] if dep.endswith(".py")}


def test_every_stage_lists_exactly_the_modules_its_command_imports():
    assert set(STAGES) == set(STAGE_FUNCTIONS)
    for stage, function in STAGE_FUNCTIONS.items():
        module = function.target.partition(":")[0]
        imported = {path for path in project_closure(module) | RUNNER if not path.endswith("__init__.py")}
        assert _code_deps(stage) == imported, stage


def test_no_stage_module_imports_another_stage():
    stage_files = {f"{fn.target.partition(':')[0].replace('.', '/')}.py" for fn in STAGE_FUNCTIONS.values()}
    for function in STAGE_FUNCTIONS.values():
        own = f"{function.target.partition(':')[0].replace('.', '/')}.py"
        assert project_closure(function.target.partition(":")[0]) & stage_files == {own}, own


def test_no_import_cycles():
    for path in sorted((PROJECT_ROOT / "pipeline").glob("*.py")) + sorted((PROJECT_ROOT / "flows").glob("*.py")):
        if path.name.startswith("__"):
            continue
        module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        own = str(path.relative_to(PROJECT_ROOT))
        for imported in project_closure(module) - {own}:
            back = ".".join(imported.removesuffix(".py").split("/"))
            assert own not in project_closure(back), f"{own} -> {imported} -> {own}"
