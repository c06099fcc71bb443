import json

import pytest

from node.cli import main
from node.reproduce import reproduce_sn40l


@pytest.fixture(scope="module")
def reproduction():
    return reproduce_sn40l()


def test_every_headline_claim_within_tolerance(reproduction):
    failing = [c.to_dict() for c in reproduction.claims if not c.ok]
    assert not failing, failing
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
    assert code == 0 and data["all_ok"]
    for claim in data["claims"]:
        assert {"name", "paper", "emulator", "rel_err", "ok"} <= set(claim)
    report = (tmp_path / "r" / "REPORT.md").read_text()
    assert "| claim | paper | emulator |" in report and "assumption" in report
    for png in ("headline_claims.png", "fusion_orchestration.png", "coe_breakdown.png"):
        assert (tmp_path / "r" / png).stat().st_size > 10_000


def test_unknown_target(capsys):
    assert main(["reproduce", "tpu"]) == 2
    assert "unknown reproduction target 'tpu'" in capsys.readouterr().err
