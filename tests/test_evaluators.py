"""The evaluators and their capability table: every layout the engine accepts is exact, and says how it ran.

Each layout's tiled float32 step (masks with ignored pixels) is held to a plain float64 step
with the same weights: the loss within 1e-4, and each variable's gradient no further from the
float64 one than a plain float32 step's is, plus 1e-4 (with the default input range, float32
rounding near ReLU kinks dominates; tiling must add nothing beyond it).
"""

import keras
import numpy as np
import pytest

from gigaseg.errors import ConfigError
from gigaseg.model import build_unet
from gigaseg.streaming import TiledEngine, plain_loss_and_gradients
from gigaseg.streaming.evaluators import NAMES, EvaluatorError, choose
from gigaseg.streaming.fused import FusedTail
from test_streaming_engine import relative_errors, tissue_region

TOLERANCE = 1e-4

#: (layout, the evaluator the table must pick for it)
LAYOUTS = {
    "default": ({}, "fused"),
    "wider": ({"filters": [8, 8, 8], "decoder_filters": [8, 8, 8]}, "fused"),
    "kernels": ({"kernels": [5, 7, 7]}, "fused"),
    "stride-1-middle": ({"strides": [4, 1, 4], "kernels": [7, 5, 9]}, "fused"),
    "stride-1-first": ({"strides": [1, 4, 4], "kernels": [5, 9, 9]}, "keras"),
    "elu": ({"activation": "elu"}, "lowered"),
    "four-levels": ({"filters": [4, 4, 4, 4], "kernels": [7, 5, 5, 3], "strides": [4, 2, 2, 2]}, "fused"),
}


def layout_model(options: dict) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_unet(**options)


