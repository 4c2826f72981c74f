import math
import statistics

import pytest

from common.evaluation import Score
from learner.merge import Scores, dual_improvement, pick_merge_scale, unresolved_margins


def test_dual_improvement_needs_both():
    base = Scores(7.76, 82.15)
    assert dual_improvement(base, Scores(8.22, 82.17))  # the paper's merged 0.8 row
    assert not dual_improvement(base, Scores(8.51, 81.99))  # on-policy alone: VBench fell
    assert not dual_improvement(base, Scores(7.61, 82.45))  # semi alone: VideoAlign fell
    assert dual_improvement(base, Scores(8.51, 81.99), tolerance=0.2)


def test_pick_the_largest_passing_scale():
    base = Scores(7.76, 82.15)
    sweep = {
        0.0: Scores(7.61, 82.45),
        0.4: Scores(7.9, 82.4),
        0.6: Scores(8.0, 82.3),
        0.8: Scores(8.22, 82.17),
        1.0: Scores(8.4, 82.0),
    }
    assert pick_merge_scale(base, sweep) == 0.8
    assert pick_merge_scale(base, {1.0: Scores(8.4, 82.0)}) is None


def test_an_in_domain_tie_does_not_pass():
    base = Scores(7.76, 82.15)
    assert not dual_improvement(base, base)
    assert not dual_improvement(base, Scores(7.76, 82.5))  # in-domain tied, out-of-domain up
    assert not dual_improvement(base, Scores(7.76, 82.5), tolerance=1.0)  # the tolerance is for ood only
    # The largest scale loses to a smaller one when it only ties in domain.
    assert pick_merge_scale(base, {0.4: Scores(7.8, 82.2), 0.8: Scores(7.76, 82.3)}) == 0.4
    assert pick_merge_scale(base, {0.8: Scores(7.76, 82.3), 1.0: Scores(7.76, 82.2)}) is None


def test_an_out_of_domain_tie_does_not_pass():
    # docs/method.md section 5: BOTH scores improve over the base.
    base = Scores(7.76, 82.15)
    assert not dual_improvement(base, Scores(8.22, 82.15))
    assert pick_merge_scale(base, {0.4: Scores(8.0, 82.2), 0.8: Scores(8.22, 82.15)}) == 0.4


def test_a_missing_score_is_an_error_not_a_verdict():
    # NaN compares False, which once made "no scale passes" out of "no score was measured".
    base = Scores(7.76, 82.15)
    for candidate, which in (
        (Scores(8.2, float("nan")), "candidate's out-of-domain"),
        (Scores(8.2, []), "candidate's out-of-domain"),
    ):
        with pytest.raises(ValueError, match=which):
            pick_merge_scale(base, {0.8: candidate})
    with pytest.raises(ValueError, match="base's in-domain"):
        dual_improvement(Scores([], 82.15), Scores(8.2, 82.3))


def test_scores_carry_standard_errors_and_paired_margins():
    base = Score.of([1.0, 2.0, 3.0, 4.0])
    assert base.mean == 2.5 and base.stderr == pytest.approx(statistics.stdev([1, 2, 3, 4]) / 2)
    # Same videos, each 0.1 better: the paired margin is exact, however spread the videos are.
    better = Score.of([1.1, 2.1, 3.1, 4.1])
    diff, err = better.margin_over(base)
    assert diff == pytest.approx(0.1) and err == pytest.approx(0.0, abs=1e-12)
    # Different sets (or sizes): the errors add in quadrature.
    other = Score.of([2.0, 3.0])
    assert other.margin_over(base)[1] == pytest.approx(math.hypot(other.stderr, base.stderr))
    assert math.isnan(Score.of(3.0).stderr) and str(Score.of(3.0)) == "3.0000"


def test_a_margin_within_two_standard_errors_is_reported_unresolved():
    base = Scores([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 6.0])
    clear = Scores([1.5, 2.5, 3.5, 4.5], [5.2, 5.3, 6.2, 6.3])
    assert unresolved_margins(base, clear) == []
    noisy = Scores([1.5, 2.5, 3.5, 4.5], [5.5, 4.6, 6.4, 5.8])  # ood up 0.075 on average, by -0.4..+0.5
    (line,) = unresolved_margins(base, noisy)
    assert line.startswith("out-of-domain margin +0.0750")
    # A published mean has no error: its margin cannot be called resolved.
    assert len(unresolved_margins(Scores(7.76, 82.15), Scores(8.22, 82.17))) == 2
