"""The U-Net builder: parameter budget, shapes, configurability and config errors."""

import numpy as np
import pytest

from gigaseg.errors import ConfigError
from gigaseg.model import build_unet, total_stride


def test_default_model_has_4492_trainable_parameters():
    model = build_unet()
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 4492


def test_output_has_the_input_size_and_one_probability_channel():
    model = build_unet()
    x = np.random.default_rng(0).integers(0, 256, (1, 128, 192, 3), dtype=np.uint8)
    p = model(x).numpy()
    assert p.shape == (1, 128, 192, 1)
    assert (p >= 0).all() and (p <= 1).all()


def test_depth_filters_kernels_and_strides_are_configurable():
    model = build_unet(filters=(2, 3, 5, 6), kernels=3, strides=(2, 2, 2, 2), decoder_filters=(4, 4, 4, 4))
    assert [layer.name for layer in model.layers if layer.name.startswith("down")] == ["down1", "down2", "down3", "down4"]
    assert model.get_layer("down4").filters == 6
    assert model.get_layer("down2").kernel_size == (3, 3)
    assert total_stride((2, 2, 2, 2)) == 16
    assert model(np.zeros((1, 32, 48, 3), np.uint8)).shape == (1, 32, 48, 1)


def test_kernel_smaller_than_stride_is_a_config_error():
    with pytest.raises(ConfigError, match=r"kernels\[1\]=3 is smaller than model.strides\[1\]=4"):
        build_unet(kernels=(7, 3, 9))


@pytest.mark.parametrize("kwargs", [dict(kernels=(7, 9)), dict(strides=(4, 4, 4, 4)), dict(decoder_filters=(4,))])
def test_lists_of_the_wrong_length_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="depth 3"):
        build_unet(**kwargs)
