"""A wrong serve_config.yaml fails at deploy time with a message naming the key."""
import errno
import re
import socket
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppConfig, check_serve_config

ROOT = Path(__file__).resolve().parents[1]
GALAXY = {"backend": "tt_galaxy", "model": "", "mesh_resources": {"galaxy": 1}}


@pytest.mark.parametrize("args,key", [
    ({"num_mesh": 2}, "num_mesh"),
    ({"backend": "gpu"}, "backend"),
    ({"prefill_chunk": 100}, "prefill_chunk"),
    ({"backend": "torch", "prefill_chunk": 192}, "prefill_chunk"),  # a multiple of torch's 64-token block, not of 128
    ({"override_tt_config": {"fabric": "FABRIC_1D"}}, "override_tt_config.fabric"),
    ({"override_tt_config": {"fabric_config": "RING"}}, "override_tt_config.fabric_config"),
    ({"decode_steps": 0}, "decode_steps"),
])
def test_wrong_config_names_the_key(args, key):
    with pytest.raises(ValidationError) as err:
        AppConfig(**args)
    assert key in str(err.value)


@pytest.mark.parametrize("key, refused, taken, args", [
    ("num_meshes", 0, 1, {}),  # an application with no mesh: every request a 503
    ("ingress_replicas", 0, 1, {}),  # no HTTP front at all
    ("max_seq_len", 1, 2, {}),  # no room for a prompt token and an answer token
    ("max_prefill_tokens", 127, 128, {}),
    ("decode_steps", 129, 128, {}),
    ("pipeline_depth", 5, 4, {}),
    ("no_mesh_wait_s", -1.0, 0.0, {}),
    ("max_request_bytes", 1023, 1024, {}),
    ("time_scale", 0.0, 0.001, {"backend": "simulated"}),
    ("num_layers", 0, 1, GALAXY),
    ("num_layers", 81, 80, GALAXY),  # Llama 3 70B's 80 layers
    ("min_step_deadline_s", 0.99, 1.0, {}),
    ("stream_interval_ms", 1000.5, 1000.0, {}),
    ("prefill_chunk", 127, 128, {}),
    ("num_slots", 257, 256, {"backend": "torch"}),
])
def test_each_bounded_key_is_refused_just_past_its_bound_and_taken_at_it(key, refused, taken, args):
    """The bounds README's table and the key descriptions give: one step past is a typo, refused at deploy naming the
    key; the bound itself is a config someone may need."""
    with pytest.raises(ValidationError, match=key):
        AppConfig(**args, **{key: refused})
    assert getattr(AppConfig(**args, **{key: taken}), key) == taken


@pytest.mark.parametrize("args, key", [
    ({"backend": "torch", "block_size": 48}, "block_size"),  # 4096 is no multiple of 48
    ({"backend": "simulated", "block_size": 256}, "block_size"),  # a block past the Galaxy's 128-token alignment
    ({"backend": "torch", "block_size": 256, "max_prefill_tokens": 128}, "max_prefill_tokens"),
])
def test_blocks_and_chunks_the_mesh_scheduler_cannot_align_fail_at_deploy(args, key):
    """Accepted here, they failed only when the router built each mesh's scheduler: every mesh "cannot be
    scheduled", /health 503 and every request a 503, for good."""
    with pytest.raises(ValidationError, match=key):
        AppConfig(**args)
    AppConfig(**{**args, key: {"block_size": 64, "max_prefill_tokens": 256}[key]})


@pytest.mark.parametrize("backend", ["torch", "simulated"])
def test_a_max_seq_len_its_blocks_cannot_hold_fails_at_deploy(backend):
    """`num_blocks: 8` beside the shipped `max_seq_len: 8192` served a 512-token context: the router serves what one
    KV group holds and cut the length asked for to it without a word. Both given, it is refused, as on a Galaxy (and
    as vLLM refuses a max_model_len its KV cache cannot hold); one alone is still the longest that fits."""
    with pytest.raises(ValidationError, match="num_blocks: 8 blocks of 64 tokens hold 512 tokens, fewer than "
                                              "max_seq_len \\(8192\\): give at least 128"):
        AppConfig(backend=backend, num_blocks=8, max_seq_len=8192)
    assert AppConfig(backend=backend, num_blocks=128, max_seq_len=8192).num_blocks == 128
    # a length between blocks needs the block it starts: the least it names is taken, one fewer is not
    with pytest.raises(ValidationError, match="hold 8064 tokens, fewer than max_seq_len \\(8100\\): give at least 127"):
        AppConfig(backend=backend, num_blocks=126, max_seq_len=8100)
    assert AppConfig(backend=backend, num_blocks=127, max_seq_len=8100).num_blocks == 127
    assert AppConfig(backend=backend, num_blocks=8).max_seq_len is None


def test_a_galaxys_blocks_too_few_for_max_seq_len_are_named_by_its_own_rule():
    """A Galaxy column's cache holds max_seq_len + 128 tokens, block 0 spare: for 8192 it needs 129 blocks of 64, so
    the torch and simulated rule's "give at least 128" would send a user to a second refusal."""
    for blocks in (100, 128):
        with pytest.raises(ValidationError, match=f"num_blocks {blocks} is too few for max_seq_len 8192: a column's "
                                                  "cache must hold 8320 tokens") as err:
            AppConfig(**GALAXY, num_blocks=blocks, max_seq_len=8192)
        assert "give at least" not in str(err.value)
    assert AppConfig(**GALAXY, num_blocks=129, max_seq_len=8192).num_blocks == 129


@pytest.mark.parametrize("args,key", [
    ({"mesh_shape": [4, 8]}, "mesh_shape"),
    ({"max_seq_len": 100_000}, "max_seq_len"),
    ({"max_seq_len": 262_144, "num_blocks": 4200}, "max_seq_len"),  # past Llama-3.3-70B's 128k context
    ({"max_seq_len": 131_072, "num_blocks": 2048}, "num_blocks"),  # 128k, but not the warm-up's 128 more
    ({"num_slots": 16}, "num_slots"),  # tt-metal's decode trace and sampler are fixed at 32 users
    ({"prefill_chunk": 16384}, "prefill_chunk"),  # recomputed from position 0 after a cached prefix
    ({"block_size": 32}, "block_size"),  # the model's paged KV cache is 64 tokens a block: was accepted, failed in ttnn
    ({"block_size": 128}, "block_size"),
])
def test_a_galaxy_config_the_model_cannot_run_fails_at_deploy(args, key):
    """Checked by the same rule as the backend's (model.galaxy.galaxy_sizes), before any replica starts."""
    AppConfig(backend="simulated", **{k: v for k, v in args.items() if k != "mesh_shape"})  # a Galaxy's limits
    with pytest.raises(ValidationError, match=key):
        AppConfig(backend="tt_galaxy", model="", **args)


