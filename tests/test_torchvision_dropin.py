"""deeplab_fast.models as a drop-in for torchvision.models.segmentation's DeepLabs.

``test_torchvision_usage_example`` is torchvision's semantic segmentation usage example (its documentation,
"Semantic Segmentation" under "Using models from Hub / Inference"), with DeepLabV3 in place of FCN, run unchanged
but for the import of the model and the image source: no network, so the DEFAULT weights file is a random
torchvision-layout state dict placed in a temporary torch.hub cache under the registered file name (a file
already in the cache is used as torch.hub uses it), and the image a random uint8 tensor instead of
``decode_image("gallery/assets/dog1.jpg")`` (torchvision's image decoding needs its compiled ops).
"""
from __future__ import annotations

from collections import OrderedDict
import os

import pytest
import torch

from deeplab_fast import models


@pytest.fixture
def hub_with_default_weights(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")
    torch.manual_seed(0)
    state = models.DeepLabV3(50, num_classes=21, aux_loss=True).state_dict()  # torchvision's key layout
    torch.save(state, tmp_path / "checkpoints" / "deeplabv3_resnet50_coco-cd0a2569.pth")
    try:
        yield state
    finally:
        torch.hub.set_dir(old)


def test_torchvision_usage_example(hub_with_default_weights):
    from torchvision.transforms.functional import to_pil_image

    from deeplab_fast.models import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    img = torch.randint(0, 256, (3, 72, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    # Step 1: Initialize model with the best available weights
    weights = DeepLabV3_ResNet50_Weights.DEFAULT
    model = deeplabv3_resnet50(weights=weights)
    model.eval()

    # Step 2: Initialize the inference transforms
    preprocess = weights.transforms()

    # Step 3: Apply inference preprocessing transforms
    batch = preprocess(img).unsqueeze(0)

    # Step 4: Use the model and visualize the prediction
    prediction = model(batch)["out"]
    normalized_masks = prediction.softmax(dim=1)
    class_to_idx = {cls: idx for (idx, cls) in enumerate(weights.meta["categories"])}
    mask = normalized_masks[0, class_to_idx["dog"]]
    to_pil_image(mask)

    assert prediction.shape == (1, 21, 72, 96) and torch.isfinite(prediction).all()
    assert model.aux_classifier is not None  # the weights fix aux_loss=True, as torchvision's
    assert torch.equal(model.state_dict()["classifier.4.weight"], hub_with_default_weights["classifier.4.weight"])


def test_builder_keywords_and_return():
    """torchvision's keyword arguments; its return type (an OrderedDict with "out", "aux" with aux_loss)."""
    with torch.device("meta"):
        m = models.deeplab_v3_resnet50(weights=None, progress=False, num_classes=None, aux_loss=None,
                                       weights_backbone=None)
        assert m.num_classes == 21 and m.aux_classifier is None
        m2 = models.deeplabv3_resnet101(num_classes=4, aux_loss=True)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        y = models.deeplab_v3_resnet50(num_classes=3).eval()(x)
    assert isinstance(y, OrderedDict) and list(y) == ["out"] and y["out"].shape == (1, 3, 33, 33)
    assert m2.num_classes == 4 and m2.aux_classifier is not None
    assert models.get_model_builder("deeplab_v3_resnet50") is models.deeplab_v3_resnet50
    assert models.get_model_weights(models.deeplab_v3_resnet50) is models.DeepLabV3_ResNet50_Weights
    with pytest.raises(ValueError, match="whole model's weights"):
        models.get_model("deeplab_v3_resnet50", weights_backbone="COCO_WITH_VOC_LABELS_V1")
    with pytest.raises(FileNotFoundError, match="weights_backbone"):
        models.get_model("deeplab_v3_resnet50", weights_backbone="/nonexistent/resnet50.pth")
