"""The built distributions, not the editable checkout.

``python -m build`` makes an sdist and a wheel; ``twine check`` passes on both; the sdist carries
the tests and docs, the wheel only the package. ``test_wheel_in_fresh_venv`` installs the wheel
with its ``cpu`` and ``triton`` extras (torch from ``constraints.txt``, pip's cache reused) into a
new virtual environment outside the source tree, imports it from there, runs one MeZO step on
every backend that environment can run, and runs ``zo-optim --help`` / ``--version``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import zo_optim

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree (pyproject.toml) to build from"
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: hatchling comes from the test extra, so the build needs no index at all.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_twine_check(dists: dict[str, Path]) -> None:
    res = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dists["wheel"]), str(dists["sdist"])],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dist_contents(dists: dict[str, Path]) -> None:
    version = zo_optim.__version__
    assert dists["wheel"].name == f"zo_optim-{version}-py3-none-any.whl"
    assert dists["sdist"].name == f"zo_optim-{version}.tar.gz"

    wheel_names = zipfile.ZipFile(dists["wheel"]).namelist()
    top = {n.split("/")[0] for n in wheel_names}
    assert top == {"zo_optim", f"zo_optim-{version}.dist-info"}, top
    assert "zo_optim/py.typed" in wheel_names
    assert not [n for n in wheel_names if "/tests/" in n or n.startswith("tests/") or "conftest" in n]
    metadata = zipfile.ZipFile(dists["wheel"]).read(f"zo_optim-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in metadata
    assert "Provides-Extra: triton" in metadata and "Provides-Extra: cpu" in metadata

    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "CHANGELOG.md", "mkdocs.yml", "constraints.txt",
                   "src/zo_optim/__init__.py", "tests/conftest.py", "tests/test_packaging.py",
                   "docs/index.md", "docs/optimizers.md"):
        assert needed in names, needed


SMOKE = textwrap.dedent("""
    import json
    import os
    import sys
    import torch
    import zo_optim

    here = os.path.dirname(os.path.abspath(zo_optim.__file__))
    assert os.path.join("site-packages", "zo_optim") in here, here
    assert not here.startswith(sys.argv[1]), (here, sys.argv[1])
    # every backend by name, not ops.available_backends(): the [cpu,triton] extras are installed, so one that
    # does not load is a failure with its own error, not a silently shorter list
    backends = ["reference", "chunked", "cpu", "triton"]
    steps = {}
    for backend in backends:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        x, y = torch.randn(16, 8), torch.randn(16, 2)
        before = [p.detach().clone() for p in model.parameters()]
        opt = zo_optim.MeZO(model.parameters(), lr=1e-2, zo_eps=1e-3, seed=0, backend=backend)
        loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        assert torch.isfinite(loss), (backend, loss)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), backend
        steps[backend] = float(loss)
    print(json.dumps({"version": zo_optim.__version__, "file": here, "steps": steps}))
""")


@pytest.mark.slow
def test_wheel_in_fresh_venv(dists: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The pinned torch (constraints.txt) is what resolves to the local CPU wheel; pip's cache is reused.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                          f"{dists['wheel']}[cpu,triton]"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    env["TRITON_INTERPRET"] = "1"  # the triton backend's step runs on CPU tensors in Triton's interpreter
    (tmp_path / "smoke.py").write_text(SMOKE)
    res = subprocess.run([str(py), "smoke.py", str(ROOT)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["version"] == zo_optim.__version__
    assert set(report["steps"]) == {"reference", "chunked", "cpu", "triton"}, report

    cli = venv / "bin" / "zo-optim"
    res = subprocess.run([str(cli), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"zo-optim {zo_optim.__version__}", res
    res = subprocess.run([str(cli), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "bench kernels" in res.stdout and "--version" in res.stdout, res