@pytest.mark.parametrize("args, match", [
    ({"backend": "simulated", "kv_groups": 3}, "num_slots \\(32\\) must split evenly over kv_groups \\(3"),
    ({"backend": "simulated", "num_slots": 30}, "must split evenly over kv_groups \\(4"),
    ({"backend": "simulated", "num_slots": 1024}, "(?s)num_slots.*less than or equal to 256"),  # was accepted
    ({"backend": "torch", "num_slots": 100_000}, "(?s)num_slots.*less than or equal to 256"),
    ({"backend": "simulated", "num_slots": 256, "kv_groups": 512}, "must split evenly over kv_groups \\(512"),
    ({"mesh_resources": {"CPU": 1}}, "(?s)mesh_resources.*set mesh_num_cpus"),
    ({"mesh_resources": {"GPU": 1}}, "(?s)mesh_resources.*a mesh uses no GPU"),
    ({"mesh_resources": {"galaxy": -1}}, "(?s)mesh_resources.*>= 0"),
    ({"stream_interval_ms": float("inf")}, "stream_interval_ms"),  # its flush timer never fired: streams stopped
    ({"stream_interval_ms": 5000}, "stream_interval_ms"),
    ({"mesh_num_cpus": float("inf")}, "mesh_num_cpus"),
    ({"api_keys": ["sk-1\n"]}, "(?s)api_keys.*whitespace"),  # a YAML | block: HTTP strips it, no request matched
    ({"api_keys": ["sk-1 "]}, "(?s)api_keys.*whitespace"),
    ({"api_keys": ["sk-1\nsk-2"]}, "(?s)api_keys.*control character"),  # a YAML |- block of two lines
    ({"api_keys": ["sk-1\x7f2"]}, "(?s)api_keys.*control character"),  # DEL: a header cannot carry it either
    ({"backend": "torch", "time_scale": 0.5}, "time_scale applies to the simulated backend only"),
    ({"backend": "torch", "num_layers": 2}, "num_layers applies to the tt_galaxy backend only"),
    ({"backend": "torch", "mesh_shape": [2, 2]}, "mesh_shape applies to the tt_galaxy backend only"),
    ({"backend": "simulated", "dtype": "bfloat16"}, "dtype applies to the torch backend only"),
    ({"backend": "simulated", "override_tt_config": {"trace_region_size": 1}}, "override_tt_config applies"),
    ({"num_slots": "32"}, "num_slots"),  # YAML types numbers and booleans: a string or a bool here is a mistake
    ({"num_meshes": True}, "num_meshes"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching"),
    ({"mesh_num_cpus": True}, "mesh_num_cpus"),
    ({"mesh_resources": {"galaxy": "1"}}, "mesh_resources.galaxy"),  # were taken as 1.0: the nested numbers were lax
    ({"mesh_resources": {"galaxy": True}}, "mesh_resources.galaxy"),
    ({**GALAXY, "mesh_shape": ["8", 4]}, "mesh_shape"),
    ({**GALAXY, "mesh_shape": [8.0, 4.0]}, "mesh_shape"),
    ({**GALAXY, "override_tt_config": {"enable_model_warmup": "off"}}, "override_tt_config.enable_model_warmup"),
    ({**GALAXY, "override_tt_config": {"overlap_decode": "no"}}, "override_tt_config.overlap_decode"),
    ({**GALAXY, "override_tt_config": {"worker_l1_size": "1344544"}}, "override_tt_config.worker_l1_size"),
    ({**GALAXY, "override_tt_config": {"trace_region_size": 2.0e8}}, "override_tt_config.trace_region_size"),
    ({**GALAXY, "override_tt_config": {"line_rs": 1}}, "override_tt_config.line_rs"),
    # were taken, for ttnn to refuse in each mesh replica once its weights had loaded
    ({**GALAXY, "override_tt_config": {"worker_l1_size": -1}}, "(?s)override_tt_config.worker_l1_size.*greater than 0"),
    ({**GALAXY, "override_tt_config": {"trace_region_size": 0}}, "(?s)override_tt_config.trace_region_size.*greater"),
    ({**GALAXY, "num_layers": 81}, "num_layers: at most 80"),  # past the checkpoint's: tt-metal's model failed to load
    # passed the check, then Ray refused them in the build, after Ray had started, naming num_cpus or the resource
    ({"mesh_num_cpus": 0.00001}, "(?s)mesh_num_cpus.*0.0001"),
    ({"ingress_num_cpus": 0.00005}, "(?s)ingress_num_cpus.*0.0001"),
    ({"mesh_resources": {"galaxy": 0.00001}}, "(?s)mesh_resources.*galaxy.*0.0001"),
    ({"mesh_resources": {"memory": 2**30}}, "(?s)mesh_resources.*memory is not a custom resource"),
    ({"mesh_resources": {"object_store_memory": 2**30}}, "(?s)mesh_resources.*object_store_memory is not a custom"),
    # a browser's Origin is scheme://host[:port], lower-case: CORS compares it whole, so these never matched one
    ({"allowed_origins": ["https://app.example/"]}, "(?s)allowed_origins.*'https://app.example/'"),
    ({"allowed_origins": ["app.example"]}, "(?s)allowed_origins.*'app.example'"),
    ({"allowed_origins": ["https://App.example"]}, "(?s)allowed_origins.*'https://App.example'"),
])
def test_a_config_that_would_fail_every_replica_or_be_ignored_fails_at_deploy(args, match):
    """Each passed the check and the build, then failed in every mesh replica (kv_groups, resources), stopped
    every stream after its first token (an infinite flush interval), refused every key, or was silently ignored."""
    with pytest.raises(ValidationError, match=match):
        AppConfig(**args)


@pytest.mark.parametrize("resources", [{}, {"galaxy": 0.5}, {"frontend": 0.01}])
def test_a_galaxy_config_that_could_open_one_mesh_twice_is_refused(resources):
    """A tt_galaxy mesh replica opens every chip of its host. Without a whole unit of a resource that each Galaxy host
    advertises once, Ray could place two meshes (or a restarted replica beside the one it replaces) on one host, both
    opening its mesh: accepted, the mesh landed by CPUs alone."""
    with pytest.raises(ValidationError, match="(?s)mesh_resources.*each Galaxy host advertises once"):
        AppConfig(backend="tt_galaxy", model="", num_meshes=2, mesh_resources=resources)
    AppConfig(backend="tt_galaxy", model="", num_meshes=2, mesh_resources={**resources, "galaxy": 1})


def test_allowed_origins_take_what_a_browser_sends():
    origins = ["*", "https://app.example", "http://localhost:3000", "http://[::1]:8080", "null"]
    assert AppConfig(allowed_origins=origins).allowed_origins == origins


@pytest.mark.parametrize("origin", ["https://*.app.example", "https://app.example:443", "http://localhost:80",
                                    "https://bücher.example"])
def test_allowed_origins_refuse_a_wildcard_or_a_default_port(origin):
    """CORS takes `*` alone, not in a host (Starlette compares the rest whole), and a browser leaves out the
    scheme's default port and sends a host in its ASCII form (https://xn--bcher-kva.example): each passed the check
    and every browser call from the site was refused."""
    with pytest.raises(ValidationError, match="no origin a browser sends"):
        AppConfig(allowed_origins=[origin])


def test_a_float_key_takes_an_int_and_a_pair_a_list():
    config = AppConfig(backend="simulated", time_scale=1, stream_interval_ms=5, mesh_num_cpus=2)
    assert (config.time_scale, config.stream_interval_ms, config.mesh_num_cpus) == (1.0, 5.0, 2.0)
    galaxy = AppConfig(backend="tt_galaxy", model="", mesh_shape=[8, 4], mesh_resources={"galaxy": 1})
    assert galaxy.mesh_shape == (8, 4)


def test_the_torch_backend_refuses_a_length_past_the_models_context(tmp_path):
    """SmolLM2's max_position_embeddings is 8192: 32k was advertised and served. The build refuses it (as vLLM
    refuses such a max_model_len), and so does the config check."""
    from deployments.app import build
    from deployments.config import check_serve_config

    with pytest.raises(ValueError, match="max_seq_len: 32768 is beyond the model's context \\(8192"):
        build(AppConfig(max_seq_len=32768))
    app = {"name": "m", "import_path": "deployments.app.build", "args": {"max_seq_len": 32768}}  # Ray's dotted form
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', args.max_seq_len: 32768 is beyond")
    app["args"]["max_seq_len"] = 8192
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == []


@pytest.mark.parametrize("runtime_env", ["hello", {"env_vars": ["HF_MODEL"]}, {"env_vars": {"HF_MODEL": 5}}])
def test_a_malformed_runtime_env_is_named_not_a_traceback(tmp_path, runtime_env):
    from deployments.config import check_serve_config

    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": ""}, "runtime_env": runtime_env}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == [f"{path}: application 'm', runtime_env.env_vars: a mapping of variable "
                                             "names to strings (quote numbers)"]


