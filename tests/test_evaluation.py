"""Evaluation scores: known Dice/IoU/precision/recall, per-piece tables, chunked counting."""

from __future__ import annotations

import numpy as np
import pytest

from gigaseg.errors import MaskError
from gigaseg.evaluation import ArrayTissue, Counts, count, evaluate_masks


def grid(text: str) -> np.ndarray:
    """A hand-drawn mask: '#' is 1, '.' is 0, one line per row."""
    rows = [line.strip() for line in text.strip().splitlines()]
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=np.uint8)


def test_two_empty_masks_agree_perfectly():
    e = evaluate_masks(np.zeros((5, 7)), np.zeros((5, 7), np.uint8))
    assert e.scores() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert e.counts == Counts(0, 0, 0, 35) and e.pieces == []


def test_one_empty_mask_scores_zero():
    tissue = np.ones((4, 4))
    missed = evaluate_masks(np.zeros((4, 4)), tissue).scores()
    assert missed == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    invented = evaluate_masks(tissue, np.zeros((4, 4))).scores()
    assert invented == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}


def test_partial_overlap_hand_computed():
    # Prediction 3x4 = 12 px, reference 4x4 = 16 px, overlap 3x3 = 9 px.
    pred = np.zeros((8, 8))
    pred[1:4, 1:5] = 0.8
    pred[5, 5] = 0.49  # below the threshold: not tissue
    ref = np.zeros((8, 8), np.uint8)
    ref[2:6, 2:6] = 1
    e = evaluate_masks(pred, ref, threshold=0.5)
    assert e.counts == Counts(true_positive=6, predicted=12, reference=16, total=64)
    s = e.scores()
    assert s["dice"] == pytest.approx(2 * 6 / 28)
    assert s["iou"] == pytest.approx(6 / 22)
    assert s["precision"] == pytest.approx(6 / 12)
    assert s["recall"] == pytest.approx(6 / 16)
    # The training loop's validation (count) agrees.
    assert count(pred, ref, threshold=0.5) == e.counts


PRED = grid(
    """
    ..............
    .####.....###.
    .####.....###.
    .##.......###.
    ..............
    ...........##.
    ...........##.
    """
)
REF = grid(
    """
    ..............
    .###......##..
    .###......##..
    .###......##..
    .###..........
    ..............
    ..............
    """
)


def test_pieces_include_false_positive_blobs():
    e = evaluate_masks(PRED, REF, downsample=4.0, mpp=2.0)
    table = e.to_dict()["pieces"]
    assert [p["id"] for p in table] == [1, 2, 3]
    left, right, blob = table
    # Left piece: reference 12 px, prediction 10 px, overlap 8 px.
    assert (left["reference_px"], left["predicted_px"], left["true_positive_px"]) == (12, 10, 8)
    assert left["dice"] == pytest.approx(16 / 22)
    assert (left["x0"], left["y0"], left["x1"], left["y1"]) == (4.0, 4.0, 20.0, 20.0)
    # Right piece: reference 6 px, prediction 9 px, overlap 6 px.
    assert (right["reference_px"], right["predicted_px"], right["true_positive_px"]) == (6, 9, 6)
    assert right["recall"] == 1.0 and right["precision"] == pytest.approx(6 / 9)
    # The prediction's blob below it is its own piece, all false positive.
    assert (blob["reference_px"], blob["predicted_px"], blob["dice"], blob["precision"]) == (0, 4, 0.0, 0.0)
    assert (blob["x0"], blob["y0"], blob["x1"], blob["y1"]) == (44.0, 20.0, 52.0, 28.0)
    assert blob["predicted_mm2"] == pytest.approx(4 * 2.0**2 / 1e6)
    # The pieces add up to the whole.
    assert sum((p.counts for p in e.pieces), Counts(0, 0, 0, 0)).true_positive == e.counts.true_positive == 14


