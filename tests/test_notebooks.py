"""notebooks/*.ipynb run top to bottom on a CPU within their time budgets, and are committed
without outputs.

Each notebook runs in a fresh kernel of this test's own Python (a kernel spec written for
sys.executable, not whatever `python3` kernel is installed) with this checkout first on its
path, on one plain CPU device: the sharding notebook must make its 8 simulated devices itself.
An error in any cell fails the test (nbclient's CellExecutionError names the cell).
"""

import glob
import json
import os
import sys
import time

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient", reason="the [test] extra installs nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
# Seconds each notebook may take here, kernel start included: about three times what it takes
# on an idle 2-core machine (its header states that), for a machine shared with other work.
BUDGET_S = {"quickstart": 180, "sharding": 180, "finetune": 240}


def test_every_notebook_has_a_budget():
    assert NOTEBOOKS, "no notebooks found"
    names = {os.path.basename(p)[:-len(".ipynb")] for p in NOTEBOOKS}
    assert names <= set(BUDGET_S), f"notebooks without a time budget: {names - set(BUDGET_S)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{os.path.basename(path)} cell {i} has outputs; clear them before committing "
                f"(jupyter nbconvert --clear-output --inplace {path}).")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec running this interpreter, so notebooks see the packages the tests see."""
    d = tmp_path_factory.mktemp("kernels")
    os.makedirs(d / "llama-jax-test")
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "llama-jax tests", "language": "python"}
    (d / "llama-jax-test" / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(d)])


def kernel_env(scratch) -> dict:
    """This checkout first on the kernel's path; a plain single-device CPU runtime."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", TMPDIR=str(scratch))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, so the plots are drawn
    return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs_top_to_bottom(path, kernel_specs, tmp_path):
    name = os.path.basename(path)[:-len(".ipynb")]
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="llama-jax-test", kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(nb, km=km, timeout=BUDGET_S[name], allow_errors=False,
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    t = time.perf_counter()
    client.execute(env=kernel_env(tmp_path))
    seconds = time.perf_counter() - t
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs if o.output_type == "stream")
    assert f"llama_jax from {os.path.join(ROOT, 'llama_jax')}" in text, text[:2000]
    assert seconds < BUDGET_S[name], f"{name} took {seconds:.0f} s > {BUDGET_S[name]} s"
    print(f"{name}: {seconds:.0f} s")
