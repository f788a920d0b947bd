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
