"""Dependencies flow one way (docs/DESIGN.md): the engine core, the router and the ingress never load torch."""
import re
import subprocess
import sys
from pathlib import Path


def test_core_router_and_ingress_import_no_torch():
    code = ("import scheduler.scheduler, deployments.router, deployments.ingress; import sys; "
            "print(sorted(m for m in ('torch', 'model.torch_llama', 'model.tt_galaxy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_engine_core_imports_neither_model_nor_ray():
    code = "import scheduler.scheduler, scheduler.bench; import sys; print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('model', 'ray', 'deployments')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ttnn_is_an_unpinned_optional_extra():
    """ttnn must be the one built from the tt-metal checkout whose models/ the Galaxy backend runs (README, Running on
    a Galaxy): a pinned PyPI ttnn, installed into that checkout's python_env, replaced its build with one made from
    another commit. Unpinned, in the `tt` extra only, the checkout's build satisfies it."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lines = [line for line in pyproject.splitlines() if re.search(r"\bttnn\b", line) and not line.startswith("#")]
    assert lines == ["tt = [\"ttnn; python_version == '3.10' or python_version == '3.12'\"]"]  # the extra only
