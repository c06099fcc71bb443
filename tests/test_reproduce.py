import json

import pytest

from rdu.node.cli.main import main
from rdu.node.studies.reproduce import reproduce_sn40l


@pytest.fixture(scope="module")
def reproduction():
    return reproduce_sn40l()


# claims the honest model misses, each by less than 10% of its bound (stated in the report); none now
KNOWN_MISSES: set[str] = set()


def test_every_headline_claim_within_tolerance(reproduction):
    failing = [c.to_dict() for c in reproduction.claims if not c.ok and c.name not in KNOWN_MISSES]
    assert not failing, failing
    for c in reproduction.claims:
        if c.name in KNOWN_MISSES:
            assert c.rel_err < 0.10, c.to_dict()
    roles = {c.name: c.role for c in reproduction.claims}
    assert roles["coe_bs8_vs_dgx_a100"] == "fitted" and roles["switching_vs_dgx_a100"] == "predicted"
    assert all(c.loo_rel_err is not None for c in reproduction.claims if c.role == "fitted")
    names = {c.name for c in reproduction.claims}
    for claim in ("switching_vs_dgx_a100", "coe_bs8_vs_dgx_h100", "coe_bs1_vs_dgx_a100", "expert_only_vs_dgx_h100",
                  "dgx_spill_experts", "dgx_oom_experts", "sn40l_node_experts", "dgx_nodes_for_same_experts",
                  "fusion_decode[mistral-7b@4K]", "orchestration_prefill[bloom-176b@8K]"):
        assert claim in names


def test_claims_are_measured_not_copied(reproduction):
    details = reproduction.details
    assert details["switch_ns"]["dgx-a100"] > 30 * details["switch_ns"]["sn40l-node"]
    coe = details["coe"]["dgx-a100/bs8"]
    assert coe["switching_stall"] > coe["expert"] > coe["router"] > 0
    assert reproduction.assumptions["sn40l-node"]  # the report lists what the presets assume


def test_cli_json_and_report(tmp_path, capsys):
    code = main(["reproduce", "sn40l", "--json", "--out", str(tmp_path / "r")])
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["all_ok"] else 1)
    assert {c["name"] for c in data["claims"] if not c["ok"]} <= KNOWN_MISSES
    for claim in data["claims"]:
        assert {"name", "paper", "emulator", "rel_err", "ok", "role", "loo_rel_err"} <= set(claim)
    report = (tmp_path / "r" / "REPORT.md").read_text()
    assert "| claim | paper | emulator |" in report and "assumption" in report and "leave-one-out" in report
    for png in ("headline_claims.png", "fusion_orchestration.png", "coe_breakdown.png"):
        assert (tmp_path / "r" / png).stat().st_size > 10_000


def test_unknown_target(capsys):
    assert main(["reproduce", "tpu"]) == 2
    assert "unknown reproduction target 'tpu'" in capsys.readouterr().err


def test_expert_only_claim_is_execution_only():
    """The sheet defines the expert-only speed-up as execution only: the SN40L's run set-up (a CoE
    cost, paid when a group changes model) must not move it."""
    from rdu.node.studies.reproduce import claim_values, overridden

    values = []
    for setup_ns in (0, 50_000_000):
        with overridden({"sn40l-node": {"socket.runtime.run_setup_ns": setup_ns}}):
            values.append(claim_values(["expert_only_vs_dgx_a100"])["expert_only_vs_dgx_a100"])
    assert values[0] == values[1]
