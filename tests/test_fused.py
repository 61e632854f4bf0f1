"""The fast path: ReLU -> LRN -> max-pool as one kernel on channels_last tensors, and the
whole network run that way, against the same operations done one by one.

Tolerances: the fused kernel against a float64 oracle within a few float32 roundings
(forward 2e-5 relative, gradient 1e-4 relative); on bfloat16 tensors, the oracle rounded
once to bfloat16. The whole network on the fast path
against the plain nn.Module network in float32: outputs within 1e-4, and each gradient
within 1e-4 of its largest magnitude (channels-last convolutions sum in another order,
so single small entries of a large weight gradient differ by more than their own 1e-3).
"""

import math

import pytest
import torch
from torch import nn

from alexnet import model as model_mod
from alexnet.config import LRNConfig
from alexnet.lrn import LocalResponseNorm, block_fusable, relu_lrn_pool
from alexnet.model import build_model
from alexnet.reference import plain_alexnet
from tests.test_lrn import kernel_available

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C compiler: the fused kernel cannot be built")

CL = torch.channels_last


def oracle(x: torch.Tensor, lrn: LRNConfig | None, z: int, s: int) -> torch.Tensor:
    """The unfused chain in float64 (the LRN module takes its torch path for float64)."""
    y = torch.relu(x.double())
    if lrn is not None:
        y = LocalResponseNorm(lrn)(y)
    return nn.functional.max_pool2d(y, z, s)


LRNS = {"paper": LRNConfig(), "caffe": LRNConfig(form="caffe", k=1.0), "none": None,
        "beta-0.5": LRNConfig(beta=0.5, size=3)}
SHAPES = [(2, 96, 55, 55), (3, 256, 27, 27), (2, 256, 13, 13), (2, 5, 9, 12), (1, 3, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lrn", LRNS, ids=str)
def test_forward_and_gradient_match_the_chain(shape, lrn):
    torch.manual_seed(0)
    cfg = LRNS[lrn]
    x = (torch.randn(shape) * 30).contiguous(memory_format=CL).requires_grad_()
    assert block_fusable(x)
    y = relu_lrn_pool(x, cfg, (3, 2))
    assert y.is_contiguous(memory_format=CL)
    xr = x.detach().double().requires_grad_()
    yr = oracle(xr, cfg, 3, 2)
    torch.testing.assert_close(y.double(), yr, rtol=2e-5, atol=1e-6)
    g = torch.randn_like(yr)
    (y * g.float()).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


BF16_ULP = 2.0 ** -8  # bfloat16 keeps 8 significant bits: one rounding is within half of this


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("lrn", LRNS, ids=str)
def test_bfloat16_block_is_the_float64_chain_rounded_once(shape, lrn):
    """bf16 autocast's activations: the kernel widens them to float32, and rounds only its
    result, so the output is the exact chain's rounded to bfloat16 (ties aside)."""
    torch.manual_seed(0)
    cfg = LRNS[lrn]
    x = (torch.randn(shape) * 30).to(torch.bfloat16).contiguous(memory_format=CL).requires_grad_()
    assert block_fusable(x)
    y = relu_lrn_pool(x, cfg, (3, 2))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    xr = x.detach().double().requires_grad_()
    yr = oracle(xr, cfg, 3, 2)
    exact = (y == yr.to(torch.bfloat16)).double().mean().item()
    assert exact > 0.999, f"only {exact:.4%} of the outputs are the oracle's rounding"
    assert ((y.double() - yr).abs() <= BF16_ULP * yr.abs()).all()
    g = torch.randn_like(yr).to(torch.bfloat16)
    (y * g).sum().backward()
    (yr * g.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    err = (x.grad.double() - xr.grad).abs()
    assert (err <= BF16_ULP * xr.grad.abs() + 1e-5 * xr.grad.abs().max()).all(), err.max()


def test_bfloat16_network_forward_is_bit_identical_to_the_unfused_chain(monkeypatch):
    """Under bf16 autocast the unfused chain rounds after the LRN, then pools; rounding is
    monotonic, so pooling the rounded values is rounding the pooled ones: the same bits.
    Gradients: bf16 autocast itself moves them from float32's by 10-60% of their largest
    entry here (the gradient of a squared sum of logits); the fused kernel must add nothing
    to that."""
    calls = count_fused(monkeypatch)
    torch.manual_seed(0)
    m = build_model("paper", num_classes=10, init="kaiming").to(memory_format=CL)
    x = (torch.randn(2, 3, 227, 227) * 60).contiguous(memory_format=CL)
    runs = {}
    for name, fuse, amp in (("fp32", False, False), ("fused", True, True), ("unfused", False, True)):
        m.fuse = fuse
        m.zero_grad()
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(x)
        out.float().square().sum().backward()
        runs[name] = (out.detach(), [p.grad.clone() for p in m.parameters()])
    assert calls == [1, 1, 1]  # the fused run only
    assert runs["fused"][0].dtype == torch.bfloat16 and torch.equal(runs["fused"][0], runs["unfused"][0])
    for i, (name, _) in enumerate(m.named_parameters()):
        ref = runs["fp32"][1][i]
        fused, unfused = ((runs[k][1][i] - ref).abs().max().item() for k in ("fused", "unfused"))
        assert fused <= 1.1 * unfused + 1e-3 * ref.abs().max().item(), (name, fused, unfused)


@pytest.mark.parametrize("z,s", [(2, 2), (3, 1), (5, 3)])
def test_other_pooling_windows(z, s):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 11, 10).contiguous(memory_format=CL).requires_grad_()
    y = relu_lrn_pool(x, LRNConfig(), (z, s))
    xr = x.detach().double().requires_grad_()
    yr = oracle(xr, LRNConfig(), z, s)
    torch.testing.assert_close(y.double(), yr, rtol=2e-5, atol=1e-6)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)


def test_ties_send_the_gradient_where_max_pool_does():
    """Equal values in a window (plateaus of the input) route the gradient to the first one,
    as torch's max_pool2d does; a ReLU-zeroed window passes nothing back."""
    x = torch.zeros(1, 4, 7, 7)
    x[0, :, 2:5, 2:5] = 2.0  # a plateau spanning several windows
    x[0, 1] = -1.0  # all negative: zero after the ReLU
    x = x.contiguous(memory_format=CL).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    relu_lrn_pool(x, None).sum().backward()
    nn.functional.max_pool2d(torch.relu(ref), 3, 2).sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert x.grad[0, 1].abs().sum() == 0


def test_nan_propagates_like_max_pool():
    x = torch.rand(1, 3, 5, 5)
    x[0, 0, 1, 1] = math.nan
    out = relu_lrn_pool(x.contiguous(memory_format=CL), None)
    ref = nn.functional.max_pool2d(torch.relu(x), 3, 2)
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num())


