"""Packaging: a non-editable wheel (what `pip install .` installs) carries the native kernels' C++ sources, and the
installed package finds them. Built offline from a copy of the tree (setuptools from the venv, no build isolation),
so the checkout gets no build/ or egg-info folders."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "skiplayer"
KERNELS = PKG / "model" / "kernels"
# Hook for the built-in draft files (another change adds them here): whatever that folder holds in the source tree
# must be in the wheel too; while it does not exist, nothing is asked of it.
DRAFTS_BUILTIN = PKG / "drafts_builtin"


def source_files(folder: Path) -> list[str]:
    """Files under `folder` as wheel paths (skiplayer/...), without Python caches."""
    return sorted(str(p.relative_to(PKG.parent)).replace(os.sep, "/") for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(tree)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("skiplayer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_kernel_sources_are_found():
    from skiplayer.model import optimize
    assert Path(optimize._KERNEL_DIR) == KERNELS
    listed = set(optimize._KERNEL_SOURCES + optimize._KERNEL_HEADERS)
    on_disk = {p.name for p in KERNELS.iterdir() if p.suffix in (".cpp", ".h")}
    assert listed == on_disk  # a new .cpp/.h must be compiled or at least be part of the build key


def test_wheel_carries_the_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = source_files(KERNELS)
    assert {"skiplayer/model/kernels/common.h", "skiplayer/model/kernels/ops.cpp",
            "skiplayer/model/kernels/avx2.cpp"} <= set(expected)
    missing = [f for f in expected if f not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_wheel_carries_the_builtin_drafts(wheel):
    if not DRAFTS_BUILTIN.is_dir():
        pytest.skip(f"{DRAFTS_BUILTIN.relative_to(ROOT)} does not exist yet")
    expected = source_files(DRAFTS_BUILTIN)
    assert expected, f"{DRAFTS_BUILTIN} is empty"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in expected if f not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_installed_wheel_finds_its_kernel_sources(wheel, tmp_path):
    """Installed from the wheel (not the checkout), the package reads its kernel sources from where it is installed,
    and names the build as the checkout does (same torch, flags and sources: one shared build)."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("from skiplayer.model import optimize; "
            "print(optimize._KERNEL_DIR); print(optimize.kernel_build_name())")
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    kernel_dir, name = r.stdout.split()
    assert Path(kernel_dir).resolve() == (target / "skiplayer" / "model" / "kernels").resolve()
    from skiplayer.model import optimize
    assert name == optimize.kernel_build_name()
