"""The package layout holds: the library never imports a script, scripts never import each other, the remote-code
files import nothing of this project but each other, and every setting has one default."""

import ast
import dataclasses
from pathlib import Path

import pytest

from configuration_whisper_mla import WhisperMLAConfig
from whisper_mla.conversion import MLAArguments


ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if p.name != "setup.py")
REMOTE_CODE = {"configuration_whisper_mla", "modeling_whisper_mla", "pipeline_whisper_mla"}
LIBRARY = sorted((ROOT / "whisper_mla").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_layout_is_what_this_test_expects():
    assert REMOTE_CODE <= set(SCRIPTS)
    assert {"run_eval", "run_finetune", "convert_whisper_to_mla", "run_benchmark"} <= set(SCRIPTS)
    assert len(LIBRARY) >= 10


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_no_script(path):
    scripts = set(SCRIPTS) - REMOTE_CODE
    assert imported_modules(path) & scripts == set()


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - REMOTE_CODE))
def test_scripts_do_not_import_each_other(script):
    assert imported_modules(ROOT / f"{script}.py") & (set(SCRIPTS) - REMOTE_CODE) == set()


@pytest.mark.parametrize("name", sorted(REMOTE_CODE))
def test_remote_code_is_self_contained(name):
    project = set(SCRIPTS) | {"whisper_mla"}
    assert imported_modules(ROOT / f"{name}.py") & project <= REMOTE_CODE


def test_conversion_defaults_are_the_config_defaults():
    """One default per setting: the converter's MLA arguments take theirs from WhisperMLAConfig."""
    config_fields = {f.name: f for f in dataclasses.fields(WhisperMLAConfig)}
    shared = [f for f in dataclasses.fields(MLAArguments) if f.name in config_fields]
    assert len(shared) >= 8
    for field in shared:
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        expected = getattr(WhisperMLAConfig, field.name)
        assert default == (list(expected) if isinstance(expected, tuple) else expected), field.name
