"""The installed package's metadata admits the Pythons and vLLM releases GPU users run: Python
3.10 to 3.13 (what vLLM 0.32 and 0.33 support; vLLM's own images use 3.12) and, in the `gpu`
extra, vLLM 0.32.x and 0.33.x, the releases engine/hooks.py was checked against."""

from importlib.metadata import metadata, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from steer_batch.engine.hooks import SUPPORTED_VLLM

ROOT = Path(__file__).resolve().parent.parent.parent


def test_requires_python_admits_what_vllm_supports():
    allowed = SpecifierSet(metadata("steer-batch")["Requires-Python"])
    assert all(v in allowed for v in ("3.10.0", "3.11.7", "3.12.0", "3.12.8", "3.13.1"))
    assert "3.9.18" not in allowed and "3.14.0" not in allowed  # vLLM 0.32/0.33 ship no wheel for them


def _extra(name: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in requires("steer-batch")]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": name})]


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_the_gpu_extra_asks_for_the_checked_vllm_releases_on_every_python(python):
    env = {"extra": "gpu", "python_version": python, "python_full_version": f"{python}.0"}
    (vllm,) = [r for r in _extra("gpu") if r.name == "vllm" and r.marker.evaluate(env)]
    for version in ("0.32.0", "0.32.3", "0.33.0", "0.33.2"):
        assert version in vllm.specifier and version.startswith(SUPPORTED_VLLM)
    assert "0.31.2" not in vllm.specifier and "0.34.0" not in vllm.specifier


def _interpreter(version: str) -> str | None:
    """A python`version` on this machine: pyenv's, or one on PATH."""
    import glob
    import shutil

    found = sorted(glob.glob(f"{Path.home()}/.pyenv/versions/{version}.*/bin/python{version}"))
    return found[-1] if found else shutil.which(f"python{version}")


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_every_module_compiles_under_the_pythons_gpu_users_run(version):
    """The sources compile under each Python the metadata admits (syntax only: those Pythons
    have no torch or vLLM here)."""
    import subprocess

    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    script = (
        "import pathlib, sys\n"
        "bad = []\n"
        "for f in pathlib.Path(sys.argv[1]).rglob('*.py'):\n"
        "    try: compile(f.read_text(), str(f), 'exec')\n"
        "    except SyntaxError as e: bad.append(f'{f}: {e}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([python, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