def test_a_misspelt_key_names_the_key_it_likely_meant(tmp_path):
    """`decode_step: 4` (for decode_steps) was only "Extra inputs are not permitted": the check names the near key,
    and leaves a key like none as it was. A key about as near two (`step_deadline`) names both: it named only
    min_step_deadline_s, seconds, to a user who may have meant step_deadline_factor."""
    args = {"backend": "simulated", "decode_step": 4, "max_seq_length": 4096, "bogus_key": 1, "step_deadline": 3}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "m", "import_path": "deployments.app:build",
                                                      "args": args}]}))
    assert sorted(check_serve_config(str(path))) == [
        f"{path}: application 'm', args.bogus_key: Extra inputs are not permitted",
        f"{path}: application 'm', args.decode_step: Extra inputs are not permitted (did you mean decode_steps?)",
        f"{path}: application 'm', args.max_seq_length: Extra inputs are not permitted (did you mean max_seq_len?)",
        f"{path}: application 'm', args.step_deadline: Extra inputs are not permitted (did you mean min_step_deadline_s "
        "or step_deadline_factor?)"]


def test_a_config_the_backend_would_ignore_or_misread_is_refused():
    """The embedded SmolLM2 is no weights for tt-metal's Llama-3 70B model (the key left out meant it), and only
    the simulated backend has a kv_groups setting: both were taken silently."""
    with pytest.raises(ValidationError, match="model: the tt_galaxy backend runs"):
        AppConfig(backend="tt_galaxy")
    # a bare `model:` in YAML: the demo's variables
    assert AppConfig(backend="tt_galaxy", model=None, mesh_resources={"galaxy": 1}).model is None
    for backend in ("torch", "tt_galaxy"):
        with pytest.raises(ValidationError, match="kv_groups applies to the simulated backend only, not " + backend):
            AppConfig(backend=backend, model="/w", kv_groups=2)
    assert AppConfig(backend="simulated", kv_groups=2).kv_groups == 2


def test_the_served_names_are_vllms_and_the_short_one(monkeypatch):
    """A hub id is answered by its last part and accepted whole (vLLM serves it whole); served_model_name takes
    one name or several, the first answered; an empty model is named by the demo's variable."""
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.setenv("HF_MODEL", "meta-llama/Llama-3.3-70B-Instruct")
    assert AppConfig(model="").names == AppConfig(model=None).names == [
        "Llama-3.3-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"]
    assert AppConfig(model="/models/Llama-3.3-70B-Instruct/").names == [
        "Llama-3.3-70B-Instruct", "/models/Llama-3.3-70B-Instruct/"]
    assert AppConfig().names == ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    # the folder `hf download` prints: a snapshot of the local hub cache, whose last part is a commit hash
    snapshot = f"~/.cache/huggingface/hub/models--meta-llama--Llama-3.3-70B-Instruct/snapshots/{'6f' * 20}/"
    assert AppConfig(model=snapshot).names == ["Llama-3.3-70B-Instruct", snapshot]
    relative = f"models--meta-llama--Llama-3.3-70B-Instruct/snapshots/{'6f' * 20}"  # given from inside the hub cache
    assert AppConfig(model=relative).names == ["Llama-3.3-70B-Instruct", relative]
    assert AppConfig(served_model_name="llama").names == ["llama"]
    assert AppConfig(served_model_name=["llama", "gpt-4o", "llama"]).name == "llama"
    assert AppConfig(served_model_name=["llama", "gpt-4o", "llama"]).names == ["llama", "gpt-4o"]
    for blank in ("", " ", [], ["llama", ""]):
        with pytest.raises(ValidationError, match="served_model_name"):
            AppConfig(served_model_name=blank)


@pytest.mark.parametrize("max_seq_len, num_blocks, expected", [
    (None, None, (131_072, 2056)),  # tt_worker.py's per-rank pool
    (4096, None, (4096, 72)),
    (None, 1024, (32_768, 1024)),  # 1,025 blocks hold 65,600 tokens: short of 65,536 + 128
    (None, 2055, (131_072, 2055)),
])
def test_galaxy_sizes_default_and_fit(max_seq_len, num_blocks, expected):
    from model.galaxy import galaxy_sizes
    assert galaxy_sizes((8, 4), max_seq_len, num_blocks, 64) == expected


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.simulated.yaml", "serve_config.galaxy.yaml"])
def test_shipped_configs_validate_and_survive_the_trip_to_replicas(name):
    args = yaml.safe_load((ROOT / name).read_text())["applications"][0]["args"]
    config = AppConfig(**args)
    assert AppConfig(**config.model_dump()) == config  # replicas rebuild it from the dumped dict


def test_make_serve_checks_the_config_file_before_serve_runs_it(tmp_path):
    """`serve run` retries a failing build and then waits on without exiting: the check stops first, naming
    each wrong key, and passes every shipped config."""
    import subprocess
    import sys

    def check(*paths):
        return subprocess.run([sys.executable, "-m", "deployments.config", *map(str, paths)], cwd=ROOT,
                              capture_output=True, text=True)

    def bad(name, **wrong):
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        config["applications"][0]["args"].update(wrong)
        (tmp_path / name).write_text(yaml.safe_dump(config))
        return tmp_path / name

    ok = check(*(ROOT / n for n in ("serve_config.yaml", "serve_config.simulated.yaml")))
    assert (ok.returncode, ok.stderr.strip()) == (0, "")
    galaxy = check(ROOT / "serve_config.galaxy.yaml")  # valid, but its weights are on Galaxy hosts only
    assert galaxy.returncode == 2 and galaxy.stderr.strip() == (
        f"{ROOT}/serve_config.galaxy.yaml: application 'meshserve', args.model: '/models/Llama-3.3-70B-Instruct' "
        "is neither a directory nor a Hugging Face model in the local cache (nothing is downloaded at run time: "
        "fetch it first, e.g. `hf download`)")
    missing = check(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "No such file" in missing.stderr and "Traceback" not in missing.stderr
    hub = check(bad("hub.yaml", model="meta-llama/Llama-3.3-70B-Instruct"))  # not in the cache: named, no fetch
    assert hub.returncode == 2 and "args.model: 'meta-llama/Llama-3.3-70B-Instruct' is neither" in hub.stderr
    out = check(bad("keys.yaml", num_meshes=0, bogus_key=3), bad("chunk.yaml", prefill_chunk=200))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{tmp_path}/keys.yaml: application 'meshserve', args.num_meshes: Input should be greater than or equal to 1",
        f"{tmp_path}/keys.yaml: application 'meshserve', args.bogus_key: Extra inputs are not permitted",
        f"{tmp_path}/chunk.yaml: application 'meshserve', args: prefill_chunk must be a multiple of 128 "
        "(the Galaxy model's prefill alignment)"]

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"port": 99999}  # Serve refuses it only once Ray is up
    config["applications"].append({**config["applications"][0], "name": "typo", "import_path": "deployments.app:buld",
                                   "route_prefix": "/typo"})
    (tmp_path / "port.yaml").write_text(yaml.safe_dump(config))
    port = check(tmp_path / "port.yaml")
    assert port.returncode == 2 and port.stderr.splitlines()[0] == \
        f"{tmp_path}/port.yaml: http_options.port: a TCP port, 1 to 65535, not 99999"
    config["http_options"] = {"port": "8001"}  # Serve reads it as 8001: no error; a bad key beside a bad port is named
    config["applications"][0]["args"]["num_slots"] = "32"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(config))
    assert check(tmp_path / "both.yaml").stderr.splitlines()[0] == \
        f"{tmp_path}/both.yaml: application 'meshserve', args.num_slots: Input should be a valid integer"
    config["http_options"] = {"port": 0}
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(config))
    assert check(tmp_path / "both.yaml").stderr.splitlines()[:2] == [
        f"{tmp_path}/both.yaml: http_options.port: a TCP port, 1 to 65535, not 0",
        f"{tmp_path}/both.yaml: application 'meshserve', args.num_slots: Input should be a valid integer"]
    del config["http_options"]
    config["applications"][0]["args"]["num_slots"] = 32
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    typo = check(tmp_path / "typo.yaml")  # checked as far as it is meshserve's; the other named, not silently passed
    assert (typo.returncode, typo.stderr.strip()) == (0, f"note: {tmp_path}/typo.yaml: application 'typo': import_path "
                                                         "'deployments.app:buld' is not meshserve's "
                                                         "(deployments.app:build): not checked")
    helped = check("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage:") and not helped.stderr
    assert check("--bogus", ROOT / "serve_config.yaml").returncode == 2


