"""The auto-upgrade policy (daemon.core.policy): candidates, margin, urgency, cooldown,
probation."""

from __future__ import annotations

import itertools

import pytest

from daemon.core.model import HealthStatus
from daemon.core.policy import Candidate, cooldown_remaining, in_probation, suggest
from daemon.core.settings import PolicyConfig

CFG = PolicyConfig(min_margin=0.05, min_consecutive_healthy=5, cooldown=1800.0,
                   probation=600.0, quarantine=3600.0, sustain=0.0)
NOW = 10_000.0
H = HealthStatus.HEALTHY


def cand(model_id: str, score: float, status: HealthStatus = H, successes: int = 5,
         eligible: bool = True) -> Candidate:
    return Candidate(model_id, status, score, successes, eligible)


PRIMARY = cand("a", 0.70)


def pick(*members: Candidate, primary: Candidate | None = PRIMARY,
         quarantine: dict[str, float] | None = None, config: PolicyConfig = CFG):
    everyone = ([primary] if primary else []) + list(members)
    return suggest("chat", primary, everyone, quarantine or {}, NOW, config)


# ----------------------------------------------------------------------------- margin


def test_candidate_beating_the_primary_by_the_margin_is_suggested_with_numbers():
    found = pick(cand("b", 0.80))
    assert found is not None
    assert (found.role, found.from_id, found.to_id) == ("chat", "a", "b")
    assert (found.score_from, found.score_to) == (0.70, 0.80)
    assert not found.urgent
    assert "0.800" in found.reason and "0.700" in found.reason and "0.050" in found.reason


def test_candidate_ahead_by_less_than_the_margin_is_not_suggested():
    assert pick(cand("b", 0.749)) is None


def test_candidate_ahead_by_exactly_the_margin_is_suggested_despite_float_rounding():
    # 0.3 - 0.25 == 0.04999999999999999 in binary floating point
    assert pick(cand("b", 0.30), primary=cand("a", 0.25)) is not None


def test_candidate_scoring_below_the_primary_is_not_suggested():
    assert pick(cand("b", 0.5)) is None


def test_zero_margin_suggests_an_equal_score():
    config = PolicyConfig(min_margin=0.0, min_consecutive_healthy=5, sustain=0.0)
    assert pick(cand("b", 0.70), config=config) is not None


def test_degraded_primary_is_replaced_only_by_the_margin_rule():
    primary = cand("a", 0.40, status=HealthStatus.DEGRADED)
    assert pick(cand("b", 0.42), primary=primary) is None
    found = pick(cand("b", 0.50), primary=primary)
    assert found is not None and not found.urgent


# ----------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("status", [HealthStatus.DEGRADED, HealthStatus.UNAVAILABLE,
                                    HealthStatus.UNKNOWN])
def test_only_healthy_models_are_candidates(status):
    assert pick(cand("b", 0.99, status=status)) is None


def test_ineligible_model_is_not_a_candidate():
    assert pick(cand("b", 0.99, eligible=False)) is None


def test_quarantined_model_is_not_a_candidate():
    assert pick(cand("b", 0.99), quarantine={"b": NOW + 1}) is None


def test_model_is_a_candidate_again_when_its_quarantine_ends():
    found = pick(cand("b", 0.99), quarantine={"b": NOW})
    assert found is not None and found.to_id == "b"


def test_quarantine_of_one_model_leaves_the_next_best_as_candidate():
    found = pick(cand("b", 0.99), cand("c", 0.90), quarantine={"b": NOW + 60})
    assert found is not None and found.to_id == "c"


def test_model_with_too_few_successes_in_a_row_is_not_a_candidate():
    assert pick(cand("b", 0.99, successes=4)) is None
    assert pick(cand("b", 0.99, successes=5)) is not None


def test_the_primary_is_never_its_own_candidate():
    primary = cand("a", 0.10, status=HealthStatus.UNAVAILABLE)
    members = [cand("a", 0.99)]  # stale facts about the primary in the member list
    assert suggest("chat", primary, members, {}, NOW, CFG) is None


def test_the_best_scoring_candidate_is_suggested():
    found = pick(cand("b", 0.80), cand("c", 0.95), cand("d", 0.90))
    assert found is not None and found.to_id == "c"


def test_no_candidates_means_no_suggestion_even_for_an_unavailable_primary():
    primary = cand("a", 0.0, status=HealthStatus.UNAVAILABLE)
    assert pick(cand("b", 0.9, status=HealthStatus.DEGRADED), primary=primary) is None


# ----------------------------------------------------------------------------- urgency


def test_unavailable_primary_is_replaced_at_once_regardless_of_margin():
    primary = cand("a", 0.0, status=HealthStatus.UNAVAILABLE)
    found = pick(cand("b", 0.01), primary=primary)
    assert found is not None
    assert found.urgent
    assert (found.from_id, found.to_id) == ("a", "b")
    assert "primary a is unavailable" in found.reason


def test_role_without_a_primary_gets_an_urgent_suggestion():
    found = pick(cand("b", 0.3), primary=None)
    assert found is not None
    assert found.urgent and found.from_id is None and found.to_id == "b"
    assert found.score_from == 0.0
    assert "no primary" in found.reason


def test_suggestion_json_has_the_api_shape():
    found = pick(cand("b", 0.8123456789))
    assert found is not None
    assert found.to_json() == {"role": "chat", "from": "a", "to": "b", "reason": found.reason,
                               "score_from": 0.7, "score_to": 0.812346, "kind": "upgrade",
                               "urgent": False}


# ----------------------------------------------------------------------------- ties


def test_score_tie_goes_to_the_alphabetically_first_id_in_any_order():
    members = [cand("m3", 0.9), cand("m1", 0.9), cand("m2", 0.9)]
    for order in itertools.permutations(members):
        found = pick(*order)
        assert found is not None and found.to_id == "m1"


def test_score_tie_goes_to_the_shorter_id_when_it_is_a_prefix_of_the_other():
    # "llama" sorts before "llama-2"; a prefix must not lose the tie-break
    for order in itertools.permutations([cand("llama-2", 0.9), cand("llama", 0.9)]):
        found = pick(*order)
        assert found is not None and found.to_id == "llama"


# ----------------------------------------------------------------------------- timers


def test_cooldown_remaining_is_zero_without_an_automatic_promotion():
    assert cooldown_remaining(None, NOW, CFG) == 0.0


def test_cooldown_remaining_counts_down_from_the_last_automatic_promotion():
    assert cooldown_remaining(NOW - 600.0, NOW, CFG) == 1200.0


def test_cooldown_remaining_is_zero_after_the_cooldown_never_negative():
    assert cooldown_remaining(NOW - 1800.0, NOW, CFG) == 0.0
    assert cooldown_remaining(NOW - 5000.0, NOW, CFG) == 0.0


def test_automatic_promotion_is_in_probation_until_probation_has_passed():
    assert in_probation(NOW - 10.0, True, NOW, CFG)
    assert in_probation(NOW - 600.0, True, NOW, CFG)
    assert not in_probation(NOW - 600.5, True, NOW, CFG)


def test_manual_promotion_is_never_in_probation():
    assert not in_probation(NOW - 10.0, False, NOW, CFG)


def test_no_promotion_is_not_in_probation():
    assert not in_probation(None, True, NOW, CFG)
