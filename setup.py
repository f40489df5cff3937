"""Builds `memory3._C` with CMake against the torch that is already installed.

    pip install --no-build-isolation -e .

Environment knobs:
  MEMORY3_WITH_CUDA=0/1   force the CUDA kernels off/on (default: on when torch has CUDA and
                          nvcc is found)
  MEMORY3_BUILD_TYPE      CMake build type (default Release)
  MAX_JOBS                parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--config", build_type, "-j", jobs], check=True
        )
        # CMake writes into the persistent build folder; setuptools wants the file where
        # get_ext_fullpath says (it copies it into the package for editable installs).
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "lib" / target.name, target)


setup(ext_modules=[CMakeExtension("memory3._C")], cmdclass={"build_ext": CMakeBuild})
