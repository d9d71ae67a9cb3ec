"""The test session: torch on one thread, and `make test` split over two pytest-xdist workers.

Torch computes on one thread. The tests' models are tiny (SmolLM2-135M, random Llamas of a few MB), so a second
OpenMP thread gains nothing, and on a 2-core box shared with the Ray processes the e2e tests start it spins against
them. Measured here: test_verify, test_torch_llama, test_prompt_logprobs, test_embedded and test_sampling took 71 s
(64 s CPU) on one thread and 83 s (111 s CPU) on two with the box quiet; test_verify's greedy check alone 22 s against
119 s with the box busy. Serve's meshes get one thread already (mesh_num_cpus 1: Ray sets OMP_NUM_THREADS)."""
import collections
import glob
import os
import sys

import pytest
import torch

torch.set_num_threads(1)


E2E = "_e2e.py"  # a test module that starts Ray is named test_*_e2e.py
RAY_SESSIONS = "/tmp/ray/session_*_{pid}"  # ray.init's session directory ends in the pid of the process that started it
RAY_SEEN = pytest.StashKey[set[str]]()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs the suite on two pytest-xdist workers. Each module is one unit of work, so its module fixtures
    start once; the modules that start Ray (test_*_e2e.py) are one unit together, so two Rays never run at once (and a
    `ray stop --force` in one stops every Ray on the box) and each e2e test keeps a core. That unit (~40% of the
    suite's time) goes first, where it cannot be the last to finish: units go in collection order, not by size.
    A scheduler, not `--dist loadgroup` with xdist_group marks: pytest 9.2 ignores the node ids loadgroup rewrites
    (pytest-xdist issue 1386)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return E2E if module.endswith(E2E) else module

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The e2e modules first (see pytest_xdist_make_scheduler), those marked galaxy_cluster last among them; the
    rest keep their order. Each local Ray start that stayed silent here (one failed CI, its retry too:
    bench.local_serve.init_local_ray) was the first after a GalaxyCluster this process had driven; none comes after
    one now. Two items with one node id are an error: xdist hands out tests by id, and of 12 schemathesis items
    sharing one (pytest 9.2 drops the "[POST /v1/...]" part of the ids schemathesis gives) it ran one and reported
    11 fewer tests, not a failure."""
    counts = collections.Counter(item.nodeid for item in items)
    if shared := sorted(nodeid for nodeid, count in counts.items() if count > 1):
        raise pytest.UsageError(f"tests with the same node id (xdist would run one of each): {shared}")
    items.sort(key=lambda item: (not item.path.name.endswith(E2E), bool(item.get_closest_marker("galaxy_cluster"))))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[RAY_SEEN] = set(glob.glob(RAY_SESSIONS.format(pid=os.getpid())))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """A test outside test_*_e2e.py that starts Ray in this process is an error: beside the e2e unit it would run two
    Rays at once."""
    started = set(glob.glob(RAY_SESSIONS.format(pid=os.getpid()))) - item.stash[RAY_SEEN]
    if started and not item.path.name.endswith(E2E):
        raise RuntimeError(f"{item.nodeid} started Ray ({', '.join(sorted(started))}): move it into a test_*_e2e.py")


@pytest.fixture(scope="session", autouse=True)
def stray_requests_watched():
    """Every Router of a test in this process notes, after each mesh step it delivers, a request a mesh runs that it
    has not placed there (tests/in_process.py: `strays`, which nothing_held and `held` report). Checked only at the end,
    such a leak hid whenever the request ended by itself while nothing_held waited. Only where a collected module has
    imported the router (importing it costs seconds: Ray Serve)."""
    module = sys.modules.get("deployments.router")
    if module is None:
        yield
        return
    from tests.in_process import watch_deliveries
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.Router, "_deliver", watch_deliveries(module.Router._deliver))
        yield