def test_no_grad_gives_the_same_values_and_leaves_the_input_alone():
    torch.manual_seed(2)
    x = torch.randn(2, 16, 13, 13).contiguous(memory_format=CL)
    before = x.clone()
    with torch.no_grad():
        a = relu_lrn_pool(x, LRNConfig())
    b = relu_lrn_pool(x.requires_grad_(), LRNConfig())
    assert torch.equal(a, b.detach())
    assert torch.equal(x.detach(), before)


def test_inputs_the_kernel_does_not_take_use_the_chain():
    torch.manual_seed(3)
    x = torch.randn(2, 8, 9, 9)
    assert not block_fusable(x)  # NCHW
    assert not block_fusable(x.double().contiguous(memory_format=CL))
    torch.testing.assert_close(relu_lrn_pool(x, LRNConfig()).double(), oracle(x, LRNConfig(), 3, 2),
                               rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="larger than"):
        relu_lrn_pool(torch.randn(1, 4, 2, 2).contiguous(memory_format=CL), None)


def test_alexnet_lrn_torch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ALEXNET_LRN", "torch")
    assert not block_fusable(torch.randn(1, 8, 5, 5).contiguous(memory_format=CL))


# ----------------------------------------------------------------------------- the network


def assert_close_scaled(a: torch.Tensor, b: torch.Tensor, name: str, rel: float = 1e-4) -> None:
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale + 1e-7, f"{name}: max difference {err:.3g} against largest entry {scale:.3g}"


def count_fused(monkeypatch) -> list[int]:
    calls = []

    def counted(x, lrn, pool):
        calls.append(int(block_fusable(x)))
        return relu_lrn_pool(x, lrn, pool)

    monkeypatch.setattr(model_mod, "relu_lrn_pool", counted)
    return calls


