"""Contract tests for the template predictor; copy them for your own plugin.

Run after `pip install -e examples/plugin_template`:  pytest examples/plugin_template/tests
"""

import math

import pytest
import torch

from ovseg import build_predictor, list_plugins
from ovseg.vocabulary import Vocabulary


def test_registered_through_its_entry_point():
    names = [info.name for info in list_plugins("predictor")["predictor"]]
    assert "colorproto" in names


@pytest.mark.parametrize("size", [(32, 48), (37, 50)])  # a multiple of the patch, and not
def test_output_shape_and_range(size):
    predictor = build_predictor("colorproto", patch_size=8)
    vocabulary = Vocabulary(["red", "grass, lawn", "sky"])
    predictor.set_classes(vocabulary)
    images = torch.rand(2, 3, *size)
    scores = predictor(images)
    h, w = size
    assert scores.shape == (2, len(vocabulary.names), math.ceil(h / 8), math.ceil(w / 8))
    assert scores.dtype == torch.float32
    assert scores.abs().max() <= 1 + 1e-5  # raw cosines: no softmax, no temperature


def test_pinned_colours_win():
    predictor = build_predictor("colorproto", patch_size=4, colors={"red": [255, 0, 0], "blue": [0, 0, 255]})
    predictor.set_classes(["red", "blue"])
    image = torch.zeros(1, 3, 8, 8)
    image[:, 0, :, :4] = 1.0  # left half red
    image[:, 2, :, 4:] = 1.0  # right half blue
    best = predictor(image).argmax(1)[0]
    assert best[:, 0].eq(0).all() and best[:, 1].eq(1).all()


def test_bench_contract_inputs_are_not_normalised():
    # stages get [0, 1] RGB and normalise themselves: a grey image must give zero scores
    predictor = build_predictor("colorproto")
    predictor.set_classes(["anything"])
    assert predictor(torch.full((1, 3, 16, 16), 0.5)).abs().max() == 0
