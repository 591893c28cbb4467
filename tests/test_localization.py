"""Localization scores: NIH box files read strictly, boxes mapped into the letterboxed square, pointing game
and IoBB computed as by hand, the class-blind map scored beside."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hybridmednet import create_model
from hybridmednet.config import Config
from hybridmednet.data.datasets import ChestXrayDataset, DataIndex
from hybridmednet.data.synthetic import BOX_COLUMNS, BOX_FILE
from hybridmednet.data.transforms import build_transforms
from hybridmednet.errors import DataError
from hybridmednet.evaluation.evaluate import localization_check
from hybridmednet.evaluation.gradcam import reference_entry
from hybridmednet.evaluation.localization import (
    boxes_in_square,
    detected_boxes,
    localization_scores,
    localization_table,
    read_boxes,
    score_heatmap,
)


def test_read_boxes_nih_layout(tmp_path):
    path = tmp_path / 'BBox_List_2017.csv'
    path.write_text(
        'Image Index,Finding Label,Bbox [x,y,w,h],,,\n'
        '00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n'
        '00014716_007.png,Infiltrate,10,20,30,40,,,\n'
    )
    boxes = read_boxes(path)
    assert list(boxes.columns) == ['image', 'finding', 'x', 'y', 'w', 'h']
    assert boxes['finding'].tolist() == ['Atelectasis', 'Infiltration']  # NIH's spelling -> the class name
    assert boxes.iloc[0][['x', 'y', 'w', 'h']].tolist() == pytest.approx([225.0847, 547.0192, 86.7797, 79.1864])


@pytest.mark.parametrize(
    'text,message',
    [
        ('Image Index,Finding Label,Bbox [x,y,w,h]\na.png,Mass,1,2,3,4\nb.png,Mass,1,2,-3,4\n', 'line 3'),
        ('Image Index,Finding Label,Bbox [x,y,w,h]\na.png,Mass,1,two,3,4\n', 'line 2'),
        ('Image Index,Finding Label,Bbox [x,y,w,h]\n,Mass,1,2,3,4\n', 'line 2'),
        ('Image Index,Finding,x,y,w,h\na.png,Mass,1,2,3,4\n', 'expected the NIH header'),
    ],
)
def test_read_boxes_names_the_bad_row(tmp_path, text, message):
    path = tmp_path / 'boxes.csv'
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_boxes(path)
    assert str(path) in str(info.value)


def test_boxes_follow_the_letterbox():
    # 200 high x 100 wide into 50 px: 50 x 25, 12 px of padding on the left, scale 0.25
    np.testing.assert_allclose(boxes_in_square([[10, 20, 30, 40]], 200, 100, 50), [[14.5, 5, 7.5, 10]])
    # 100 high x 200 wide: 25 x 50, 12 px of padding on top
    np.testing.assert_allclose(boxes_in_square([[10, 20, 30, 40]], 100, 200, 50), [[2.5, 17, 7.5, 10]])


def test_score_heatmap_by_hand():
    cam = np.zeros((10, 10))
    cam[2:4, 2:6] = 1.0  # detected box (2, 2, 4, 2), area 8
    cam[7, 7] = 0.5  # below 0.7 of the maximum: not detected
    hit, best = score_heatmap(cam, [[4, 0, 10, 10], [2, 2, 1, 1]])
    assert hit  # the peak (row 2, col 2), centre (2.5, 2.5), lies in the second box
    np.testing.assert_allclose(best, [4 / 8, 1 / 8])  # intersections 2 x 2 and 1 x 1 over the detected area 8
    assert not score_heatmap(cam, [[6, 6, 3, 3]])[0]
    assert not score_heatmap(np.zeros((10, 10)), [[0, 0, 2, 2]])[0]  # an all-zero map points nowhere
    two_regions = cam.copy()
    two_regions[7:9, 7:9] = 0.9
    np.testing.assert_array_equal(detected_boxes(two_regions), [[2, 2, 4, 2], [7, 7, 2, 2]])
    assert score_heatmap(two_regions, [[6, 6, 4, 4]])[1][0] == 1.0  # the best detected box counts
    np.testing.assert_array_equal(detected_boxes(np.eye(3)), [[0, 0, 3, 3]])  # diagonal neighbours: one region


class _StubModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def _maps(dark: bool) -> np.ndarray:
    """Known heatmaps in the 32 px square for the dark image A (64 x 32) and the bright image B (32 x 64)."""
    maps = np.zeros((2, 32, 32))
    if dark:
        maps[0, 4:6, 10:14] = 1.0  # inside class 0's box (10, 4, 4, 4)
        maps[1, 2, 2] = 1.0  # class 1 peaks outside its box (8, 20, 16, 12) ...
        maps[1, 20:24, 8:12] = 0.8  # ... but a detected region lies inside it
    else:
        maps[0, 8:12, 16:24] = 1.0  # half of this region lies in class 0's box (20, 8, 12, 16)
    return maps


def test_localization_scores_by_hand(tmp_path):
    Image.fromarray(np.full((64, 32), 26, np.uint8)).save(tmp_path / 'a.png')
    Image.fromarray(np.full((32, 64), 230, np.uint8)).save(tmp_path / 'b.png')
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / 'c.png')
    records = pd.DataFrame({'path': [str(tmp_path / n) for n in ('a.png', 'b.png', 'c.png')], 'patient_id': [1, 2, 3]})
    records['split'] = 'test'
    index = DataIndex(records, np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32), ['c0', 'c1'], 'x', tmp_path)
    config = Config()
    config.DATA['image_size'] = 32
    dataset = ChestXrayDataset(index, build_transforms(config, train=False))
    boxes = pd.DataFrame(
        [
            ('a.png', 'c0', 4, 8, 8, 8),  # -> (10, 4, 4, 4) in the square
            ('a.png', 'c1', 0, 40, 32, 24),  # -> (8, 20, 16, 12)
            ('b.png', 'c0', 40, 0, 24, 32),  # -> (20, 8, 12, 16)
            ('b.png', 'Hernia', 0, 0, 8, 8),  # not a class of the model: left out
            ('other.png', 'c0', 0, 0, 8, 8),  # not in the split: left out
        ],
        columns=['image', 'finding', 'x', 'y', 'w', 'h'],
    )

    def cam(model, image, classes):
        assert list(classes) == [0, 1]
        return _maps(dark=float(image.max()) < 0)

    scores = localization_scores(_StubModel(), dataset, boxes, cam=cam)
    assert scores['n_images'] == 2
    c0, c1, pooled = scores['findings']['c0'], scores['findings']['c1'], scores['all']
    assert (c0['n_images'], c0['n_boxes'], c1['n_images'], pooled['n_images']) == (2, 2, 1, 3)
    assert c0['pointing_game'] == 0.5 and c1['pointing_game'] == 0.0 and pooled['pointing_game'] == pytest.approx(1 / 3)
    # IoBB: a -> 1 (c0), 1 (c1); b -> 0.5 (c0), which is not above 0.5
    assert c0['iobb'] == {'0.1': 1.0, '0.25': 1.0, '0.5': 0.5, '0.75': 0.5}
    assert c1['iobb'] == {'0.1': 1.0, '0.25': 1.0, '0.5': 1.0, '0.75': 1.0}
    # The class-blind map (mean of both) peaks first at (2, 2) on A and in the half-outside region on B.
    assert c0['class_blind']['pointing_game'] == 0.0 and c1['class_blind']['pointing_game'] == 0.0
    assert pooled['class_blind']['iobb']['0.5'] == pytest.approx(2 / 3)
    table = localization_table(scores)
    assert '| c0 | 2 | 2 | 0.50 (0.00) | 1.00 (1.00) | 1.00 (1.00) | 0.50 (0.50) | 0.50 (0.50) |' in table


def test_evaluate_says_which_heatmaps_it_scored_and_keeps_the_models_reference(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / 'a.png')
    records = pd.DataFrame({'path': [str(tmp_path / 'a.png')], 'patient_id': [1], 'split': ['test']})
    index = DataIndex(records, np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), ['c0', 'c1'], 'x', tmp_path)
    config = Config()
    config.DATA['image_size'] = 32
    dataset = ChestXrayDataset(index, build_transforms(config, train=False))
    pd.DataFrame([('a.png', 'c0', 4, 4, 8, 8)], columns=BOX_COLUMNS).to_csv(tmp_path / BOX_FILE, index=False)
    model = create_model('resnet18', num_classes=2, image_size=32, class_names=['c0', 'c1']).eval()
    assert localization_check(model, dataset)['heatmaps'] == 'plain'
    # healthy images of 48 px do not fit 32 px; one alone is the mean that models stored in the morning of 2026-12-01
    for n, size, kind in ((2, 32, 'nearest'), (1, 32, 'integrated'), (2, 48, 'other size')):
        model.heatmap_reference = reference = reference_entry([torch.rand(n, 3, size, size)], 'healthy')[
            'healthy_images'
        ]
        assert localization_check(model, dataset)['heatmaps'] == kind
        assert model.heatmap_reference is reference  # put back for whatever comes next
    model.heatmap_reference = torch.rand(3, 32, 32)  # one image set by hand
    assert localization_check(model, dataset)['heatmaps'] == 'integrated'
