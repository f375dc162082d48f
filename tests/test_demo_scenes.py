"""The demo's scene generator: deterministic, valid boxes, varied sizes, disjoint held-out range."""

from __future__ import annotations

import numpy as np

from lrp_ray.demo.scenes import (
    CAR,
    CLASS_NAMES,
    HELDOUT_START,
    MAX_SIDE,
    MIN_SIDE,
    generate_scene,
    heldout_indices,
)
from lrp_ray.demo.train import VAL_START


def test_deterministic_per_index():
    a, b = generate_scene(7), generate_scene(7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(generate_scene(8).image[:8, :8], a.image[:8, :8])


def test_boxes_labels_and_sizes():
    sizes, n_obj, labels = set(), [], []
    for i in range(120):
        s = generate_scene(i)
        h, w = s.size
        assert s.image.dtype == np.uint8 and s.image.shape == (h, w, 3)
        assert MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE
        assert 1 <= len(s.labels) <= 3 and len(s.boxes) == len(s.labels)
        assert (s.boxes[:, 0] >= 0).all() and (s.boxes[:, 2] <= w).all()
        assert (s.boxes[:, 1] >= 0).all() and (s.boxes[:, 3] <= h).all()
        assert (s.boxes[:, 2] > s.boxes[:, 0] + 8).all() and (s.boxes[:, 3] > s.boxes[:, 1] + 8).all()
        # Objects never overlap.
        for p in range(len(s.boxes)):
            for q in range(p + 1, len(s.boxes)):
                bp, bq = s.boxes[p], s.boxes[q]
                assert bp[2] <= bq[0] or bq[2] <= bp[0] or bp[3] <= bq[1] or bq[3] <= bp[1]
        sizes.add((h, w))
        n_obj.append(len(s.labels))
        labels.extend(s.labels.tolist())
    assert len(sizes) > 100
    assert set(n_obj) == {1, 2, 3}
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts[CAR] > counts[1:].max()  # cars are the main class, distractors present
    assert (counts > 0).all()


def test_car_pixels_are_drawn_in_the_box():
    s = next(generate_scene(i) for i in range(50) if (generate_scene(i).labels == CAR).any())
    x0, y0, x1, y1 = (int(v) for v in s.boxes[s.labels == CAR][0])
    inside = s.image[y0:y1, x0:x1].astype(float)
    # Dark wheels: the bottom quarter of a car box holds near-black pixels.
    bottom = inside[int(0.75 * (y1 - y0)):]
    assert bottom.min() < 60


def test_forced_size_and_ranges_disjoint():
    s = generate_scene(HELDOUT_START, size=(100, 150))
    assert s.size == (100, 150)
    assert heldout_indices(3) == [HELDOUT_START, HELDOUT_START + 1, HELDOUT_START + 2]
    # Validation (model selection) < held-out test range; training uses a stream from 0 well below both.
    assert VAL_START < HELDOUT_START
