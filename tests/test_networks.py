import pytest
import torch
from torch import nn

from tailwise import UserError
from tailwise.training.networks import (
    ARCHS,
    Classifier,
    ContrastiveModel,
    Normalize,
    build_encoder,
    param_groups,
)

CIFAR_ARCHS = ["resnet32", "resnet18", "resnet34"]
IMAGENET_ARCHS = ["resnet50", "resnext50"]
FEAT_DIMS = {"resnet32": 64, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnext50": 2048}


def _stats(channels):
    return [0.5] * channels, [0.25] * channels


@pytest.mark.parametrize(
    "arch,channels,size",
    [(a, c, s) for a in CIFAR_ARCHS for c, s in ((1, 28), (3, 32))]
    + [(a, c, 64) for a in IMAGENET_ARCHS for c in (1, 3)],
)
def test_forward_shapes(arch, channels, size):
    torch.manual_seed(0)
    mean, std = _stats(channels)
    model = Classifier(arch, channels, num_classes=7, mean=mean, std=std)
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, FEAT_DIMS[arch])
    assert model.fc.in_features == FEAT_DIMS[arch]


def test_registry():
    assert sorted(ARCHS) == sorted(FEAT_DIMS)
    encoder, feat_dim = build_encoder("resnet32", 3)
    assert feat_dim == 64 and encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 64)


def test_cifar_stem_keeps_resolution():
    encoder, _ = build_encoder("resnet18", 3)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)
    imagenet, _ = build_encoder("resnet50", 1)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.in_channels == 1


@pytest.mark.parametrize("arch,channels,size", [("resnet32", 1, 28), ("resnet32", 3, 32), ("resnet18", 3, 32)])
def test_uint8_and_float_inputs_give_same_logits(arch, channels, size):
    torch.manual_seed(0)
    mean, std = [0.2, 0.4, 0.6][:channels], [0.3, 0.2, 0.1][:channels]
    model = Classifier(arch, channels, 5, mean, std).eval()
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float() / 255.0), rtol=1e-5, atol=1e-5)


def test_normalize_values():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 1.0])
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = torch.tensor([(0 - 0.5) / 0.5, (1 - 0.25) / 0.25, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x.float() / 255), expected)
    assert set(dict(norm.named_buffers())) == {"mean", "std"}


def test_resnet32_parameter_count():
    model = Classifier("resnet32", 3, 10, *_stats(3))
    n = sum(p.numel() for p in model.parameters())
    assert 0.455e6 < n < 0.47e6, n  # the usual "0.46M" ResNet-32 (option-A shortcuts)


def test_param_groups_split():
    model = Classifier("resnet32", 3, 10, *_stats(3))
    model.encoder.conv1.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    named = dict(model.named_parameters())
    for name, p in named.items():
        if not p.requires_grad:
            assert id(p) not in decay | no_decay
        elif p.ndim >= 2:
            assert id(p) in decay, name
        else:
            assert id(p) in no_decay, name
    assert id(named["fc.bias"]) in no_decay and id(named["encoder.bn1.weight"]) in no_decay
    assert id(named["fc.weight"]) in decay
    assert len(decay) + len(no_decay) == len(named) - 1
    torch.optim.AdamW(groups, lr=1e-3)  # accepted by an optimizer


def test_contrastive_model_embeddings_and_encoder_handover():
    torch.manual_seed(0)
    mean, std = _stats(1)
    stage1 = ContrastiveModel("resnet32", 1, mean, std)
    z = stage1(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
    assert z.shape == (4, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert [m.out_features for m in stage1.projector if isinstance(m, nn.Linear)] == [2048, 128]
    # stage 2 takes the stage-1 encoder (and normalisation) by state_dict keys
    stage2 = Classifier("resnet32", 1, 10, mean, std)
    kept = {k: v for k, v in stage1.state_dict().items() if not k.startswith("projector.")}
    missing, unexpected = stage2.load_state_dict(kept, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    stage1.eval(), stage2.eval()
    torch.testing.assert_close(stage1.features(x), stage2.features(x))


def test_cosine_head():
    torch.manual_seed(0)
    model = Classifier("resnet32", 3, 4, *_stats(3), head="cosine")
    logits = model(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (5, 4) and logits.abs().max() <= 1 + 1e-6
    feats = model.features(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    expected = torch.nn.functional.cosine_similarity(feats[:, None], model.fc.weight[None], dim=2)
    torch.testing.assert_close(model.fc(feats), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(arch="resnet99"), "resnet99"),
        (dict(head="mlp"), "mlp"),
        (dict(mean=[0.5, 0.5]), "channels"),
    ],
)
def test_bad_options_raise_user_error(kwargs, option):
    args = dict(arch="resnet32", in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)
    args.update(kwargs)
    if "mean" in kwargs:
        args["std"] = [0.25] * len(kwargs["mean"])
    with pytest.raises(UserError, match=option):
        Classifier(**args)