def test_model_is_a_folder_a_cached_hub_id_or_the_demos_variables(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from model.checkpoint import resolve_model_dir

    monkeypatch.delenv("HF_MODEL", raising=False)
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="neither HF_MODEL nor LLAMA_DIR"):
        resolve_model_dir("")
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path))
    assert resolve_model_dir("") == resolve_model_dir(None) == tmp_path
    monkeypatch.delenv("LLAMA_DIR")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_MODEL", "org/m")
    assert resolve_model_dir("") == snapshot
    assert resolve_model_dir("org/m") == snapshot
    with pytest.raises(ValueError, match="model: 'org/other' is neither"):
        resolve_model_dir("org/other")


@pytest.mark.parametrize("keys", [[""], ["sk-1", "  "]])
def test_a_blank_api_key_is_refused(keys):
    """`Authorization: Bearer ` with nothing after it would match it: a templated key left empty opened the API."""
    with pytest.raises(ValueError, match="api_keys"):
        AppConfig(api_keys=keys)
    assert AppConfig(api_keys=["sk-1"]).api_keys == ["sk-1"]
    assert AppConfig(api_keys=["my key"]).api_keys == ["my key"]  # inner spaces reach the server intact


@pytest.mark.parametrize("args", [
    {"api_keys": ["sk-secret-1", "sk-secret-2 "]},  # a pasted key's trailing space
    {"api_keys": "sk-secret-1"},  # one key, not a list
    {"api_key": "sk-secret-1"},  # vLLM's flag's name
    {"api_keys": ["sk-secret-1"], "backend": "simulated", "num_slots": 33},  # a rule between keys: every arg
])
def test_a_wrong_config_does_not_show_the_api_keys(args):
    """Serve puts a failed build's error in `serve status`, its logs and the dashboard: pydantic's names each
    wrong value, and a rule between keys names them all."""
    from deployments.app import build

    with pytest.raises(ValidationError) as err:
        build(args)
    assert "sk-secret" not in str(err.value)


def test_the_key_may_come_from_vllms_variable_and_stay_out_of_the_args(monkeypatch, tmp_path):
    """Serve logs an application's args at each deploy ("Importing application 'meshserve' with arguments {...}"
    in logs/serve/controller_build_*.log): a key in the config lies in plain text in Ray's logs. vLLM's
    VLLM_API_KEY, as the build sees it, keeps it out; the config's keys come first, as vLLM's --api-key does."""
    from deployments.app import build
    from deployments.config import check_serve_config

    def ingress_keys(config: AppConfig):
        return build(config)._bound_deployment.init_args[3]

    monkeypatch.setenv("VLLM_API_KEY", "sk-from-env")
    assert ingress_keys(AppConfig()) == ["sk-from-env"]
    assert ingress_keys(AppConfig(api_keys=["sk-1"])) == ["sk-1"]
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert ingress_keys(AppConfig()) is None  # empty: no auth, as vLLM
    monkeypatch.setenv("VLLM_API_KEY", "sk-pasted ")  # could never match: refused at deploy, as in the config
    with pytest.raises(ValueError, match="VLLM_API_KEY") as err:
        build(AppConfig())
    assert "sk-pasted" not in str(err.value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "m", "import_path": "deployments.app:build"}]}))
    assert [e for e in check_serve_config(str(path)) if "VLLM_API_KEY" in e]


def test_only_the_ingress_holds_the_api_keys():
    """The meshes and the router check no key: their replicas' init args (kept by Serve and Ray for restarts) hold
    none, so a key leaks from no process but the one that needs it."""
    import pickle

    from deployments.app import build

    ingress = build(AppConfig(api_keys=["sk-secret-1"]))._bound_deployment
    router = ingress.init_args[0]._bound_deployment
    others = [router.init_args[1], *(mesh._bound_deployment.init_args for mesh in router.init_args[0])]
    assert ingress.init_args[3] == ["sk-secret-1"]
    assert all(b"sk-secret-1" not in pickle.dumps(args) for args in others)


def _write_llama_config(folder) -> None:
    """A tiny HF model with a tokenizer: the torch backend's check reads its config, tensor headers and tokenizer."""
    from model.verify import SHORT_CONTEXT_ROPE, save_byte_tokenizer, save_tiny_hf_model

    save_tiny_hf_model(folder, SHORT_CONTEXT_ROPE)
    save_byte_tokenizer(folder)


def test_the_config_check_sees_the_variables_the_build_sees(monkeypatch, tmp_path):
    """Serve builds the app in a Ray task, whose environment is `ray start`'s plus the app's runtime_env
    env_vars: the check reads the same, so HF_MODEL / LLAMA_DIR given in the config pass it."""
    from deployments.config import check_serve_config

    monkeypatch.delenv("HF_MODEL", raising=False)
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": ""}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == [
        f"{path}: application 'm', args.model: none given, and neither HF_MODEL nor LLAMA_DIR is set"]
    app["runtime_env"] = {"env_vars": {"LLAMA_DIR": str(tmp_path)}}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    _write_llama_config(tmp_path)
    assert check_serve_config(str(path)) == []


@pytest.mark.parametrize("text", ["applications: {a: 1}\n", "- 1\n", "applications:\n- 1\n", "applications: 3\n", ""])
def test_a_file_that_is_no_serve_config_is_named_not_a_traceback(tmp_path, text):
    from deployments.config import check_serve_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert check_serve_config(str(path)) == [
        f"{path}: not a Serve config: `applications` must be a list of applications, each a mapping "
        "(name, import_path, args)"]


def test_the_config_check_without_a_file_says_how_to_call_it():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "deployments.config"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("usage: python -m deployments.config")


def test_a_model_variable_from_this_shell_only_passes_with_a_note(monkeypatch, tmp_path):
    """`serve deploy` builds in Ray, whose environment is `ray start`'s: a variable set only in the shell that runs
    the check may not be there."""
    from deployments.config import check_serve_config

    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.setenv("HF_MODEL", str(tmp_path))
    _write_llama_config(tmp_path)
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": ""}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    notes: list[str] = []
    assert check_serve_config(str(path), notes) == [] and len(notes) == 1
    assert "takes its model from HF_MODEL in this shell" in notes[0] and "runtime_env.env_vars" in notes[0]
    app["runtime_env"] = {"env_vars": {"HF_MODEL": str(tmp_path)}}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    notes.clear()
    assert check_serve_config(str(path), notes) == [] and notes == []


