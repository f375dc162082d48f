"""Faithfulness of LRP on the bundled demo DETR (held-out generated scenes).

Target: decoder layer 2 (last), the query with the highest car probability, its car logit
(``class_embed(decoder.norm(x))[car]``, see ``lrp_ray.demo.faithfulness``). Token maps from
``lrp_ray.api.explain`` (rules ``cp``). Scenes: the first held-out scenes with a car (index 100000+).
"""

from __future__ import annotations

import numpy as np
import pytest

from lrp_ray.demo import demo_config_path, demo_weights_path

pytestmark = pytest.mark.skipif(not (demo_weights_path().is_file() and demo_config_path().is_file()),
                                reason="demo model not bundled yet")

N_POINTING = 50
N_DELETION = 25
TARGET = "car_logit"
LAYER = 2


@pytest.fixture(scope="module")
def explained():
    from lrp_ray.demo import faithfulness as F

    model = F.load_demo_model()
    targets = F.car_targets(model, F.car_scenes(N_POINTING))
    return model, F.explain_targets(model, targets, layer=LAYER, target=TARGET)


def test_pointing_game_on_cars(explained):
    from lrp_ray.demo import faithfulness as F

    _, ex = explained
    res = F.pointing_game(ex)
    # The query really is on a car in (nearly) every image.
    assert np.mean(np.asarray(res.ious) >= 0.5) >= 0.9
    # The maximum of the token map falls inside that car's box in >= 90% of the images, at token
    # resolution: the most relevant token's patch overlaps the box (= its centre inside the box grown by
    # half a token, 16 input px; Zhang et al.'s pointing game allows 15 px).
    assert res.cell_rate >= 0.9, (res.cell_rate, res.centre_rate)
    # Strictly (the token's centre inside the box, no tolerance) still in most images.
    assert res.centre_rate >= 0.8, (res.cell_rate, res.centre_rate)
    # Far above chance: a token drawn uniformly at random hits the box much less often.
    chance_cell, chance_centre = [], []
    for e in ex:
        t = e.target
        gh, gw = e.token_map.shape
        hits = [F.point_hits(np.eye(1, gh * gw, k).reshape(gh, gw), t.car_box, t.scene.size, t.input_hw)
                for k in range(gh * gw)]
        chance_cell.append(np.mean([h[0] for h in hits]))
        chance_centre.append(np.mean([h[1] for h in hits]))
    assert res.cell_rate > float(np.mean(chance_cell)) + 0.4
    assert res.centre_rate > float(np.mean(chance_centre)) + 0.4


def test_deletion_curve_relevance_beats_random(explained):
    from lrp_ray.demo import faithfulness as F

    model, ex = explained
    rel_auc, rand_auc, early_rel, early_rand = [], [], [], []
    for e in ex[:N_DELETION]:
        fr, rel, rand = F.deletion_curves(model, e, layer=LAYER, n_random=5, steps=10)
        assert rel[0] == pytest.approx(1.0) and rand[0] == pytest.approx(1.0)
        rel_auc.append(rel.mean())
        rand_auc.append(rand.mean())
        k = int(np.searchsorted(fr, 0.2))  # after deleting ~20% of the tokens
        early_rel.append(rel[k])
        early_rand.append(rand[k])
    rel_auc, rand_auc = np.asarray(rel_auc), np.asarray(rand_auc)
    # Deleting the most relevant tokens first lowers the target faster than random deletion.
    assert rel_auc.mean() < rand_auc.mean() - 0.1, (rel_auc.mean(), rand_auc.mean())
    assert np.mean(rel_auc < rand_auc) >= 0.8
    assert np.mean(early_rel) < np.mean(early_rand)
