"""Build script: installs the package ``nf4``, maps ``kernels/`` to ``nf4.kernels``, and compiles
``csrc/`` into the pybind11 module ``nf4._C`` through CMakeLists.txt when nvcc is found.

Environment:
    NF4_BUILD_CUDA=0      skip the CUDA extension (pure Python + Triton install).
    NF4_BUILD_CUDA=1      require it: fail if nvcc is missing.
    NF4_CUDA_ARCHS        semicolon list of targets (default "80;86;89;90a", plus compute_80 PTX
                          for newer GPUs: see CMakeLists.txt "Note: targets"); "90a" alone builds
                          only the Hopper code, the quickest build on the H100 machine.
    NF4_BUILD_JOBS        parallel compile jobs (default: CPU count).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# SASS for A100, RTX 30xx/A10/A40, RTX 40xx/L4/L40, H100/H200 (+ compute_80 PTX, CMakeLists.txt).
DEFAULT_CUDA_ARCHS = "80;86;89;90a"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11  # a build requirement (pyproject.toml)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = find_nvcc()
        cfg = [
            "cmake", str(ROOT),
            f"-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DNF4_OUTPUT_DIR={out_dir}",
            f"-DNF4_CUDA_ARCHS={os.environ.get('NF4_CUDA_ARCHS', DEFAULT_CUDA_ARCHS)}",
        ]
        jobs = os.environ.get("NF4_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(cfg, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", "Release", "-j", jobs], cwd=build_dir,
                       check=True)


def ext_modules():
    mode = os.environ.get("NF4_BUILD_CUDA", "auto")
    if mode == "0":
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise RuntimeError("NF4_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        print("nf4: nvcc not found, building without the CUDA extension", file=sys.stderr)
        return []
    return [CMakeExtension("nf4._C")]


setup(
    packages=find_packages(include=["nf4", "nf4.*"]) + ["nf4.kernels"],
    package_dir={"nf4.kernels": "kernels"},
    package_data={"nf4": ["py.typed"]},  # PEP 561: the package's annotations are for type checkers
    ext_modules=ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
)