def test_diagonal_touch_joins_pieces():
    pred = grid(
        """
        #...
        .#..
        ...#
        """
    )
    assert len(evaluate_masks(pred, np.zeros_like(pred)).pieces) == 2


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
def test_chunked_counts_equal_unchunked(rows):
    rng = np.random.default_rng(rows)
    prob = rng.random((53, 41))
    ref = (rng.random((53, 41)) < 0.4).astype(np.uint8)
    whole = evaluate_masks(prob, ref, threshold=0.3, rows=10_000)
    chunked = evaluate_masks(prob, ref, threshold=0.3, rows=rows)
    assert chunked.counts == whole.counts
    assert [p.counts for p in chunked.pieces] == [p.counts for p in whole.pieces]
    expected = Counts(
        int(((prob >= 0.3) & (ref > 0)).sum()), int((prob >= 0.3).sum()), int((ref > 0).sum()), prob.size
    )
    assert whole.counts == expected


def test_pieces_on_blocks_keep_exact_counts():
    pred = np.zeros((90, 120))
    ref = np.zeros((90, 120), np.uint8)
    pred[10:30, 10:40] = 1
    ref[12:32, 8:38] = 1
    pred[60:80, 70:110] = 0.7
    pred[62, 80:90] = 0.2  # a gap in the prediction, inside the reference
    ref[65:85, 75:115] = 1
    exact = evaluate_masks(pred, ref, rows=16)
    coarse = evaluate_masks(pred, ref, rows=16, max_piece_pixels=200)
    assert exact.piece_block == 1 and coarse.piece_block == 8
    assert coarse.counts == exact.counts
    # Far-apart pieces stay apart on blocks, with the same exact pixel counts.
    strip = [(p.counts.true_positive, p.counts.predicted, p.counts.reference) for p in coarse.pieces]
    assert strip == [(p.counts.true_positive, p.counts.predicted, p.counts.reference) for p in exact.pieces]
    assert coarse.pieces[0].bbox == (8.0, 8.0, 40.0, 32.0)  # whole blocks of 8 pixels
    assert exact.pieces[0].bbox == (8.0, 10.0, 40.0, 32.0)


def test_size_mismatch_is_refused():
    with pytest.raises(MaskError, match="prediction is 5x4 .* reference is 4x5"):
        evaluate_masks(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(MaskError, match="2-D"):
        ArrayTissue(np.zeros((2, 2, 2)))


def test_count_leaves_ignored_pixels_out_of_every_metric():
    # Prepared masks: 0 background, 1 tissue, 255 ignore.
    pred = np.array([[0.9, 0.9, 0.1, 0.9, 0.9, 0.1]])
    labels = np.array([[1, 0, 1, 255, 255, 255]], np.uint8)
    counts = count(pred, labels, threshold=0.5)
    assert counts == Counts(true_positive=1, predicted=2, reference=2, total=3)
    assert counts.scores() == {"dice": 0.5, "iou": pytest.approx(1 / 3), "precision": 0.5, "recall": 0.5}
    # Band by band too, with bands of nothing but ignored pixels.
    tall = np.repeat(labels.T, 3, axis=1)
    assert count(np.repeat(pred.T, 3, axis=1), tall, rows=1) == Counts(3, 6, 6, 9)
    # Without ignore, 255 is tissue, as in a 0/255 mask image.
    assert count(pred, labels, ignore=None) == Counts(true_positive=3, predicted=4, reference=5, total=6)


def test_count_refuses_a_reference_with_nothing_but_ignored_pixels():
    with pytest.raises(MaskError, match="every pixel of the reference is 255"):
        count(np.ones((4, 4)), np.full((4, 4), 255, np.uint8))


def test_a_0_255_reference_mask_still_means_tissue_where_255():
    # Mask files given as references are tissue masks: evaluate_masks reads 255 as tissue.
    pred = np.array([[0.9, 0.9, 0.1, 0.1]])
    ref = np.array([[255, 0, 255, 0]], np.uint8)
    assert evaluate_masks(pred, ref).counts == Counts(true_positive=1, predicted=2, reference=2, total=4)
