"""The dataset loads in a background thread while Lightning is imported: same data, and errors reach the caller."""

import pytest
import torch

from src.data.download import DatasetError
from src.data.source import LoadingInBackground
from tests.helpers import SyntheticSource


def test_background_load_returns_the_sources_data_and_passes_attributes_through():
    source = SyntheticSource(n_train=7, n_test=3)
    background = LoadingInBackground(SyntheticSource(n_train=7, n_test=3))
    assert background.n_classes == 10 and background.input_shape == source.input_shape
    data, expected = background.load(), source.load()
    assert torch.equal(data.train_x, expected.train_x) and torch.equal(data.test_y, expected.test_y)
    assert background.load() is data  # loaded once


class Broken:
    def load(self):
        raise DatasetError("fashion-mnist/train-images-idx3-ubyte.gz: checksum mismatch")


def test_an_error_in_the_background_is_raised_by_load():
    background = LoadingInBackground(Broken())
    with pytest.raises(DatasetError, match="checksum mismatch"):
        background.load()
