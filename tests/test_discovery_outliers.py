"""Discovery on an outlier-heavy distribution (issue #26, item 7): the planted model fed textured images without
normalisation, where about 30 % of the patch tokens are outliers, still runs each image once, and finds what the
algorithm as it was finds."""

from ttreg_hf.discovery import find_register_neurons
from ttreg_hf.planted import build_planted_model, planted_index, textured_images

from reference_discovery import assert_same_as_reference, reference_discovery
from support import ForwardCounter


def test_outlier_heavy_images_run_once_and_find_what_the_algorithm_as_it_was_finds():
    model, images = build_planted_model(), textured_images(48, seed=0)  # [0, 1], not normalised
    settings = dict(calibration_images=16, eval_images=16, batch_size=4)
    with ForwardCounter(model) as forwards:
        result = find_register_neurons(model, images, **settings)
    assert result.outlier_ratio > 0.25 and result.index.neurons == planted_index()
    assert forwards.unedited == 48  # no calibration batch runs again: their kept tokens fit
    assert_same_as_reference(result, reference_discovery(model, images, **settings))
