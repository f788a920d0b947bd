"""`StalenessManager`: admission limit, each request's min_version, drop accounting, state round trip."""

import json

import pytest

from buffer import StalenessManager


def test_admission_stops_at_the_bound_and_names_the_oldest_allowed_version():
    m = StalenessManager(max_staleness=1, prompts_per_step=4, num_steps=10)
    keys, v = m.admit(3)
    assert keys == ["g0", "g1", "g2"] and v == 0
    m.sent(3)
    keys, v = m.admit(8)  # only (1 + 0 + 1) * 4 = 8 groups may exist at version 0
    assert keys == [f"g{i}" for i in range(3, 8)] and v == 0  # group 7 trains at step 1 at the latest: 1 - 1
    m.sent(5)
    assert m.capacity() == 0 and m.admit(1) == ([], 0)
    for k in [f"g{i}" for i in range(8)]:
        m.kept_group(k)
    m.returned(8)
    m.advance()  # version 1: four more
    keys, v = m.admit(4)
    assert keys == ["g8", "g9", "g10", "g11"] and v == 1  # group 11 trains at step 2: 2 - 1
    assert m.oldest_trainable() == 0 and m.oldest_trainable(5) == 4


def test_on_policy_requests_wait_for_the_current_version_and_the_run_length_caps_admission():
    m = StalenessManager(max_staleness=0, prompts_per_step=2, num_steps=1)
    keys, v = m.admit(5)
    assert keys == ["g0", "g1"] and v == 0
    m.sent(2)
    m.advance()
    assert m.capacity() == 0  # num_steps * P groups in all


def test_a_dropped_group_frees_its_slot_once_even_if_its_request_is_collected_later():
    m = StalenessManager(max_staleness=0, prompts_per_step=2, num_steps=5)
    keys, _ = m.admit(2)
    m.sent(2)
    m.kept_group("g0")
    m.buffer_dropped(["g0", "g1"], fresh=0)  # g1's request is not collected yet
    assert m.kept == 0 and m.dropped == 2
    m.kept_group("g1")  # collected now: not counted again
    m.returned(2)
    assert m.kept == 0 and m.capacity() == 2


def test_state_dict_is_json_and_round_trips():
    m = StalenessManager(max_staleness=2, prompts_per_step=3, num_steps=9)
    keys, _ = m.admit(3)
    m.sent(3)
    for k in keys[:2]:
        m.kept_group(k)
    m.buffer_dropped(["g2"], fresh=2)
    m.advance()
    other = StalenessManager(max_staleness=2, prompts_per_step=3, num_steps=9)
    other.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert other.state_dict() == m.state_dict() and other.in_flight == 0
    assert other.admit(1) == m.admit(1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessManager(-1, 2, 3)
    with pytest.raises(ValueError, match="prompts_per_step"):
        StalenessManager(0, 0, 3)