def shipped_config_serving_at(tmp_path, host: str, port: int) -> tuple[dict, Path]:
    """serve_config.yaml with http_options on `host`:`port`, written to tmp_path/c.yaml."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": host, "port": port}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


def test_make_serve_names_a_taken_http_port_before_starting_ray(tmp_path):
    """`serve run` with port 8000 taken started Ray and Serve and failed a minute later, the cause deep in a
    traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config, path = shipped_config_serving_at(tmp_path, "127.0.0.1", port)
        taken = subprocess.run([sys.executable, "-m", "deployments.config", "--port-free", str(path)], cwd=ROOT,
                               capture_output=True, text=True)
        plain = subprocess.run([sys.executable, "-m", "deployments.config", str(path)], cwd=ROOT,
                               capture_output=True, text=True)  # `serve deploy` to a running Serve: its port
    assert taken.returncode == 2 and f"127.0.0.1:{port} cannot be bound" in taken.stderr
    assert "Traceback" not in taken.stderr and plain.returncode == 0
    free = subprocess.run([sys.executable, "-m", "deployments.config", "--port-free", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert free.returncode == 0


def test_make_serve_names_an_http_host_that_is_not_this_machines(tmp_path):
    """A host no interface here has was said to be a port "cannot be bound (Cannot assign requested address): stop
    what holds it (another `make serve`?) or set another http_options.port": nothing held it, and no port helps."""
    _, path = shipped_config_serving_at(tmp_path, "192.0.2.1", 8000)  # TEST-NET-1: never this machine's
    (problem,) = check_serve_config(str(path), port_free=True)
    assert problem.startswith(f"{path}: http_options.host: 192.0.2.1 is no address of this machine")
    assert "another `make serve`" not in problem


def test_make_serve_checks_an_ipv6_http_host_on_ipv6(tmp_path):
    """`http_options.host: "::"` (or "::1"), which Serve binds, was checked on an IPv4 socket: `make serve` refused
    every such config, free port or not, as "cannot be bound (Address family for hostname not supported): stop what
    holds it (another `make serve`?)"."""
    import socket

    try:
        holder = socket.socket(socket.AF_INET6)
        holder.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with holder:
        holder.listen()
        port = holder.getsockname()[1]
        config, path = shipped_config_serving_at(tmp_path, "::1", port)
        assert check_serve_config(str(path), port_free=True) == [
            f"{path}: http_options: ::1:{port} cannot be bound (Address already in use): stop what holds it (another "
            "`make serve`?) or set another http_options.port"]
    assert check_serve_config(str(path), port_free=True) == []
    config["http_options"]["host"] = "::"
    path.write_text(yaml.safe_dump(config))
    assert check_serve_config(str(path), port_free=True) == []


_SOCKET = socket.socket


class _NoIPv6:
    """socket.socket on a kernel with IPv6 off (ipv6.disable=1): an AF_INET6 socket cannot even be made."""

    def __new__(cls, family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return _SOCKET(family, *args, **kwargs)


class _Unprivileged(socket.socket):
    """socket.socket for a user without root: ports below 1024 are refused."""

    def bind(self, address):
        if address[1] < 1024:
            raise PermissionError(errno.EACCES, "Permission denied")
        return super().bind(address)


@pytest.mark.parametrize("host, port, fake, expected", [
    # the check's own socket(AF_INET6) raised outside its try: a traceback
    ("::", 8000, _NoIPv6, "http_options.host: :: is an IPv6 address and this machine has no IPv6 (Address family not "
                          "supported by protocol): give 0.0.0.0, or one of its IPv4 addresses"),
    # was "cannot be bound (Permission denied): stop what holds it (another `make serve`?)": nothing holds it
    ("127.0.0.1", 80, _Unprivileged, "http_options.port: 80 needs root here (Permission denied): set a port of 1024 "
                                     "or more, or give the server the right to bind it (CAP_NET_BIND_SERVICE)")])
def test_make_serve_names_an_http_address_this_machine_cannot_bind_for_any_holder(tmp_path, monkeypatch, host, port,
                                                                                  fake, expected):
    """An IPv6 host on a kernel without IPv6, a port below 1024 without root: said as what they are."""
    _, path = shipped_config_serving_at(tmp_path, host, port)
    monkeypatch.setattr(socket, "socket", fake)
    assert check_serve_config(str(path), port_free=True) == [f"{path}: {expected}"]


def test_make_serve_notes_a_ray_it_would_join_rather_than_start(tmp_path, monkeypatch):
    """`serve run` with no address joins RAY_ADDRESS's cluster, else the last `ray start`'s on this machine: then
    make serve's Serve settings (HAProxy, throughput mode) are not the ones that cluster runs, and Ctrl-C leaves it
    running, though the README speaks of the local Ray make serve starts. It said nothing of it."""
    import socket

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:  # a port free here
        s.bind(("127.0.0.1", 0))
        _, path = shipped_config_serving_at(tmp_path, "127.0.0.1", s.getsockname()[1])

    def joined(port_free: bool = True) -> list[str]:
        notes: list[str] = []
        assert check_serve_config(str(path), notes, port_free=port_free) == []
        return [n for n in notes if "will join the Ray cluster" in n]

    assert joined() == []  # nothing recorded: serve run starts its own
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379")
    assert len(notes := joined()) == 1 and "10.0.0.5:6379 (recorded by `ray start` on this machine)" in notes[0]
    assert joined(port_free=False) == []  # `serve deploy` to a running cluster: joining it is the point
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert "ray://head:10001 (RAY_ADDRESS)" in joined()[0]
    monkeypatch.setenv("RAY_ADDRESS", "local")  # ray.init's own word for a Ray of its own
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    assert joined() == []


def own_ray_check(tmp_path, monkeypatch, cpus: int | None = None):
    """check_serve_config as `make serve` runs it with no Ray to join (it starts one here, of `cpus` CPUs; None: this
    machine's), on the shipped config at a free port: check(*deployments entries, **args changed) -> problems."""
    import socket

    import ray._private.utils

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if cpus is not None:
        monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda: cpus)
    with socket.socket() as s:  # a port free here
        s.bind(("127.0.0.1", 0))
        config, path = shipped_config_serving_at(tmp_path, "127.0.0.1", s.getsockname()[1])
    app = config["applications"][0]

    def check(*deployments: dict, **changed) -> list[str]:
        entries = {"deployments": list(deployments)} if deployments else {}
        path.write_text(yaml.safe_dump({**config, "applications": [{**app, "args": {**app["args"], **changed},
                                                                     **entries}]}))
        return check_serve_config(str(path), [], port_free=True)
    return check


def test_make_serve_names_meshes_its_own_ray_could_never_place(tmp_path, monkeypatch):
    """`make serve` with no Ray to join starts one on this machine, with its CPUs and no custom resource: a mesh that
    asks for `galaxy: 1` (serve_config.simulated.yaml's) or more CPUs than the machine has passed the check, and Serve
    then waited for resources without end, /health 503, the cause only in Serve's logs."""
    check = own_ray_check(tmp_path, monkeypatch)
    assert check() == []
    (problem,) = check(mesh_resources={"galaxy": 1})
    assert "args.mesh_resources: galaxy" in problem and "ray start --head --resources" in problem
    (problem,) = check(num_meshes=2, mesh_num_cpus=100_000)
    assert "args.mesh_num_cpus: 2 meshes of 100000 CPUs" in problem
    assert check(mesh_resources={"galaxy": 0}) == []
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379")  # a cluster to join: its resources
    assert check(mesh_resources={"galaxy": 1}, mesh_num_cpus=100_000) == []


def test_make_serve_counts_the_routers_cpus(tmp_path, monkeypatch):
    """The router replica takes CPUs of that Ray too (RouterDeployment's num_cpus 0.2): meshes and ingress replicas
    that fill the machine's CPUs passed the check, and the router (or a mesh) was never placed, /health 503."""
    check = own_ray_check(tmp_path, monkeypatch, cpus=2)
    (problem,) = check(mesh_num_cpus=1.8, ingress_num_cpus=0.2)  # 2.2 with the router's
    assert "args.mesh_num_cpus" in problem
    assert "needs 2.2 CPUs (meshes 1.8, ingress replicas 0.2, router 0.2)" in problem
    assert check(mesh_num_cpus=1.6, ingress_num_cpus=0.2) == []
    # counted as Ray counts (1/10,000ths), not in floats: 3 x 0.4 + 0.6 + 0.2 is 2.0000000000000004 in floats
    assert check(num_meshes=3, mesh_num_cpus=0.4, ingress_num_cpus=0.6) == []


def test_make_serve_places_what_the_deployments_entries_ask(tmp_path, monkeypatch):
    """A `deployments:` entry's num_replicas and ray_actor_options take the build's place (README: `- {name:
    Ingress, num_replicas: 3}`; the router on a `frontend` resource): the check counted the args alone, so ingress
    replicas past the machine's CPUs or a router asking for a resource the Ray `make serve` starts lacks passed,
    and were never placed."""
    check = own_ray_check(tmp_path, monkeypatch, cpus=2)
    assert check({"name": "Ingress", "num_replicas": 4}) == []  # 1 + 4 x 0.2 + 0.2
    (problem,) = check({"name": "Ingress", "num_replicas": 5})
    assert "needs 2.2 CPUs (meshes 1, ingress replicas 1, router 0.2)" in problem
    (problem,) = check({"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.2,
                                                                        "resources": {"frontend": 0.01}}})
    assert "deployments[0] (RouterDeployment).ray_actor_options.resources: frontend 0.01" in problem
    assert "RouterDeployment could never be placed" in problem and """--resources='{"frontend": 0.01}'""" in problem
    (problem,) = check({"name": "Ingress", "ray_actor_options": {}})  # Serve's 1 CPU then
    assert "needs 2.2 CPUs (meshes 1, ingress replicas 1, router 0.2)" in problem


def test_the_app_hands_the_router_every_router_key_it_has():
    """A key the config takes but the app does not pass on is silently the router's default."""
    from dataclasses import fields

    from deployments.app import build
    from deployments.router import RouterConfig

    config = AppConfig(enable_prefix_caching=False, decode_steps=3, no_mesh_wait_s=7.0, stream_interval_ms=20)
    router_args = build(config)._bound_deployment.init_args[0]._bound_deployment.init_args[1]
    shared = {f.name for f in fields(RouterConfig)} & set(AppConfig.model_fields) - {"max_prefill_tokens"}
    assert "enable_prefix_caching" in shared
    assert {k: router_args.get(k) for k in shared} == {k: getattr(config, k) for k in shared}
    assert RouterConfig(**router_args).enable_prefix_caching is False


@pytest.mark.parametrize("meshes, replicas", [(1, 1), (4, 1), (4, 2), (32, 3)])
def test_the_ingress_takes_every_request_the_router_can_hold(meshes, replicas):
    """Beyond an ingress replica's max_ongoing_requests Serve queues requests without bound: with 4 meshes
    (4 x (1024 waiting + 32 slots) held by the router) and 1024 per ingress, the router's 429 never came and
    requests waited in Serve's queue instead."""
    from deployments.app import build

    config = AppConfig(num_meshes=meshes, ingress_replicas=replicas, backend="simulated")
    ingress = build(config)._bound_deployment
    assert ingress.max_ongoing_requests * replicas >= meshes * (config.max_waiting_requests + config.num_slots)
    assert ingress.max_ongoing_requests >= 1024


def test_a_rolling_update_starts_the_new_ingress_before_it_stops_the_old():
    """With Serve's default (max_surge_percent 0) a redeploy that replaced the ingress stopped its replicas first:
    HAProxy then sent every request, /health too, to Serve's fallback proxy, which held it until a new replica was
    up (make serve, idle, `serve deploy` with one key changed: /health unanswered for 10-20 s, not a 503)."""
    from deployments.app import build

    for replicas in (1, 3):
        ingress = build(AppConfig(ingress_replicas=replicas))._bound_deployment
        assert ingress._deployment_config.max_surge_percent == 100  # a new replica for every old one, then the stop


@pytest.mark.parametrize("files, reason", [
    ({}, "has neither config.json nor params.json"),
    ({"config.json": "{"}, "config.json: not a Llama config"),
    ({"config.json": '{"hidden_size": 64}'}, "config.json: not a Llama config meshserve reads: no 'num_hidden_layers'"),
    ({"config.json": '{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8, '
                     '"intermediate_size": 8, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}'}, "'yarn'"),
    ({"params.json": '{"dim": 64}'}, "params.json: not a Llama config meshserve reads: no 'n_layers'"),
    ({"config.json": "[]"}, "config.json: not a Llama config meshserve reads"),
    ({"config.json": '{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 0, "vocab_size": 8, '
                     '"intermediate_size": 8}'}, "config.json: not a Llama config meshserve reads"),
    ({"config.json": '{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8, '
                     '"intermediate_size": 8, "rope_scaling": "x"}'}, "config.json: not a Llama config meshserve reads"),
])
@pytest.mark.parametrize("max_seq_len", [{"max_seq_len": 2048}, {}])
def test_a_model_folder_the_torch_backend_cannot_read_is_named_not_a_traceback(tmp_path, files, reason, max_seq_len):
    """`make serve` checks the config first; a torch model folder with no Llama config (or a config it cannot read)
    raised out of that check when max_seq_len was set (its context is read from the config): a traceback, not the
    list of wrong keys. Without max_seq_len it passed the check, and each mesh replica then failed to build."""
    from deployments.config import check_serve_config

    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"model": str(model), **max_seq_len}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', args.model: {model}") and reason in error, error


