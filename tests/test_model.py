"""The network against the paper's numbers and against properties that must hold."""

import pytest
import torch
from torch import nn

from alexnet.lrn import LocalResponseNorm
from alexnet.model import build_model

VARIANTS = ["paper", "paper-ungrouped", "owt", "bn"]


def conv_params(cin, cout, k, groups=1, bias=True):
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def fc_params(fin, fout):
    return fin * fout + fout


FC = fc_params(9216, 4096) + fc_params(4096, 4096) + fc_params(4096, 1000)


def test_parameter_counts_match_the_published_figures():
    # Figures from the issue / torchvision; each also written out from the layer shapes.
    paper = (conv_params(3, 96, 11) + conv_params(96, 256, 5, 2) + conv_params(256, 384, 3)
             + conv_params(384, 384, 3, 2) + conv_params(384, 256, 3, 2) + FC)
    assert paper == 60_965_224
    assert build_model("paper").get_num_params() == 60_965_224
    assert build_model("paper-ungrouped").get_num_params() == 62_378_344
    assert build_model("owt").get_num_params() == 61_100_840
    # bn: the five convolutions lose their biases, each gains BatchNorm's weight and bias.
    conv_channels = 96 + 256 + 384 + 384 + 256
    assert build_model("bn").get_num_params() == 60_965_224 - conv_channels + 2 * conv_channels


@pytest.mark.parametrize("variant", VARIANTS)
def test_fc_width_sets_the_hidden_fully_connected_layers_only(variant):
    """model.fc_width: fc6 and fc7 of that many units (section 3.5's 4096 by default), every
    other layer as it was, and the paper's initialisation and forward pass as before."""
    full, narrow = build_model(variant, num_classes=7), build_model(variant, num_classes=7, fc_width=96)
    shapes = {k: tuple(v.shape) for k, v in narrow.state_dict().items()}
    for k, v in full.state_dict().items():
        if not k.startswith("classifier."):
            assert shapes[k] == tuple(v.shape), k
    fc = {n: tuple(m.weight.shape) for n, m in narrow.named_layers() if n.startswith("fc")}
    assert fc == {"fc6": (96, 9216), "fc7": (96, 96), "fc8": (7, 96)}
    assert narrow.get_num_params() == full.get_num_params() - (fc_params(9216, 4096) + fc_params(4096, 4096)
                                                               + fc_params(4096, 7)) + (
        fc_params(9216, 96) + fc_params(96, 96) + fc_params(96, 7))
    assert torch.equal(narrow.layer("fc7").bias, torch.ones(96))  # section 5's bias of 1, as in fc7 of 4096
    s = narrow.cfg.input_size
    with torch.no_grad():
        assert narrow.eval()(torch.randn(2, 3, s, s)).shape == (2, 7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [224, 227])
def test_output_shape(variant, size):
    m = build_model(variant, input_size=size, num_classes=17).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 17)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [224, 227])
def test_each_layer_has_the_papers_spatial_size(variant, size):
    """conv1 55, pool1 27, conv2 27, pool2 13, conv3-5 13, pool5 6 (Figure 2)."""
    m = build_model(variant, input_size=size).eval()
    seen = {}
    for name, layer in m.named_layers():
        layer.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, tuple(out.shape)))
    with torch.no_grad():
        m(torch.randn(1, 3, size, size))
    widths = {"paper": (96, 256, 384, 384, 256), "owt": (64, 192, 384, 256, 256)}
    w = widths["owt" if variant == "owt" else "paper"]
    expected = {"conv1": (1, w[0], 55, 55), "pool1": (1, w[0], 27, 27), "conv2": (1, w[1], 27, 27),
                "pool2": (1, w[1], 13, 13), "conv3": (1, w[2], 13, 13), "conv4": (1, w[3], 13, 13),
                "conv5": (1, w[4], 13, 13), "pool5": (1, 256, 6, 6),
                "fc6": (1, 4096), "fc7": (1, 4096), "fc8": (1, 1000)}
    assert {k: seen[k] for k in expected} == expected


