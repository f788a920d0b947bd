import pytest

from rollout.rewards import answers_match, extract_answer, score_response


@pytest.mark.parametrize("text,expected", [
    ("4 + 5 = 9.\nAnswer: 9", "9"),
    ("Answer: 3\nwait\nAnswer: -12.", "-12"),
    ("answer: $1,200", "1,200"),
    ("the result is 9", None),
])
def test_extract_answer_strict_last(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_numeric_and_symbolic():
    assert answers_match("1,200", "1200") and answers_match("-4.0", "-4")
    assert not answers_match("12345", "45")  # no partial credit
    assert answers_match("1/2", "0.5")  # math-verify


def test_score_response():
    assert score_response("2+2=4\nAnswer: 4", "4") == (1.0, True)
    assert score_response("4", "4") == (0.0, False)  # no Answer: line, strict parse


def test_score_safely_records_failures_instead_of_raising():
    import time

    from rollout.rewards import score_response, score_safely

    assert score_safely(score_response, "x\nAnswer: 4", "4", 5.0) == (1.0, True, "")

    def boom(text, ref):
        raise ValueError("bad parse")

    def slow(text, ref):
        time.sleep(3)
        return 1.0, True

    assert score_safely(boom, "t", "1", 5.0) == (0.0, False, "raised ValueError: bad parse")
    t0 = time.perf_counter()
    assert score_safely(slow, "t", "1", 0.2) == (0.0, False, "timed out after 0.2 s")
    assert time.perf_counter() - t0 < 2.0  # did not wait for the slow call
    assert score_safely(lambda t, r: (float("nan"), True), "t", "1", 1.0)[2].startswith("returned a non-finite")
