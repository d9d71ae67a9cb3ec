"""bench.grammar_cost's CPU columns."""
import time

from bench.grammar_cost import THREAD_CPU, _count_thread_cpu


def test_a_call_is_counted_once_when_main_patches_again():
    """main() patches the runner's and the grammar's methods each time it runs, so a second main() in one process
    (an A/B script's second configuration) counted every call twice: its sampling column came out above the
    process's whole CPU. A call's thread CPU is counted once however often it is patched."""
    class Work:
        def run(self):
            start = time.thread_time()
            while time.thread_time() - start < 0.02:
                pass

    for _ in range(2):
        _count_thread_cpu(Work, "run", "sample")
    THREAD_CPU["sample"] = 0.0
    start = time.thread_time()
    Work().run()
    assert 0.02 <= THREAD_CPU["sample"] <= time.thread_time() - start
