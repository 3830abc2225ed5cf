"""The wheel as a user gets it: built from a copy of the checkout with `pip wheel . --no-deps`, installed
non-editable into a fresh folder outside the repository, and run from there.

The build uses the installed setuptools (--no-build-isolation: no package index needed; pyproject.toml
asks for setuptools >= 70.1, which the test extra's environment has). The installed package runs in a
fresh process started outside the checkout with only the install folder on PYTHONPATH, ahead of any
editable install of the checkout: an import, lora_linear through the kernels (in the interpreter)
against float64, the tuned configuration tables, and patch_peft on a tiny PEFT model."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the checkout leaves out: build outputs, caches, and the fusedlora/kernels link (a
# checkout convenience; setup.py installs kernels/ as fusedlora.kernels through package_dir).
SKIP = shutil.ignore_patterns(".git", ".ci", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".benchmarks", ".venv")

CHECK = r'''
import sys
from pathlib import Path

import torch
from torch import nn

site = Path(sys.argv[1]).resolve()
import fusedlora
from fusedlora.core import reference
from fusedlora.kernels import configs

for module in (fusedlora, configs):
    assert Path(module.__file__).resolve().is_relative_to(site), f"{module.__name__} from {module.__file__}"

g = torch.Generator().manual_seed(0)
x, W, b = torch.randn(5, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
A, B = torch.randn(4, 40, generator=g), torch.randn(24, 4, generator=g)
y = fusedlora.lora_linear(x, W, b, A, B, scaling=2.0)
exact = reference.lora_linear(*(t.double() for t in (x, W, b, A, B)), scaling=2.0)
err = (y.double() - exact).abs().max().item()
assert err < 1e-4 * exact.abs().max().item(), f"lora_linear: {err:.3g} off float64"
print(f"lora_linear: max error {err:.2g}")

tables = sorted(p.stem for p in (Path(configs.__file__).parent / "configs").glob("*.json"))
assert tables == sys.argv[2].split(","), (tables, sys.argv[2])
for stem in tables:
    assert configs.table(stem.replace("_", " ")), stem  # {} when the file is not where the library looks
print("tables:", ", ".join(tables))

from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
model = get_peft_model(nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 16)),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
with torch.no_grad():
    before = model(x)
    patched = fusedlora.patch_peft(model)
    after = model(x)
assert patched == 2, patched
assert torch.allclose(after, before, rtol=1e-5, atol=1e-5), (after - before).abs().max()
print(f"patch_peft: {patched} layers, max difference to PEFT {(after - before).abs().max().item():.2g}")
'''


def _run(cmd, **kwargs):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP, symlinks=True)
    link = source / "fusedlora" / "kernels"
    if link.is_symlink():
        link.unlink()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)])
    (wheel,) = dist.glob("fusedlora-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fusedlora", wheel.name.split("-py3")[0] + ".dist-info"}, \
        sorted({n.split("/")[0] for n in names})  # no top-level kernels/, tests/ or benchmarks/
    tables = sorted(p.stem for p in (ROOT / "kernels" / "configs").glob("*.json"))
    assert tables and all(f"fusedlora/kernels/configs/{t}.json" in names for t in tables)

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEDLORA_") and k != "PYTHONPATH"}
    # The kernels on CPU tensors: the interpreter, switched on before triton is imported.
    env.update(PYTHONPATH=str(site), TRITON_INTERPRET="1", FUSEDLORA_BACKEND="triton")
    done = _run([sys.executable, "-c", CHECK, str(site), ",".join(tables)], cwd=tmp_path, env=env)
    assert "patch_peft: 2 layers" in done.stdout, done.stdout
