"""Builds the Serve application graph: Ingress -> Router -> mesh-0 .. mesh-N-1.

Each mesh is its own single-replica deployment, so the router's handle to `mesh-i` always reaches the
replica holding that mesh's KV cache (Serve handles otherwise pick a replica for you). Galaxies are not
autoscaled; the ingress is stateless and scales by `ingress_replicas`.
"""

from ray.serve import Application

from deployments.config import AppConfig, api_keys, check_model_files, check_model_len
from deployments.ingress import INGRESS_MAX_ONGOING_REQUESTS, Ingress
from deployments.mesh_replica import MeshReplica
from deployments.router import RouterDeployment
from model.checkpoint import resolve_model_dir


def build(args: AppConfig) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    model_dir = resolve_model_dir(config.model)  # here, so a missing model fails the build; each replica finds its own
    check_model_files(config, model_dir)  # and one whose files no replica could load
    if (too_long := check_model_len(config, model_dir)) is not None:
        raise ValueError(f"max_seq_len: {too_long}")
    keys = api_keys(config)  # here: the build sees Ray's environment, and each ingress replica gets the same
    mesh_options = {"num_cpus": config.mesh_num_cpus, "resources": config.mesh_resources}
    meshes = [MeshReplica.options(name=f"mesh-{i}", num_replicas=1, ray_actor_options=mesh_options)
              .bind(config.model_dump(exclude={"api_keys"})) for i in range(config.num_meshes)]  # the ingress's
    router = RouterDeployment.options(num_replicas=1).bind(meshes, {
        "prefill_chunk": config.prefill_chunk,
        "max_prefill_tokens": config.max_prefill_tokens or config.prefill_chunk,
        "decode_steps": config.decode_steps,
        "pipeline_depth": config.pipeline_depth,
        "max_waiting_requests": config.max_waiting_requests,
        "max_waiting_tokens": config.max_waiting_tokens,
        "stream_interval_ms": config.stream_interval_ms,
        "max_seq_len": config.max_seq_len,
        "step_deadline_factor": config.step_deadline_factor,
        "min_step_deadline_s": config.min_step_deadline_s,
        "no_mesh_wait_s": config.no_mesh_wait_s,
        "max_mesh_failures": config.max_mesh_failures,
        "enable_prefix_caching": config.enable_prefix_caching,
        "model_identity": config.model_identity,
        "log_requests": config.enable_log_requests,
    })
    # Each ingress replica takes its share of what the router holds (slots and queues; a quarter more for an uneven
    # spread): beyond its max_ongoing_requests Serve queues requests without bound, so the router's 429 never came.
    held = config.num_meshes * (config.max_waiting_requests + config.num_slots)
    ongoing = max(INGRESS_MAX_ONGOING_REQUESTS, -(-held * 5 // (4 * config.ingress_replicas)))
    return Ingress.options(num_replicas=config.ingress_replicas, max_ongoing_requests=ongoing,
                           ray_actor_options={"num_cpus": config.ingress_num_cpus}).bind(
        router, config.model, config.names, keys or None, config.max_request_bytes, config.metrics_open,
        config.allowed_origins, config.model_identity, enable_log_requests=config.enable_log_requests,
        sse_keep_alive_interval=config.sse_keep_alive_interval, no_mesh_wait_s=config.no_mesh_wait_s)