def labelled_region(height: int, width: int, seed: int = 0):
    """The exactness tests' tissue region with a band of ignored pixels (255) across it."""
    image, mask = tissue_region(height, width, seed)
    mask[:, width // 3: width // 3 + width // 8] = 255
    return image, mask


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_steps_exactly_with_the_evaluator_the_table_picks(name):
    options, expected = LAYOUTS[name]
    model = layout_model(options)
    engine = TiledEngine(model, loss="dice_bce", tile_size=128)
    stride = engine.total_stride
    image, mask = labelled_region(max(256, 4 * stride), max(384, 6 * stride), seed=len(name))
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float64")
    _, plain32 = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float32")
    for tile_size in [(128, 128), (128, 192)]:
        engine.tile_size = tile_size
        result = engine.step(image, mask)
        assert result.tiles > 1
        assert engine.evaluator.name == expected, engine.choice.describe()
        assert abs(result.loss - reference_loss) <= TOLERANCE * abs(reference_loss)
        tiled, plain = relative_errors(result.gradients, reference), relative_errors(plain32, reference)
        assert all(t <= p + TOLERANCE for t, p in zip(tiled, plain)), (tiled, plain)
    # Forward only: the tiled probabilities are the whole window's.
    whole = model(image[np.newaxis], training=False)[0, :, :, 0].numpy()
    np.testing.assert_allclose(engine.predict(image), whole, rtol=0, atol=2e-5)


@pytest.mark.parametrize("loss", ["dice", "bce"])
def test_the_other_losses_on_a_layout_outside_the_default(loss):
    model = layout_model(LAYOUTS["four-levels"][0])
    image, mask = labelled_region(256, 384, seed=5)
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float64")
    _, plain32 = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float32")
    result = TiledEngine(model, loss=loss, tile_size=128).step(image, mask)
    assert abs(result.loss - reference_loss) <= TOLERANCE * abs(reference_loss)
    tiled, plain = relative_errors(result.gradients, reference), relative_errors(plain32, reference)
    assert all(t <= p + TOLERANCE for t, p in zip(tiled, plain)), (tiled, plain)


def test_each_row_passed_over_says_why():
    choice = choose(layout_model({"activation": "elu"}), loss="dice")
    assert choice.evaluator.name == "lowered"
    assert [name for name, _ in choice.skipped] == ["fused"]
    assert "ReLU" in choice.skipped[0][1] and "elu" in choice.skipped[0][1]
    choice = choose(layout_model({"strides": [1, 4, 4], "kernels": [5, 9, 9]}), loss="dice")
    assert choice.evaluator.name == "keras"
    assert all("down1" in why for _, why in choice.skipped), choice.skipped
    assert "not lowered: " in choice.describe()


def test_a_forced_evaluator_that_cannot_run_the_model_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        TiledEngine(layout_model({"activation": "elu"}), evaluator="fused")
    message = str(info.value)
    assert "\n" not in message and "evaluator=fused" in message and "ReLU" in message
    with pytest.raises(ConfigError, match="unknown"):
        TiledEngine(layout_model({}), evaluator="fastest")


def test_a_gpu_passes_the_fused_kernels_over(model):
    on_gpu = choose(model, loss="dice", devices=["CPU", "GPU"])
    assert on_gpu.evaluator.name == "lowered" and on_gpu.device == "GPU"
    assert "GPU" in dict(on_gpu.skipped)["fused"]
    assert choose(model, loss="dice", devices=["CPU"]).evaluator.name == "fused"
    with pytest.raises(ConfigError, match="evaluator=fused"):
        choose(model, loss="dice", evaluator="fused", devices=["CPU", "GPU"])


def test_jit_compile_passes_the_fused_kernels_over_and_compiles_the_lowered_graphs(model):
    image, _ = labelled_region(256, 384, seed=2)
    compiled = TiledEngine(model, tile_size=128, jit_compile=True)
    assert compiled.evaluator.name == "lowered"
    assert "XLA" in dict(compiled.choice.skipped)["fused"]
    np.testing.assert_allclose(compiled.predict(image), TiledEngine(model, tile_size=128).predict(image), rtol=0, atol=1e-5)
    # The compiled training step is exact too (the block convolutions' registered gradients compile).
    _, mask = labelled_region(256, 384, seed=2)
    step = TiledEngine(model, loss="dice_bce", tile_size=128, jit_compile=True).step(image, mask)
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float64")
    _, plain32 = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float32")
    assert abs(step.loss - reference_loss) <= TOLERANCE * abs(reference_loss)
    tiled, plain = relative_errors(step.gradients, reference), relative_errors(plain32, reference)
    assert all(t <= p + TOLERANCE for t, p in zip(tiled, plain)), (tiled, plain)
    with pytest.raises(ConfigError) as info:
        TiledEngine(model, evaluator="fused", jit_compile=True)
    assert "\n" not in str(info.value) and "jit_compile" in str(info.value)


def test_a_wrong_backward_kernel_is_caught_by_the_start_up_self_check(model, monkeypatch, caplog):
    right = FusedTail.gradients

    def wrong(self, *args):
        grads = list(right(self, *args))
        grads[1] = grads[1] * np.float32(1.5)  # the transposed convolution's kernel gradient
        return tuple(grads)

    monkeypatch.setattr(FusedTail, "gradients", wrong)
    image, mask = labelled_region(256, 384, seed=3)
    engine = TiledEngine(model, loss="dice", tile_size=128)
    assert engine.evaluator.name == "fused"  # its forward passes are right
    reference = TiledEngine(model, loss="dice", tile_size=128, evaluator="lowered").step(image, mask)
    with caplog.at_level("WARNING", logger="gigaseg.streaming.engine"):
        result = engine.step(image, mask)
    assert engine.evaluator.name == "lowered"
    assert "self-check" in caplog.text and "up3" in caplog.text
    assert "failed the gradient self-check" in dict(engine.choice.skipped)["fused"]
    for got, want in zip(result.gradients, reference.gradients):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(EvaluatorError, match="fused evaluator failed its gradient self-check"):
        TiledEngine(model, loss="dice", tile_size=128, evaluator="fused").step(image, mask)


def test_prediction_engines_do_not_run_the_gradient_self_check(model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the gradient self-check ran in a prediction engine")

    monkeypatch.setattr("gigaseg.streaming.engine.gradient_mismatch", fail)
    image, _ = labelled_region(256, 384, seed=4)
    assert TiledEngine(model, tile_size=128).predict(image).shape == image.shape[:2]


def test_the_table_and_the_options_name_the_same_evaluators():
    from gigaseg.options import EVALUATORS

    assert EVALUATORS == ("auto", *NAMES)
