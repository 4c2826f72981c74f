from learner.merge import Scores, dual_improvement, pick_merge_scale


def test_dual_improvement_needs_both():
    base = Scores(7.76, 82.15)
    assert dual_improvement(base, Scores(8.22, 82.17))  # the paper's merged 0.8 row
    assert not dual_improvement(base, Scores(8.51, 81.99))  # on-policy alone: VBench fell
    assert not dual_improvement(base, Scores(7.61, 82.45))  # semi alone: VideoAlign fell
    assert dual_improvement(base, Scores(8.51, 81.99), tolerance=0.2)


def test_pick_the_largest_passing_scale():
    base = Scores(7.76, 82.15)
    sweep = {0.0: Scores(7.61, 82.45), 0.4: Scores(7.9, 82.4), 0.6: Scores(8.0, 82.3),
             0.8: Scores(8.22, 82.17), 1.0: Scores(8.4, 82.0)}
    assert pick_merge_scale(base, sweep) == 0.8
    assert pick_merge_scale(base, {1.0: Scores(8.4, 82.0)}) is None