@pytest.mark.parametrize("deployments, problem", [
    ([{"name": "RouterDeployment", "num_replicas": 2}], "deployments[0] (RouterDeployment).num_replicas: must be 1"),
    ([{"name": "RouterDeployment", "num_replicas": "auto"}], "(RouterDeployment).num_replicas: must be 1, not 'auto'"),
    ([{"name": "Ingress", "num_replicas": 3}, {"name": "mesh-1", "autoscaling_config": {"max_replicas": 2}}],
     "deployments[1] (mesh-1).autoscaling_config: mesh-1 is not autoscaled"),
    ([{"name": "mesh-0", "num_replicas": 2}], "one replica is one mesh's KV cache"),
    # max_surge_percent: a rolling update starts the new replica before the old one stops (ray/serve/schema.py)
    ([{"name": "RouterDeployment", "max_surge_percent": 100}], "(RouterDeployment).max_surge_percent: must be 0"),
    ([{"name": "mesh-1", "max_surge_percent": 50}], "(mesh-1).max_surge_percent: must be 0"),
    ([{"name": "mesh-2", "num_replicas": 1}], "deployments[0].name: 'mesh-2' is no deployment of this application"),
    # Serve's in-place update calls the replica's reconfigure(user_config), which no deployment here has: each replica
    # of it fails (a mesh once it has loaded), and a router knob put there never reaches the router
    ([{"name": "RouterDeployment", "user_config": {"stream_interval_ms": 5}}], "(RouterDeployment).user_config: "),
    ([{"name": "mesh-0", "user_config": {}}], "deployments[0] (mesh-0).user_config: "),
    ({"name": "Ingress"}, "deployments: a list of mappings"),
    # Serve's schema ignores an unknown key (a typo deployed the default), and refuses a string count only at deploy
    ([{"name": "Ingress", "num_replicaz": 3}], "deployments[0] (Ingress).num_replicaz: no option of a Serve deployment"),
    ([{"name": "Ingress", "num_replicas": "3"}], "deployments[0] (Ingress).options: `num_replicas` must be an int"),
])
def test_deployment_options_that_break_one_router_or_one_replica_per_mesh_are_refused(tmp_path, deployments, problem):
    """Serve lays a config's `deployments:` over the build's options without calling build(): a second router
    replica, or a second replica of a mesh, was deployed as asked (two routers resetting the same meshes)."""
    from deployments.config import check_serve_config

    app = {"name": "m", "import_path": "deployments.app:build", "args": {"backend": "simulated", "num_meshes": 2},
           "deployments": deployments}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', ") and problem in error
    app["deployments"] = [{"name": "Ingress", "num_replicas": 3, "max_surge_percent": 100},
                          {"name": "RouterDeployment", "num_replicas": 1},
                          {"name": "mesh-1", "max_ongoing_requests": 64, "max_surge_percent": 0}]  # the ingress: fine
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == []


