"""The installed package's metadata admits the Pythons and vLLM releases GPU users run: Python
3.10 to 3.13 (what vLLM 0.32 and 0.33 support; vLLM's own images use 3.12) and, in the `gpu`
extra, vLLM 0.32.x and 0.33.x, the releases engine/hooks.py was checked against."""

from importlib.metadata import metadata, requires

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from steer_batch.engine.hooks import SUPPORTED_VLLM


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