def test_wrong_input_size_is_a_clear_error():
    m = build_model("paper")
    with pytest.raises(ValueError, match="expects \\(N, 3, 227, 227\\)"):
        m(torch.randn(1, 3, 224, 224))


def test_lrn_and_batchnorm_placement():
    def kinds(v):
        return [n for n, mod in build_model(v).named_layers() if isinstance(mod, (LocalResponseNorm, nn.BatchNorm2d))]

    assert kinds("paper") == ["norm1", "norm2"]  # after the ReLUs of conv1 and conv2 (section 3.5)
    assert kinds("paper-ungrouped") == ["norm1", "norm2"]
    assert kinds("owt") == []
    assert kinds("bn") == ["bn1", "bn2", "bn3", "bn4", "bn5"]


def _layer_output(conv, x):
    with torch.no_grad():
        return conv(x)


@pytest.mark.parametrize("name, grouped", [("conv2", True), ("conv3", False), ("conv4", True), ("conv5", True)])
def test_grouping_cuts_the_connections_between_the_two_gpus(name, grouped):
    """Section 3.2: conv2, conv4, conv5 see only the maps on their own GPU; conv3 sees all."""
    conv = build_model("paper").layer(name)
    x = torch.randn(1, conv.in_channels, 13, 13)
    x2 = x.clone()
    x2[:, : conv.in_channels // 2] += torch.randn_like(x2[:, : conv.in_channels // 2])  # first GPU's maps
    a, b = _layer_output(conv, x), _layer_output(conv, x2)
    half = conv.out_channels // 2
    assert not torch.allclose(a[:, :half], b[:, :half])  # the first GPU's kernels see the change
    if grouped:
        assert torch.equal(a[:, half:], b[:, half:])  # the second GPU's do not
    else:
        assert not torch.allclose(a[:, half:], b[:, half:])


def test_ungrouped_variant_connects_everything():
    conv = build_model("paper-ungrouped").layer("conv2")
    x = torch.randn(1, 96, 27, 27)
    x2 = x.clone()
    x2[:, :48] += 1.0
    assert not torch.allclose(_layer_output(conv, x)[:, 128:], _layer_output(conv, x2)[:, 128:])


@pytest.mark.parametrize("variant", ["paper", "owt"])
def test_initialisation_follows_section_5(variant):
    torch.manual_seed(0)
    m = build_model(variant)
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, layer in m.named_layers():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        w = layer.weight.detach().double()
        n = w.numel()
        # the sample std of n normal draws has std sigma / sqrt(2n); allow 6 of those
        assert abs(w.std().item() - 0.01) < 6 * 0.01 / (2 * n) ** 0.5, name
        assert abs(w.mean().item()) < 6 * 0.01 / n ** 0.5, name
        assert torch.all(layer.bias == (1.0 if name in ones else 0.0)), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_receives_a_gradient(variant):
    torch.manual_seed(0)
    m = build_model(variant, num_classes=10).train()
    s = m.cfg.input_size
    x = torch.randn(4, 3, s, s) * 50  # pixel-scale inputs, as after mean subtraction
    loss = nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_owt_loads_a_torchvision_state_dict():
    # torchvision.models.alexnet's keys and shapes, written out here (torchvision can't be imported).
    shapes = {
        "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
        "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
        "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
        "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
        "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
        "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
        "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
        "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
    }
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    m = build_model("owt", dropout_form="inverted")  # torchvision trained with nn.Dropout
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.layer("conv3").weight, sd["features.6.weight"])
    assert torch.equal(m.layer("fc8").bias, sd["classifier.6.bias"])
    # and the forward pass is torchvision's: conv/ReLU/pool stack, flatten, classifier
    m.eval()
    x = torch.randn(1, 3, 224, 224, generator=g)
    f = nn.functional
    h = f.max_pool2d(f.relu(f.conv2d(x, sd["features.0.weight"], sd["features.0.bias"], stride=4, padding=2)), 3, 2)
    h = f.max_pool2d(f.relu(f.conv2d(h, sd["features.3.weight"], sd["features.3.bias"], padding=2)), 3, 2)
    h = f.relu(f.conv2d(h, sd["features.6.weight"], sd["features.6.bias"], padding=1))
    h = f.relu(f.conv2d(h, sd["features.8.weight"], sd["features.8.bias"], padding=1))
    h = f.max_pool2d(f.relu(f.conv2d(h, sd["features.10.weight"], sd["features.10.bias"], padding=1)), 3, 2)
    h = f.relu(f.linear(h.flatten(1), sd["classifier.1.weight"], sd["classifier.1.bias"]))
    h = f.relu(f.linear(h, sd["classifier.4.weight"], sd["classifier.4.bias"]))
    ref = f.linear(h, sd["classifier.6.weight"], sd["classifier.6.bias"])
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-3)


