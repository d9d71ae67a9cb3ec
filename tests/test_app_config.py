"""A wrong serve_config.yaml fails at deploy time with a message naming the key."""
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,key", [
    ({"num_mesh": 2}, "num_mesh"),
    ({"backend": "gpu"}, "backend"),
    ({"prefill_chunk": 100}, "prefill_chunk"),
    ({"override_tt_config": {"fabric": "FABRIC_1D"}}, "override_tt_config.fabric"),
    ({"override_tt_config": {"fabric_config": "RING"}}, "override_tt_config.fabric_config"),
    ({"decode_steps": 0}, "decode_steps"),
])
def test_wrong_config_names_the_key(args, key):
    with pytest.raises(ValidationError) as err:
        AppConfig(**args)
    assert key in str(err.value)


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.simulated.yaml", "serve_config.galaxy.yaml"])
def test_shipped_configs_validate_and_survive_the_trip_to_replicas(name):
    args = yaml.safe_load((ROOT / name).read_text())["applications"][0]["args"]
    config = AppConfig(**args)
    assert AppConfig(**config.model_dump()) == config  # replicas rebuild it from the dumped dict