def test_a_key_given_twice_is_named_not_overridden(tmp_path):
    """YAML (PyYAML, and so Serve) keeps the last of a key given twice without a word: a user's `num_slots: 8`
    written above the shipped config's `num_slots: 32` would have served 32 slots. The check names the key and
    both lines; a merge key's values overridden beside it are no duplicate."""
    shipped = (ROOT / "serve_config.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(shipped.replace("      num_slots: 32", "      num_slots: 8\n      num_slots: 32"))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: 'num_slots' is given twice (lines 19 and 20): YAML and Serve would keep the "
                            "last one without a word; give it once"), error
    assert f'in "{path}", line 20, column 7' in error  # YAML's pointer: at the second
    from deployments.config import load_yaml_unique_keys

    assert load_yaml_unique_keys("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n") == {"a": {"x": 1, "y": 2},
                                                                          "b": {"x": 3, "y": 2}}
    # a quoted "<<" is a plain key, not a merge: beside one, neither is given twice
    assert load_yaml_unique_keys('a: &a {x: 1}\nb: {"<<": 0, <<: *a}\n')["b"] == {"<<": 0, "x": 1}


@pytest.mark.parametrize("text, error", [
    # PyYAML 6.0.4 keeps the first's `x`, older ones the second's: a list says which wins
    ("a: &a {x: 1}\nc: &c {x: 2}\nb:\n  <<: *a\n  <<: *c\n", "<< is given twice (lines 4 and 5): which one's keys win "
     "depends on the YAML library's version: merge several as `<<: [*a, *b]` (the first's keys win)"),
    ("? [1]\n: a\n", "found unhashable key"),  # a message, not a TypeError out of the check
])
def test_a_second_merge_or_an_unhashable_key_is_named(tmp_path, text, error):
    """Two `<<` in one mapping are a key given twice too, and mean different configs to different PyYAML versions;
    one `<<: [*a, *c]` is taken."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert error in check_serve_config(str(path))[0]
    from deployments.config import load_yaml_unique_keys

    assert load_yaml_unique_keys("a: &a {x: 1}\nc: &c {x: 2, z: 3}\nb:\n  <<: [*a, *c]\n")["b"] == {"x": 1, "z": 3}


# A preset anchored inside a merge (`<<: &small {<<: *galaxy, max_seq_len: 8192}`) and used again whole: merging it
# rewrote its keys (the preset's, then its own) before it was constructed, and its override read as a key given twice
PRESET = ("applications:\n- name: a\n  args:\n    <<: &small\n      <<: &galaxy {num_slots: 32, max_seq_len: 131072}\n"
          "      max_seq_len: 8192\n    num_meshes: 2\n- name: b\n  args: *small\n")


def test_a_merged_mapping_used_again_whole_is_no_duplicate():
    from deployments.config import load_yaml_unique_keys

    assert load_yaml_unique_keys(PRESET) == yaml.safe_load(PRESET)
    assert load_yaml_unique_keys(PRESET)["applications"][1]["args"] == {"num_slots": 32, "max_seq_len": 8192}


@pytest.mark.parametrize("text, error", [
    # a mapping only merged (never constructed on its own): its duplicate reached the merge as two keys, the last kept
    ("args:\n  <<: &p\n    num_slots: 8\n    num_slots: 32\n", "'num_slots' is given twice (lines 3 and 4)"),
    # the same alias twice is the same key node: taken as one key
    ("&k num_slots: 8\n*k : 32\n", "'num_slots' is given twice (line 1)"),
    ("a: {1: x, true: y}\n", "True is given twice (line 1)"),  # one key to a dict, as yes and true are
])
def test_a_duplicate_merged_or_aliased_is_named(text, error):
    from deployments.config import load_yaml_unique_keys

    with pytest.raises(yaml.YAMLError, match=re.escape(error)):
        load_yaml_unique_keys(text)


def test_yamls_value_key_is_a_string_key():
    """`=` is YAML's value key, which PyYAML takes as the string "=" (the check constructed it as a tag it has no
    constructor for)."""
    from deployments.config import load_yaml_unique_keys

    assert load_yaml_unique_keys("=: 1\nb: 2\n") == yaml.safe_load("=: 1\nb: 2\n") == {"=": 1, "b": 2}


def test_a_misspelt_serve_key_is_named_not_ignored(tmp_path):
    """Serve's config schema ignores a key it does not know: `http_option: {port: 8080}` served on 8000, a misspelt
    `runtime_env` dropped its variables, and README's `resources: {frontend: 0.01}` for the router, misspelt, left it
    free to land on a Galaxy host, each without a word from `serve deploy` or the config check."""
    app = {"name": "m", "import_path": "deployments.app:build", "args": {"backend": "simulated"},
           "runtim_env": {"env_vars": {"A": "1"}},
           "deployments": [{"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.2,
                                                                              "resource": {"frontend": 0.01}}}]}
    doc = {"proxy_locaton": "EveryNode", "http_options": {"host": "127.0.0.1", "prot": 8080}, "applications": [app]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    errors = check_serve_config(str(path))
    assert [e.split(": no ")[0] for e in errors] == [
        f"{path}: proxy_locaton", f"{path}: http_options.prot", f"{path}: application 'm', runtim_env",
        f"{path}: application 'm', deployments[0] (RouterDeployment).ray_actor_options.resource"], errors
    assert "proxy_location" in errors[0] and "port" in errors[1] and "runtime_env" in errors[2] and \
        "resources" in errors[3]
    doc = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": 8080}, "applications": [
        {**{k: v for k, v in app.items() if k != "runtim_env"}, "runtime_env": {"env_vars": {"A": "1"}},
         "deployments": [{"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.2,
                                                                           "resources": {"frontend": 0.01}}}]}]}
    path.write_text(yaml.safe_dump(doc))
    assert check_serve_config(str(path)) == []


def test_mesh_actor_options_that_drop_its_galaxy_resource_are_refused(tmp_path):
    """Serve puts a config's ray_actor_options in place of the build's whole: a mesh given some (an env var for its
    host) lost `galaxy: 1` (mesh_resources) and could start on a host with no Galaxy, or beside another mesh."""
    from deployments.config import check_serve_config

    app = {"name": "m", "import_path": "deployments.app:build",
           "args": {"backend": "simulated", "num_meshes": 2, "mesh_resources": {"galaxy": 1}},
           "deployments": [{"name": "mesh-1", "ray_actor_options": {"runtime_env": {"env_vars": {"A": "1"}}}}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert error.startswith(f"{path}: application 'm', deployments[0] (mesh-1).ray_actor_options: ") and \
        "galaxy" in error, error
    app["deployments"] = [{"name": "mesh-1", "ray_actor_options": {"resources": {"galaxy": 1}, "num_cpus": 2,
                                                                   "runtime_env": {"env_vars": {"A": "1"}}}},
                          {"name": "RouterDeployment", "ray_actor_options": {"num_cpus": 0.2}}]  # no mesh: fine
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == []


def test_mesh_actor_options_that_drop_its_cpus_are_refused(tmp_path):
    """Serve puts a config's ray_actor_options in place of the build's whole and reserves 1 CPU where they give no
    num_cpus (ray/serve/_private/config.py): a mesh with mesh_num_cpus 8 silently ran torch on one thread."""
    from deployments.config import check_serve_config

    options = {"resources": {"galaxy": 1}, "runtime_env": {"env_vars": {"A": "1"}}}
    app = {"name": "m", "import_path": "deployments.app:build", "deployments": [{"name": "mesh-0", "ray_actor_options":
           options}], "args": {"backend": "simulated", "mesh_resources": {"galaxy": 1}, "mesh_num_cpus": 8}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}))
    (error,) = check_serve_config(str(path))
    assert "deployments[0] (mesh-0).ray_actor_options: " in error and "num_cpus 8" in error, error
    options["num_cpus"] = 8
    path.write_text(yaml.safe_dump({"applications": [app]}))
    assert check_serve_config(str(path)) == []


def test_ingress_and_router_get_one_model_identity_which_only_the_model_keys_change():
    """The ingress refuses to continue an answer on a router of another model (deployments/router_client.py): both
    must be handed the same identity, and a redeploy that keeps the model (a router option) must keep it."""
    from deployments.app import build

    config = AppConfig(backend="simulated", num_meshes=2)
    ingress = build(config)._bound_deployment
    router_args = ingress.init_args[0]._bound_deployment.init_args[1]
    assert router_args["model_identity"] == ingress.init_args[-1] == config.model_identity
    same = [AppConfig(backend="simulated", num_meshes=1, decode_steps=2, ingress_replicas=3, stream_interval_ms=5)]
    other = [AppConfig(backend="torch"), AppConfig(backend="simulated", model="/models/llama"),
             AppConfig(backend="torch", dtype="bfloat16")]
    assert {c.model_identity for c in same} == {config.model_identity}
    assert config.model_identity not in {c.model_identity for c in other} and len({c.model_identity for c in other}) == 3


def test_an_empty_models_identity_is_the_model_the_demos_variables_name(monkeypatch):
    """An empty `model` serves $HF_MODEL's or $LLAMA_DIR's checkpoint: a redeploy with the variable changed serves
    another model, so its identity must change (open answers end rather than go on with the other model's tokens)."""
    monkeypatch.delenv("LLAMA_DIR", raising=False)
    monkeypatch.setenv("HF_MODEL", "org/a")
    first = AppConfig(model="").model_identity
    assert first == AppConfig(model="org/a").model_identity
    monkeypatch.setenv("HF_MODEL", "org/b")
    assert AppConfig(model="").model_identity != first
    monkeypatch.delenv("HF_MODEL")
    monkeypatch.setenv("LLAMA_DIR", "/models/llama")
    assert AppConfig(model="").model_identity == AppConfig(model="/models/llama").model_identity


@pytest.mark.parametrize("port, refused", [(65536, True), (65535, False), (1, False)])
def test_an_http_port_past_65535_is_refused_before_ray_starts(tmp_path, port, refused):
    """Serve refuses a port it cannot bind only once Ray is up; the check names it first, and takes the last port."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"http_options": {"port": port}, "applications": []}))
    assert check_serve_config(str(path)) == (
        [f"{path}: http_options.port: a TCP port, 1 to 65535, not {port}"] if refused else [])


@pytest.mark.parametrize("args, key", [
    ({"min_step_deadline_s": 0.01}, "min_step_deadline_s"),  # 10 s typed as ms: idle meshes failed on and off
    ({"step_deadline_factor": 0.5}, "step_deadline_factor"),  # a healthy long prefill outlived its deadline
    ({"backend": "simulated", "time_scale": 1e9}, "time_scale"),  # the simulated mesh's sleep overflowed in a work
])
def test_deadlines_and_a_time_scale_no_mesh_can_keep_are_refused_naming_the_key(args, key):
    with pytest.raises(ValidationError, match=key):
        AppConfig(**args)


def test_the_sse_keep_alive_interval_is_a_bounded_key_each_ingress_replica_gets():
    """It was a constant (15 s): a proxy with a read timeout under ~16 s in front still cut a stream paused longer
    (a long prefill, a failover's re-prefill). vLLM's name; 1 to 300 s."""
    from deployments.app import build

    assert AppConfig().sse_keep_alive_interval == 15.0
    ingress = build(AppConfig(backend="simulated", sse_keep_alive_interval=4))._bound_deployment
    assert ingress.init_kwargs["sse_keep_alive_interval"] == 4.0
    assert ingress.init_kwargs["no_mesh_wait_s"] == 30.0  # a fresh ingress waits for the first mesh this long
    assert build(AppConfig(backend="simulated", no_mesh_wait_s=2))._bound_deployment.init_kwargs["no_mesh_wait_s"] == 2
    for value in (0, 0.015, 301, float("inf")):
        with pytest.raises(ValidationError, match="sse_keep_alive_interval") as info:
            AppConfig(sse_keep_alive_interval=value)
        assert "1 to 300" in str(info.value) or value == float("inf"), str(info.value)
    AppConfig(sse_keep_alive_interval=1)
    AppConfig(sse_keep_alive_interval=300)


def test_a_step_deadline_factor_below_1_is_refused_saying_why(tmp_path):
    """It got pydantic's bare "Input should be greater than or equal to 1", which says neither what the factor
    multiplies nor why less is wrong."""
    with pytest.raises(ValidationError) as info:
        AppConfig(step_deadline_factor=0.5)
    (error,) = info.value.errors()
    assert error["loc"] == ("step_deadline_factor",)
    assert "greater than" not in error["msg"] and "expected time" in error["msg"], error["msg"]
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n- name: m\n  import_path: deployments.app:build\n"
                    "  args: {step_deadline_factor: 0.5}\n")
    (problem,) = check_serve_config(str(path))
    assert "args.step_deadline_factor: at least 1" in problem, problem
    AppConfig(step_deadline_factor=1.0)


def test_the_deadline_floor_and_the_time_scale_ceiling_fit_what_a_mesh_does():
    """The floor is no less than the silence after which the router counts a mesh as stalled, and past a Galaxy's
    slowest decode step (a full 128k cache); at the largest time_scale the simulated mesh's longest call (a
    whole-context prefill) still sleeps. Both limits are accepted."""
    import threading

    from deployments.config import MAX_TIME_SCALE, MIN_STEP_DEADLINE_S
    from deployments.router import STALL_S
    from model.simulated import SimulatedBackend

    caps = SimulatedBackend().caps
    assert MIN_STEP_DEADLINE_S >= STALL_S and MIN_STEP_DEADLINE_S > caps.decode_step_s
    slowest = SimulatedBackend(time_scale=MAX_TIME_SCALE).caps
    assert slowest.expected_seconds(slowest.max_seq_len, 0) < threading.TIMEOUT_MAX
    AppConfig(min_step_deadline_s=MIN_STEP_DEADLINE_S, step_deadline_factor=1.0)
    AppConfig(backend="simulated", time_scale=MAX_TIME_SCALE)


def test_readme_configuration_table_lists_every_key():
    """README's key table is what an operator reads: a key missing there is a setting nobody finds, one that the
    code lacks is a config the check refuses."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = {key for row in table.splitlines()[2:] for key in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == set(AppConfig.model_fields)


def test_readme_configuration_table_gives_each_keys_default():
    """The table's defaults are what an operator sizes a deployment by: one the code does not have (a default changed
    in one place) deploys settings nobody chose. A word ("backend's", "one chunk") stands for a default left to
    someone else: None, or tt-inference-server's override_tt_config."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        keys, defaults = row.split("|")[1:3]
        documented.update(zip(re.findall(r"`(\w+)`", keys), re.findall(r"`[^`]*`|[^,\s][^,]*[^,\s]|[^,\s]", defaults),
                            strict=True))
    literals = {"true": True, "false": False, "`[]`": [], "`{}`": {}, "`[8, 4]`": (8, 4), "8 MiB": 8 * 2**20}
    for key, field in AppConfig.model_fields.items():
        default, text = field.get_default(call_default_factory=True), documented[key]
        if text in literals:
            assert literals[text] == default and type(literals[text]) is type(default), (key, text, default)
        elif re.fullmatch(r"\d[\d.]*", text):
            assert float(text) == default and type(default) in (int, float), (key, text, default)
        elif re.fullmatch(r"`\w+`", text):
            assert text.strip("`") == default, (key, text, default)
        else:
            assert default is None or key == "override_tt_config", (key, text, default)
