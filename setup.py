"""Builds `memory3._C` with CMake against the torch that is already installed.

    pip install torch==2.13.0 cmake ninja setuptools wheel
    pip install --no-build-isolation -e .

CMake and Ninja come from their PyPI packages (the first line; pyproject.toml lists them
as build requirements, which --no-build-isolation does not install); without them the
build falls back to the cmake/ninja on PATH and says so.

Environment knobs:
  MEMORY3_WITH_CUDA=0/1   force the CUDA kernels off/on (default: on when torch has CUDA and
                          nvcc is found)
  MEMORY3_BUILD_TYPE      CMake build type (default Release)
  MAX_JOBS                parallel compile jobs
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(name: str) -> str | None:
    """The cmake/ninja binary of its PyPI package, else the one on PATH (None if neither)."""
    try:
        if name == "cmake":
            import cmake

            folder = cmake.CMAKE_BIN_DIR
        else:
            import ninja

            folder = ninja.BIN_DIR
        path = Path(folder) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        print(f"memory3: the {name} package is not installed; using {found} (pip install {name})")
    return found


def _want_cuda() -> bool:
    flag = os.environ.get("MEMORY3_WITH_CUDA")
    if flag is not None:
        return flag not in ("0", "", "off", "OFF", "false")
    import torch

    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        with_cuda = _want_cuda()
        build_type = os.environ.get("MEMORY3_BUILD_TYPE", "Release")
        # One persistent build folder per configuration keeps rebuilds incremental.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
        build_dir = ROOT / "build" / tag
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMEMORY3_OUTPUT_DIR={build_dir / 'lib'}",
            f"-DMEMORY3_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DMEMORY3_VERSION={self.distribution.get_version()}",
        ]
        cmake = _tool("cmake")
        if cmake is None:
            sys.exit("memory3: CMake >= 3.22 is needed to build: pip install cmake ninja")
        ninja = _tool("ninja")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, "-j", jobs], check=True)
        # CMake writes into the persistent build folder; setuptools wants the file where
        # get_ext_fullpath says (it copies it into the package for editable installs).
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "lib" / target.name, target)


setup(ext_modules=[CMakeExtension("memory3._C")], cmdclass={"build_ext": CMakeBuild})
