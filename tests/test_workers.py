"""`make test`'s split over two xdist workers (tests/conftest.py): every module one unit of work, the modules that
start Ray one unit that runs first on one worker, and a test elsewhere that starts Ray is an error."""
import os
import re
from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
pytest_plugins = ["pytester"]

STARTS_RAY = """
import os, pathlib
def test_starts_ray():
    session = pathlib.Path(f"/tmp/ray/session_fake_for_a_test_{os.getpid()}")  # what ray.init leaves here
    session.mkdir(parents=True)
    session.rmdir()  # gone again: only a new session that stays is flagged
    session.mkdir()
"""


def test_the_e2e_modules_share_one_worker_and_go_first(pytester):
    pytester.makeconftest(CONFTEST)
    body = "import time\n" + "".join(f"def test_{i}():\n    time.sleep(0.2)\n" for i in range(3))
    pytester.makepyfile(test_a=body, test_b=body, test_c=body, test_x_e2e=body, test_y_e2e=body)
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=15)
    ran = re.findall(r"\[(gw\d)\].*?PASSED (test_\w+)\.py", result.stdout.str())
    by_module = {}
    for worker, module in ran:
        by_module.setdefault(module, set()).add(worker)
    assert all(len(workers) == 1 for workers in by_module.values()), by_module
    assert by_module["test_x_e2e"] == by_module["test_y_e2e"]
    e2e_worker = next(iter(by_module["test_x_e2e"]))
    on_it = [module for worker, module in ran if worker == e2e_worker]
    assert on_it[:6] == ["test_x_e2e"] * 3 + ["test_y_e2e"] * 3


def test_the_e2e_modules_that_drive_a_galaxy_cluster_go_last_among_them(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini('[pytest]\nmarkers =\n    galaxy_cluster: drives a GalaxyCluster\n')
    body = "def test_0():\n    pass\n"
    cluster = "import pytest\npytestmark = pytest.mark.galaxy_cluster\n" + body
    pytester.makepyfile(test_a_e2e=cluster, test_b_e2e=body, test_c=body, test_d_e2e=body)
    result = pytester.runpytest_subprocess("-n", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    ran = re.findall(r"\[gw\d\].*?PASSED (test_\w+_e2e)\.py", result.stdout.str())
    assert ran == ["test_b_e2e", "test_d_e2e", "test_a_e2e"]


@pytest.mark.parametrize("module, errors", [("test_quick", 1), ("test_quick_e2e", 0)])
def test_only_an_e2e_module_may_start_ray(pytester, module, errors):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{module: STARTS_RAY})
    try:
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    finally:
        os.rmdir(f"/tmp/ray/session_fake_for_a_test_{os.getpid()}")
    result.assert_outcomes(passed=1, errors=errors)
    if errors:
        result.stdout.fnmatch_lines(["*test_quick.py::test_starts_ray started Ray*move it into a test_*_e2e.py*"])


def test_two_tests_with_one_node_id_stop_the_run(pytester):
    """xdist hands out tests by node id: of two with one id it would run one, and report one test fewer."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_quick="def test_one():\n    pass\n")
    pytester.makepyfile(twice="""
import pytest
def pytest_pycollect_makeitem(collector, name, obj):
    if name == "test_one":  # two items, one id: what schemathesis's per-route items are on pytest 9.2
        return [pytest.Function.from_parent(collector, name=name, callobj=obj) for _ in range(2)]
""")
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "twice")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*same node id*test_quick.py::test_one*"])
