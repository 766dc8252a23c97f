"""``nf4 env`` / ``nf4 --version`` and ``available_backends``: the truth about this machine."""
import subprocess
import sys

import pytest
import torch

import nf4
from nf4 import env
from nf4.cli import main

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without a GPU")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nf4 {nf4.__version__}"


def test_env_command_prints_the_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key, value in env.report():
        assert f"{key}" in out and value in out


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nf4", "env"], capture_output=True, text=True, timeout=240,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"torch {torch.__version__}".split()[1] in result.stdout
    assert "quantize, cpu tensors" in result.stdout


def test_report_rows():
    rows = dict(env.report())
    assert rows["nf4"].startswith(nf4.__version__)
    assert rows["torch"].startswith(torch.__version__)
    ext = env.extension()
    assert rows["nf4._C"].startswith("loaded from" if ext.loaded else "not loaded: ")
    for op in env.OPS:
        assert f"{op}, cpu tensors" in rows and f"{op}, cuda tensors" in rows


def test_cpu_tensors_use_the_reference(monkeypatch):
    monkeypatch.delenv("NF4_BACKEND", raising=False)
    choices = env.backend_choices()
    for op in env.OPS:
        assert choices[("cpu", op)][0] == "reference"


def test_forced_backend_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    nf4.set_backend("triton")
    name, why = env.backend_choices()[("cpu", "matmul")]
    assert name is None and "cannot run cpu tensors" in why
    nf4.set_backend("reference")
    assert env.backend_choices()[("cpu", "quantize")] == ("reference", "forced by NF4_BACKEND / nf4.set_backend")


@NO_GPU
def test_no_gpu_no_cuda_backends():
    assert nf4.available_backends("cuda") == []
    assert "reference" in nf4.available_backends("cpu")
    for op in env.OPS:
        name, why = env.backend_choices()[("cuda", op)]
        assert name is None and why.startswith("no usable CUDA GPU")
    assert dict(env.report())["gpu"].startswith("none: ")


@pytest.mark.gpu
def test_gpu_report_names_the_code_that_runs():
    rows = dict(env.report())
    major, minor = torch.cuda.get_device_capability()
    assert f"sm_{major}{minor}" in rows["gpu 0"]
    assert nf4.available_backends("cuda")
    if env.extension().loaded:
        assert rows["quantize, cuda tensors"].startswith("cuda: nf4._C runs ")


def test_extension_reason_when_not_loaded():
    ext = env.extension()
    if ext.loaded:
        assert ext.archs, "a loaded nf4._C reports its targets"
    else:
        assert ext.error and ext.describe() == f"not loaded: {ext.error}"


@pytest.mark.parametrize("capability, archs, ptx, expected", [
    ((9, 0), ("80", "86", "89", "90a"), "80", "sm_90a SASS"),
    ((8, 0), ("80", "86", "89", "90a"), "80", "sm_80 SASS"),
    ((8, 9), ("80", "86", "89", "90a"), "80", "sm_89 SASS"),
    ((8, 7), ("80", "86", "89", "90a"), "80", "sm_86 SASS (binary compatible)"),
    ((12, 0), ("80", "86", "89", "90a"), "80", "JIT from compute_80 PTX (compiled by the driver at first use)"),
    ((10, 0), ("90a",), "", None),          # arch-specific code runs on 9.0 only
    ((9, 0), ("80",), "80", "JIT from compute_80 PTX (compiled by the driver at first use)"),
    ((7, 5), ("80", "90a"), "80", None),    # PTX is not compiled for older GPUs
    ((8, 6), ("89",), "89", None),          # SASS does not run on an older minor version
])
def test_cuda_code_for(capability, archs, ptx, expected):
    assert env.cuda_code_for(capability, archs, ptx) == expected
