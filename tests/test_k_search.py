"""The automatic k's starting guess: the k after which the ranked scores drop by the largest factor. The search finds
the same k from any guess (`test_discovery.py`); the guess decides how many edited forwards it costs, which
`test_automatic_threshold_and_k_run_each_image_once_and_edit_only_evaluation_images` pins."""

import pytest

from ttreg_hf import discovery


@pytest.mark.parametrize(
    ("scores", "guess"),
    [
        ([10.0, 9.0, 8.0, 1.0, 0.9], 3),  # 8 / 1 is the largest drop: three neurons stand out
        ([10.0, 1.0, 0.9, 0.1], 1),  # 10 / 1 beats 0.9 / 0.1
        ([10.0, 5.0, 0.6, 0.5], 2),  # a ratio, not a difference: 5 / 0.6 beats 10 / 5
        ([4.0, 2.0, 1.0], 1),  # equal drops: the first
        ([3.0, 2.0, 0.0, 0.0], 2),  # a drop to zero is the largest, and 0 / 0 is no drop
        ([7.0], 1),
        ([], 1),
    ],
)
def test_the_guess_is_the_k_before_the_largest_drop_in_the_ranked_scores(scores, guess):
    assert discovery._largest_drop(scores) == guess