def test_dropout_is_off_in_eval_mode():
    m = build_model("paper", num_classes=5).eval()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_sits_where_the_variant_puts_it(variant):
    """Section 4.2 drops the outputs of fc6's and fc7's hidden units; torchvision (owt)
    drops the inputs of fc6 and fc7."""
    names = [n for n, _ in build_model(variant).named_layers()]
    classifier = names[names.index("pool5") + 1:]
    if variant == "owt":
        assert classifier == ["drop6", "fc6", "relu6", "drop7", "fc7", "relu7", "fc8"]
    else:
        assert classifier == ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_the_papers_dropout_keeps_units_unscaled_and_halves_at_test_time(p):
    from alexnet.model import Dropout

    torch.manual_seed(0)
    x = torch.rand(64, 4096) + 0.5
    paper, inverted = Dropout(p, "paper"), Dropout(p, "inverted")
    y = paper(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])  # unscaled in training
    assert abs((~kept).float().mean().item() - p) < 0.01
    z = inverted(x)
    torch.testing.assert_close(z[z != 0], x[z != 0] / (1 - p))
    paper.eval(), inverted.eval()
    assert torch.equal(paper(x), x * (1 - p))
    assert torch.equal(inverted(x), x)


def test_paper_dropout_is_inverted_dropout_with_halved_next_layers():
    """The two forms are one function in evaluation once fc7's and fc8's weights are halved
    (each follows a dropout at p = 0.5); the forms differ in how the same weights train."""
    torch.manual_seed(0)
    paper = build_model("paper", num_classes=10).eval()
    inverted = build_model("paper", num_classes=10, dropout_form="inverted").eval()
    inverted.load_state_dict(paper.state_dict())
    with torch.no_grad():
        x = torch.randn(2, 3, 227, 227) * 60
        differ = not torch.allclose(paper(x), inverted(x), rtol=1e-3, atol=1e-3)
        for name in ("fc7", "fc8"):
            inverted.layer(name).weight.mul_(0.5)
        torch.testing.assert_close(paper(x), inverted(x), rtol=1e-5, atol=1e-5)
    assert differ


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_the_plain_pytorch_network(variant):
    """Outputs and gradients equal those of the obvious nn.Module version with the same weights."""
    from alexnet.reference import plain_alexnet

    torch.manual_seed(0)
    m = build_model(variant, num_classes=10).eval()
    ref = plain_alexnet(variant, num_classes=10, input_size=m.cfg.input_size,
                        paper_dropout=m.cfg.dropout_form == "paper").eval()  # (owt: nn.Dropout's form)
    ref.load_state_dict(m.state_dict(), strict=True)
    s = m.cfg.input_size
    x = torch.randn(2, 3, s, s) * 60
    out, out_ref = m(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
