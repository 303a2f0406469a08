"""Networks size themselves from the image shape; tasks give per-sample losses and metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from iqa_env.networks import Classifier, ControllerBackbone, UNet
from iqa_env.tasks import dice, make_task

SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32), (1, 64, 64), (1, 48, 80), (3, 128, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_classifier_shapes(shape):
    net = Classifier(shape, num_classes=3)
    assert net(torch.rand(5, *shape)).shape == (5, 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_unet_shapes(shape):
    net = UNet(shape)
    assert net(torch.rand(2, *shape)).shape == (2, 2, *shape[1:])


@pytest.mark.parametrize("shape", SHAPES)
def test_controller_backbone_shapes_and_range(shape):
    net = ControllerBackbone(shape)
    x = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    assert net.embed(x).shape == (6, net.embed_dim)
    scores = net.score(x)
    assert scores.shape == (6,) and bool(((scores >= 0) & (scores <= 1)).all())


def test_controller_is_applied_image_by_image():
    net = ControllerBackbone((1, 32, 32)).eval()
    x = torch.rand(8, 1, 32, 32)
    perm = torch.randperm(8)
    torch.testing.assert_close(net(x)[perm], net(x[perm]))
    torch.testing.assert_close(net(x)[:3], net(x[:3]))


@pytest.mark.parametrize(
    "make", [lambda s: Classifier(s, num_classes=2), UNet, ControllerBackbone], ids=["classifier", "unet", "controller"]
)
def test_networks_run_channels_last_and_compute_the_same_function(make):
    """The convolutions run channels-last (the CPU speed-up of docs/performance.md), forward and backward,
    and give what the same weights give in the default memory order, to float rounding."""
    shape = (1, 32, 32)
    torch.manual_seed(0)
    net = make(shape)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    # a weight with one input channel or a 1 x 1 kernel is both orders at once; check the others
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    wide = [m.weight for m in convs if min(m.weight.shape[1], m.weight.shape[-1]) > 1]
    assert wide and not any(w.is_contiguous(memory_format=torch.channels_last) for w in wide)
    x = torch.rand(4, *shape)
    out, ref = net(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), plain.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max(), name


@pytest.mark.parametrize("shape", [(1, 4, 32), (32, 32), (0, 32, 32)])
def test_bad_image_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="image_shape"):
        Classifier(shape, num_classes=2)


def test_dice_counts_empty_on_empty_as_one():
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    pred[1, :2] = 1
    target[1, :2] = 1
    pred[2, 0] = 1
    d = dice(pred, target)
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0, 0.0]))


def test_task_metrics_and_losses_are_per_sample():
    cls = make_task("classification")
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 0])
    assert cls.per_sample_loss(logits, targets).shape == (3,)
    torch.testing.assert_close(cls.per_sample_metric(logits, targets), torch.tensor([1.0, 0.0, 1.0]))
    seg = make_task("segmentation")
    logits = torch.randn(4, 2, 8, 8)
    masks = torch.randint(0, 2, (4, 8, 8))
    assert seg.per_sample_loss(logits, masks).shape == (4,)
    assert seg.per_sample_metric(logits, masks).shape == (4,)
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("detection")
