"""What a user is told when the compiled backends are missing, and how unknown devices and wrong-device
backends are refused. The package is copied without its extension into a temporary folder and imported in a
subprocess, as after a plain ``pip install .`` (whose isolated build has no torch and builds no extension)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import egma_kernels as ek
from egma_kernels import compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bare_package(tmp_path_factory):
    """A copy of egma_kernels without ``_C*.so``: what a plain ``pip install .`` installs."""
    dst = tmp_path_factory.mktemp("bare")
    shutil.copytree(os.path.join(ROOT, "egma_kernels"), dst / "egma_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    return str(dst)


def _run(code, pythonpath, **env):
    full = dict(os.environ, PYTHONPATH=pythonpath, TRITON_INTERPRET="0", **env)
    full.pop("EGMA_KERNELS_SKIP_EXTENSION", None)
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120,
                         cwd=pythonpath)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# An editable install of another checkout adds an import hook that would find that checkout's extension for
# the copy's missing submodule; the copy must stand alone, as an installed package does.
STANDALONE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
"""

CHECK_MISSING = STANDALONE + """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import egma_kernels as ek
    import egma_kernels.compiled as compiled
    ek.available_backends()
mine = [w for w in caught if issubclass(w.category, compiled.ExtensionMissingWarning)]
print("WARNINGS", len(mine))
for w in mine:
    print("MESSAGE", w.message)
info = compiled.build_info()
print("INFO", info["loaded"], "|", info.get("error"), "|", info.get("fix"))
print("AVAILABLE", ek.available_backends("cpu"))
print("WHY", ek.backends.unavailable_backends().get("cpu"))
p = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
s = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
cu = torch.tensor([0, 1, 3], dtype=torch.int32)
print("AUTO", float(ek.fine_grained_loss(p, s, cu, 5.0)))
try:
    ek.fine_grained_loss(p, s, cu, 5.0, backend="cpu")
except RuntimeError as exc:
    print("ERROR", exc)
"""


def test_missing_extension_is_announced_once_with_the_fix(bare_package):
    out = _run(CHECK_MISSING, bare_package).stdout
    assert "WARNINGS 1" in out, out
    fix = compiled.FIX_COMMAND
    message = next(line for line in out.splitlines() if line.startswith("MESSAGE"))
    assert "not installed" in message and fix in message and "reference" in message
    info = next(line for line in out.splitlines() if line.startswith("INFO"))
    assert info.startswith("INFO False") and "circular import" not in info and fix in info
    assert "AVAILABLE ['reference']" in out
    assert fix in next(line for line in out.splitlines() if line.startswith("WHY"))
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert "backend 'cpu' is not available" in error and fix in error
    assert "AUTO" in out  # the reference still computes the loss


def test_intended_pure_python_install_is_quiet(bare_package):
    out = _run(CHECK_MISSING, bare_package, EGMA_KERNELS_SKIP_EXTENSION="1").stdout
    assert "WARNINGS 0" in out, out
    assert compiled.FIX_COMMAND in out  # build_info and the errors still say it


def test_extension_that_fails_to_load_says_so(tmp_path):
    code = "import sys\nsys.modules['egma_kernels._C'] = None\n" + CHECK_MISSING
    out = _run(code, ROOT).stdout
    message = next(line for line in out.splitlines() if line.startswith("MESSAGE"))
    assert "failed to load" in message and compiled.FIX_COMMAND in message


def test_built_extension_is_silent():
    if not compiled.extension_loaded():
        pytest.skip("the extension is not built here")
    info = compiled.build_info()
    assert info["loaded"] and "error" not in info and "fix" not in info
    assert compiled.missing_message() is None


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*cpu, cuda"):
        ek.available_backends("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        ek.available_backends("mps")
    assert ek.available_backends(torch.device("cpu")) == ek.available_backends("cpu")
    assert ek.available_backends("cuda:0") == ek.available_backends("cuda")
    with pytest.raises(TypeError):
        ek.available_backends(3)


def test_wrong_device_backend_blames_the_device(monkeypatch):
    monkeypatch.delenv("EGMA_KERNELS_BACKEND", raising=False)
    p = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    for name in ("cuda",) + (() if "cpu" in ek.backends._REGISTRY["triton"].devices else ("triton",)):
        with pytest.raises(ValueError, match=f"backend '{name}' runs on cuda tensors, but the inputs are on cpu; "
                           "for cpu tensors use one of: .*reference"):
            ek.fine_grained_loss(p, s, cu, 5.0, backend=name)


def test_triton_on_cpu_tensors_blames_the_device():
    """Without the interpreter (a normal run), backend='triton' on CPU tensors names the device as the problem."""
    code = (
        "import torch, egma_kernels as ek\n"
        "if 'triton' not in ek.known_backends():\n"
        "    print('NO TRITON'); raise SystemExit\n"
        "p = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)\n"
        "s = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)\n"
        "try:\n"
        "    ek.fine_grained_loss(p, s, torch.tensor([0, 1, 3], dtype=torch.int32), 5.0, backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    out = _run(code, ROOT).stdout
    if "NO TRITON" in out:
        pytest.skip("triton is not installed")
    assert "backend 'triton' runs on cuda tensors, but the inputs are on cpu" in out, out


def test_bench_says_which_backend_is_missing_and_why(bare_package):
    """egma-bench on an install without the extension names the missing backend and the fix."""
    code = STANDALONE + (
        "import warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import torch\n"
        "from egma_kernels.bench.providers import discover\n"
        "providers, notes = discover(torch.device('cpu'))\n"
        "print('PROVIDERS', [p.name for p in providers])\n"
        "print('\\n'.join(notes))\n"
    )
    out = _run(code, bare_package).stdout
    assert "'cpu'" not in out.split("PROVIDERS", 1)[1].split("\n", 1)[0]
    assert "cpu left out: egma_kernels: the fused 'cpu' and 'cuda' backends are unavailable" in out
    assert compiled.FIX_COMMAND in out
