"""Torch in the test process computes on one thread. The tests' models are tiny (SmolLM2-135M, random Llamas of a few
MB), so a second OpenMP thread gains nothing, and on a 2-core box shared with the Ray processes the e2e tests start it
spins against them. Measured here: test_verify, test_torch_llama, test_prompt_logprobs, test_embedded and
test_sampling took 71 s (64 s CPU) on one thread and 83 s (111 s CPU) on two with the box quiet; test_verify's greedy
check alone 22 s against 119 s with the box busy. Serve's meshes get one thread already (mesh_num_cpus 1: Ray sets
OMP_NUM_THREADS)."""
import torch

torch.set_num_threads(1)
