"""Human A/B votes: the randomisation undone, majority per pair, intervals, agreement, rater statistics, bad rows."""

import json
import random

import pytest

from emu.evaluation.human_votes import check_vote, human_win_rates, krippendorff_alpha, majority, outcome, read_votes


def vote(pair, rater, choice, left="a", question="appeal", **kw):
    return {"pair": pair, "rater": rater, "choice": choice, "left": left, "question": question, **kw}


def test_outcome_undoes_the_randomisation_and_majority_breaks_ties_to_tie():
    assert outcome(vote("p", "r", "left", left="a")) == 1 and outcome(vote("p", "r", "left", left="b")) == -1
    assert outcome(vote("p", "r", "right", left="b")) == 1 and outcome(vote("p", "r", "tie")) == 0
    assert majority([1, 1, -1, 0, 1]) == 1 and majority([1, -1]) == 0 and majority([0, 0, 1]) == 0
    assert majority([-1, -1, 1, 0, 0]) == 0  # two-two: no majority


def test_unanimous_raters_give_a_full_win_and_perfect_agreement():
    rng = random.Random(0)
    votes = []
    for p in range(40):
        left = rng.choice("ab")  # A always preferred, wherever it was shown
        votes += [vote(f"p{p}", f"r{r}", "left" if left == "a" else "right", left) for r in range(5)]
    r = human_win_rates(votes, "appeal")
    assert r["win"] == 1.0 and r["win_ci"] == [1.0, 1.0] and r["pairs"] == 40 and r["votes_per_pair"] == {"5": 40}
    assert r["raters"]["r0"]["agreement"] == 1.0 and 0.3 < r["raters"]["r0"]["left_rate"] < 0.7
    assert r["alpha"] == 1.0  # every rater gave the same value (no variation: alpha defined as 1)


def test_random_raters_give_an_interval_around_half_and_no_agreement():
    rng = random.Random(1)
    votes = [vote(f"p{p}", f"r{r}", rng.choice(["left", "right"]), rng.choice("ab"))
             for p in range(400) for r in range(5)]  # fmt: skip
    r = human_win_rates(votes, "appeal")
    assert r["win_rate_ci"][0] < 0.5 < r["win_rate_ci"][1]
    assert abs(r["alpha"]) < 0.05


def test_alpha_matches_a_worked_example():
    # Krippendorff (2011), nominal: 4 coders, 12 units, values 1-5 with gaps; alpha = 0.743
    data = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
            [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]  # fmt: skip
    assert krippendorff_alpha(data) == pytest.approx(0.743, abs=1e-3)


def test_attention_checks_are_counted_per_rater_and_left_out_of_the_rates():
    votes = [vote("p1", "ana", "left"), vote("p1", "bo", "left"),
             vote("p1", "ana", "right", left="b", check="repeat"),  # consistent: A again
             vote("p1", "bo", "left", left="b", check="repeat"),  # flipped: B now
             vote("x", "ana", "right", left="a", check="broken", expect="b"),  # right = B = expected
             vote("x", "bo", "left", left="a", check="broken", expect="b")]  # fmt: skip
    r = human_win_rates(votes, "appeal")
    assert r["pairs"] == 1 and r["votes"] == 2
    assert r["raters"]["ana"]["checks_failed"] == 0 and r["raters"]["bo"]["checks_failed"] == 2


def test_bad_rows_are_skipped_with_a_reason(tmp_path):
    path = tmp_path / "votes.jsonl"
    rows = [json.dumps(vote("p", "r", "left")), "{not json", json.dumps(vote("p", "r", "maybe")),
            json.dumps(vote("p", "", "left")), json.dumps({**vote("p", "r", "left"), "check": "broken"})]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    votes, problems = read_votes(path)
    assert len(votes) == 1 and len(problems) == 4
    assert "not JSON" in problems[0] and "'choice'" in problems[1] and "'rater'" in problems[2]
    assert "expect" in problems[3] and check_vote([]) == "not an object"
    with pytest.raises(ValueError, match="no faithfulness votes"):
        human_win_rates(votes, "faithfulness")
