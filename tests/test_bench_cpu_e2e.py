"""bench.cpu, one tiny run through the whole Serve stack: every role is found and accounted for (its figures are
printed, never asserted)."""
import json

import pytest

from bench import cpu

pytestmark = pytest.mark.slow


def test_a_tiny_run_through_serve_reports_every_role(capsys):
    report = cpu.main(["--streams", "2", "--output-tokens", "8", "--time-scale", "0.5", "--idle-s", "1", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert report["tokens"] == 2 * 8 and report["config"]["proxy"] == "haproxy+throughput"
    assert set(report["us_per_token"]) == {"proxy", "ingress", "router", "mesh", "ray", "client"}
    roles = {p["role"] for p in report["processes"]}
    assert {"proxy", "ingress", "router", "mesh"} <= roles
    assert any("haproxy" in p["title"] for p in report["processes"])
    assert all(v >= 0 for v in report["us_per_token"].values())
    assert set(report["idle_cpu_per_s"]) == {"proxy", "ingress", "router", "mesh", "ray"}
    assert set(report["marginal_us_per_token"]) == {"proxy", "ingress", "router", "mesh"}
    assert report["proxy_ingress_router_us_per_token"] == pytest.approx(
        sum(report["us_per_token"][r] for r in cpu.SUMMED), abs=0.2)
