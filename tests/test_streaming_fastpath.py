"""The space-to-depth fast path: its cheaper filter gradient, eagerly and traced, and no graph kept after its engine."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import tensorflow as tf

from gigaseg.model import build_unet
from gigaseg.streaming import TiledEngine
from gigaseg.streaming.fastpath import SpaceToDepthUNet, from_blocks, to_blocks


def test_eager_gradients_under_a_tape_match_the_keras_model():
    import keras

    keras.utils.set_random_seed(0)
    model = build_unet()
    fast = SpaceToDepthUNet.build(model)
    assert fast is not None
    image = np.random.default_rng(0).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    with tf.GradientTape() as tape:
        fast_sum = tf.reduce_sum(fast(tf.constant(to_blocks(image, fast.factor))))
    fast_grads = tape.gradient(fast_sum, model.trainable_variables)
    with tf.GradientTape() as tape:
        keras_sum = tf.reduce_sum(model(image[np.newaxis]))
    keras_grads = tape.gradient(keras_sum, model.trainable_variables)
    np.testing.assert_allclose(float(fast_sum), float(keras_sum), rtol=1e-5)
    for f, k in zip(fast_grads, keras_grads):
        assert f is not None  # the first layer's kernel gets its gradient through the registered one
        np.testing.assert_allclose(f.numpy(), k.numpy(), rtol=1e-3, atol=1e-4 * float(tf.reduce_max(tf.abs(k))))


def test_blocks_are_tensorflows_space_to_depth_and_back():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    blocks = to_blocks(image, 4)
    assert blocks.shape == (6, 10, 48) and blocks.flags.c_contiguous
    np.testing.assert_array_equal(blocks, tf.nn.space_to_depth(image[np.newaxis], 4)[0].numpy())
    probabilities = rng.random((24, 40)).astype(np.float32)
    np.testing.assert_array_equal(from_blocks(to_blocks(probabilities, 4), 4), probabilities)
    # Straight from a strided view of a bigger array, as windows are cut from a memory map.
    region = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_blocks(region[8:32, 16:56], 4), to_blocks(np.ascontiguousarray(region[8:32, 16:56]), 4))
    # The compiled copy against numpy's transposing one, for read-only views at odd (unaligned) offsets and other dtypes.
    region.setflags(write=False)
    for view, f in ((region[3:27, 5:45], 4), (region[1:33, 7:39, 0], 8), (region.astype(np.float32)[2:18, 3:35], 4)):
        h, w = view.shape[:2]
        c = view.shape[2] if view.ndim == 3 else 1
        expected = view.reshape(h // f, f, w // f, f * c).transpose(0, 2, 1, 3).reshape(h // f, w // f, f * f * c)
        np.testing.assert_array_equal(to_blocks(view, f), expected)
        if c == 1:
            np.testing.assert_array_equal(from_blocks(expected, f), view)


def test_window_reader_in_blocks_reads_windows_and_mask_cores_in_that_layout():
    from gigaseg.streaming.reader import WindowReader

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    mask = (rng.random((64, 96)) > 0.5).astype(np.uint8)
    pixels, labels = WindowReader(image, mask, blocks=4).read((8, 16, 40, 64), (16, 24, 32, 56))
    np.testing.assert_array_equal(pixels, to_blocks(image[8:40, 16:64], 4))
    np.testing.assert_array_equal(labels, to_blocks(mask[16:32, 24:56], 4))


def test_traced_graphs_are_freed_with_their_engine():
    # tf.custom_gradient in a traced function registers a gradient that keeps the graph alive
    # for good (tensorflow/tensorflow#97697): about 1 MB per engine, e.g. per predicted slide.
    model = build_unet()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    mask = (rng.random((128, 256)) > 0.5).astype(np.uint8)
    engine = TiledEngine(model, loss="dice_bce", tile_size=128)
    assert engine.evaluator.name == "fused"
    engine.step(image, mask)
    engine.predict(image)
    traced = [engine._sums_fn, engine._grad_fn, engine._predict_fn]
    graphs = [weakref.ref(fn.get_concrete_function().graph) for fn in traced]
    assert all(g() is not None for g in graphs)
    del engine, traced
    gc.collect()
    assert [g() for g in graphs] == [None, None, None]


def _core_matches_the_whole_window(fast: SpaceToDepthUNet, image: np.ndarray, top: int, left: int, size: int) -> None:
    f = fast.factor
    blocks = tf.constant(to_blocks(image, f))
    whole = from_blocks(fast(blocks).numpy(), f)
    box = (tf.constant([top // f, left // f]), tf.constant([size // f, size // f]))
    core = from_blocks(fast(blocks, box).numpy(), f)
    np.testing.assert_allclose(core, whole[top : top + size, left : left + size], rtol=0, atol=1e-6)


def test_a_core_skips_the_halo_after_the_last_transposed_convolution():
    fast = SpaceToDepthUNet.build(build_unet())
    assert fast is not None and fast.crops
    image = np.random.default_rng(4).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    _core_matches_the_whole_window(fast, image, 64, 128, 128)


def test_a_model_that_needs_the_halo_at_full_resolution_evaluates_whole_windows_then_cuts_the_core():
    import keras
    from keras import layers

    # A 1x1 convolution before the strided one: cutting its output to the core would starve
    # the 7x7 convolution of its halo, so this model must not crop early.
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    mixed = layers.Conv2D(3, 1, activation="relu")(x)
    down = layers.Conv2D(4, 7, strides=4, padding="same", activation="relu")(mixed)
    up = layers.Conv2DTranspose(4, 4, strides=4, activation="relu")(down)
    outputs = layers.Conv2D(1, 1, activation="sigmoid")(layers.Concatenate()([up, mixed]))
    fast = SpaceToDepthUNet.build(keras.Model(inputs, outputs))
    assert fast is not None and not fast.crops
    image = np.random.default_rng(5).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    _core_matches_the_whole_window(fast, image, 16, 32, 32)