@pytest.mark.parametrize("variant,blocks", [("paper", 3), ("paper-ungrouped", 3), ("owt", 3), ("bn", 3)])
def test_fast_path_matches_the_plain_network(variant, blocks, monkeypatch):
    """channels_last + fused blocks against the obvious NCHW nn.Module network, same weights."""
    torch.manual_seed(0)
    calls = count_fused(monkeypatch)
    m = build_model(variant, num_classes=10, init="kaiming").eval().to(memory_format=CL)
    ref = plain_alexnet(variant, num_classes=10, input_size=m.cfg.input_size,
                        paper_dropout=m.cfg.dropout_form == "paper").eval()  # (owt: nn.Dropout's form)
    ref.load_state_dict(m.state_dict(), strict=True)
    s = m.cfg.input_size
    x = torch.randn(2, 3, s, s) * 60
    out, out_ref = m(x.contiguous(memory_format=CL)), ref(x)
    assert calls == [1] * blocks, "every ReLU-(LRN)-pool run went through the kernel"
    # against the largest logit: oneDNN sums in another order for channels_last, and an
    # element-wise rtol fails on the small logits beside large ones (bn: 3.7e-4 on 1.4 where
    # the largest is 425, 2e-6 of the scale, on one CPU)
    assert_close_scaled(out, out_ref, "logits", rel=2e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert_close_scaled(p.grad, q.grad, name)


def test_training_mode_with_dropout_matches_the_unfused_model():
    """Same seed, same dropout masks: fused and unfused give the same logits and gradients."""
    m = build_model("paper", num_classes=10, init="kaiming").to(memory_format=CL)
    x = (torch.randn(3, 3, 227, 227) * 60).contiguous(memory_format=CL)
    grads = []
    for fuse in (True, False):
        m.fuse = fuse
        m.zero_grad()
        torch.manual_seed(5)
        out = m(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    for (name, _), a, b in zip(m.named_parameters(), grads[0][1], grads[1][1]):
        assert_close_scaled(a, b, name)


def test_a_hook_on_a_fused_layer_sees_its_output(monkeypatch):
    """Looking at norm1 (e.g. to draw its maps) runs that block unfused; the others stay fused."""
    calls = count_fused(monkeypatch)
    m = build_model("paper", num_classes=10).eval().to(memory_format=CL)
    seen = {}
    handle = m.layer("norm1").register_forward_hook(lambda mod, i, o: seen.update(norm1=o.shape))
    with torch.no_grad():
        m(torch.randn(1, 3, 227, 227).contiguous(memory_format=CL))
    assert seen["norm1"] == (1, 96, 55, 55)
    assert len(calls) == 2
    handle.remove()


def test_a_hook_on_the_features_sequential_is_called(monkeypatch):
    """A hook on model.features (torchvision's idiom for the conv part's output) fires on
    channels_last input too; that call runs the Sequential, so nothing is fused."""
    calls = count_fused(monkeypatch)
    m = build_model("paper", num_classes=10).eval().to(memory_format=CL)
    seen = []
    handle = m.features.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(torch.randn(1, 3, 227, 227).contiguous(memory_format=CL))
    assert seen == [(1, 256, 6, 6)] and calls == []
    handle.remove()
    with torch.no_grad():
        m(torch.randn(1, 3, 227, 227).contiguous(memory_format=CL))
    assert len(calls) == 3  # fused again once the hook is gone


def test_layers_changed_after_building_are_honoured_on_the_fast_path():
    """Swapping a layer or changing an LRN's settings after build_model: the channels_last
    path computes what the NCHW module path computes (it used to keep the plan of the
    layers it was built with)."""
    torch.manual_seed(0)
    m = build_model("paper", num_classes=10, init="kaiming").eval()
    m.layer("norm2").cfg = LRNConfig(form="caffe", k=1.0)
    m.features[2] = nn.Identity()  # norm1 out
    x = torch.randn(2, 3, 227, 227) * 60
    with torch.no_grad():
        want = m._features(x)
        got = m._features(x.contiguous(memory_format=CL))
    assert_close_scaled(got, want, "features", rel=2e-5)


def test_nchw_input_and_fuse_off_take_the_module_path(monkeypatch):
    calls = count_fused(monkeypatch)
    m = build_model("paper", num_classes=10).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 227, 227))
        m.fuse = False
        m(torch.randn(1, 3, 227, 227).contiguous(memory_format=CL))
    assert calls == []
