"""Model zoo: heads, input handling, pretrained weights from caches, local files and the lite0 package."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torchvision

from covidxr.images.reader import load_xray
from covidxr.networks.architectures import WeightsError, XrayClassifier, build_model, target_layer
from covidxr.preprocessing.transforms import letterbox


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0", "convnext_tiny", "vgg16", "alexnet",
                                  "googlenet", "efficientnet_lite0"])
def test_every_family_gets_a_new_head_and_takes_grey_images(arch: str) -> None:
    model = build_model(arch, num_classes=3, weights="none").eval()
    assert isinstance(model, XrayClassifier) and model.head.out_features == 3
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in model.modules())
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64) if arch not in ("alexnet", "vgg16", "googlenet") else
                    torch.rand(1, 1, 96, 96))
    assert out.shape[1] == 3 and torch.isfinite(out).all()
    assert isinstance(target_layer(model), torch.nn.Module)


def test_resnet_target_layer_is_last_bottleneck() -> None:
    model = build_model("resnet50", 2, "none")
    assert target_layer(model) is model.backbone.layer4[-1]


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(WeightsError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000", 3, "none")


def test_imagenet_weights_come_from_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    reference = torchvision.models.resnet18(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / Path(enum.url).name)
    model = build_model("resnet18", 3, "imagenet")
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, reference[key], msg=key)
    assert model.mean.flatten().tolist() == pytest.approx(enum.transforms().mean)


def test_offline_imagenet_error_names_file_cache_folder_and_alternative(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        build_model("resnet50", 3, "imagenet")
    message = str(err.value)
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in message and "--weights PATH" in message and "\n" not in message


def test_local_weights_file_loads_backbone_and_ignores_imagenet_head(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 4, tmp_path / "r18.pth")
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)


def test_local_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit resnet50"):
        build_model("resnet50", 3, tmp_path / "r18.pth")


def test_efficientnet_lite0_package_weights_recognise_grace_hopper() -> None:
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    model = build_model("efficientnet_lite0", 1000, "imagenet").eval()
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    # Use the pretrained ImageNet head itself: rebuild the timm model with its classifier and the package weights.
    import timm

    from covidxr.networks.architectures import _build_lite0

    net, mean, std = _build_lite0("efficientnet_lite0", pretrained=True)
    assert isinstance(net, timm.models.efficientnet.EfficientNet)
    from PIL import Image

    rgb = np.asarray(Image.open(photo).convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None] - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net.eval()(x).topk(5).indices[0].tolist()
    assert 652 in top5  # ImageNet 'military uniform'
    # The same weights behind the grey-input wrapper (mean/std 0.5 inside the model) give finite logits.
    grey = letterbox(load_xray(photo).pixels, 224)[None]
    with torch.no_grad():
        assert torch.isfinite(model(grey)).all()


def test_checkpoint_rebuild_restores_the_weights_normalisation() -> None:
    from covidxr.model.build import model_from_checkpoint
    from covidxr.networks.architectures import preprocess_for

    trained = build_model("efficientnet_lite0", 3, "imagenet").eval()
    ckpt = {"arch": "efficientnet_lite0", "classes": ["a", "b", "c"], "model": trained.state_dict(),
            "preprocess": preprocess_for(trained, 64).to_dict()}
    rebuilt = model_from_checkpoint(ckpt).eval()
    assert rebuilt.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x))


def test_checkpoint_with_other_class_count_is_refused() -> None:
    from covidxr.errors import CheckpointError
    from covidxr.model.build import model_from_checkpoint
    from covidxr.networks.architectures import preprocess_for

    model = build_model("resnet18", 3, "none")
    ckpt = {"arch": "resnet18", "classes": ["a", "b"], "model": model.state_dict(),
            "preprocess": preprocess_for(model, 64).to_dict()}
    with pytest.raises(CheckpointError, match="do not fit resnet18 with 2 classes"):
        model_from_checkpoint(ckpt)
