"""Local response normalisation (section 3.3) against oracles written out here.

Both implementations are checked: the C kernel ("c") and the pure-torch path ("torch",
forced with ALEXNET_LRN=torch). Oracles: the formula with explicit loops over channels
in numpy float64; a float64 torch re-implementation for gradients; and
torch.nn.LocalResponseNorm, which is Caffe's form.
"""

import warnings

import numpy as np
import pytest
import torch

from alexnet import lrn
from alexnet.config import LRNConfig
from alexnet.lrn import LocalResponseNorm, backend, local_response_norm

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# float32 results against float64 oracles: a few float32 roundings per output.
RTOL, ATOL = 2e-5, 1e-6
# The gradient sums a window of products, so it gets a looser tolerance.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def kernel_available() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lrn._load() is not None


@pytest.fixture(params=["c", "torch"])
def path(request, monkeypatch):
    """Runs the test once on the C kernel (skipped without a compiler), once on the torch path."""
    if request.param == "c":
        monkeypatch.delenv("ALEXNET_LRN", raising=False)
        if not kernel_available():
            pytest.skip("no working C compiler: the kernel cannot be built")
    else:
        monkeypatch.setenv("ALEXNET_LRN", "torch")
    return request.param


def alpha_sum(size, alpha, form):
    return alpha if form == "paper" else alpha / size


def oracle(a, size, alpha, beta, k, form):
    """b[:, i] = a[:, i] / (k + alpha' * sum_{j=max(0,i-n//2)}^{min(C-1,i+n//2)} a[:, j]^2)^beta."""
    a = np.asarray(a, dtype=np.float64)
    C = a.shape[1]
    b = np.empty_like(a)
    for i in range(C):
        s = np.zeros_like(a[:, 0])
        for j in range(max(0, i - size // 2), min(C - 1, i + size // 2) + 1):
            s += a[:, j] ** 2
        b[:, i] = a[:, i] / (k + alpha_sum(size, alpha, form) * s) ** beta
    return b


def reference(x, size, alpha, beta, k, form):
    """The same formula in differentiable torch ops (use float64), one channel at a time."""
    C = x.shape[1]
    out = []
    for i in range(C):
        window = x[:, max(0, i - size // 2): min(C - 1, i + size // 2) + 1]
        d = k + alpha_sum(size, alpha, form) * (window**2).sum(dim=1)
        out.append(x[:, i] / d**beta)
    return torch.stack(out, dim=1)


def sample(shape, scale=3.0, seed=0, fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).contiguous(memory_format=fmt)


@pytest.mark.parametrize("form", ["paper", "caffe"])
@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("k,beta", [(2.0, 0.75), (1.0, 0.75), (0.5, 0.6), (2.0, 1.0)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_matches_the_formula(path, form, size, k, beta, fmt):
    cfg = LRNConfig(size=size, alpha=0.05, beta=beta, k=k, form=form)
    x = sample((2, 9, 4, 5), fmt=FORMATS[fmt])
    y = local_response_norm(x, cfg)
    assert backend(x) == path
    np.testing.assert_allclose(y.numpy(), oracle(x.numpy(), size, 0.05, beta, k, form), rtol=RTOL, atol=ATOL)


def test_the_paper_hyperparameters_on_activation_sized_values(path):
    # alpha = 1e-4 only matters for large activations: x ~ 100 puts alpha * sum near k.
    cfg = LRNConfig()
    x = sample((2, 16, 6, 6), scale=100.0)
    want = oracle(x.numpy(), 5, 1e-4, 0.75, 2.0, "paper")
    assert np.abs(want / x.numpy().astype(np.float64)).min() < 0.6  # the division does something
    np.testing.assert_allclose(local_response_norm(x, cfg).numpy(), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("C,size", [(1, 5), (2, 5), (3, 7), (4, 9)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fewer_channels_than_the_window(path, C, size, fmt):
    cfg = LRNConfig(size=size, alpha=0.1, beta=0.75, k=1.0)
    x = sample((3, C, 3, 2), fmt=FORMATS[fmt])
    np.testing.assert_allclose(local_response_norm(x, cfg).numpy(), oracle(x.numpy(), size, 0.1, 0.75, 1.0, "paper"),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_first_and_last_maps_see_only_the_maps_that_exist(path, fmt):
    # n = 5 over C = 6 maps: map 0 sums maps 0..2, map 5 sums maps 3..5, map 2 sums maps 0..4.
    cfg = LRNConfig(size=5, alpha=0.2, beta=0.75, k=2.0)
    x = sample((2, 6, 3, 3), fmt=FORMATS[fmt])
    a = x.double().numpy()
    y = local_response_norm(x, cfg).double().numpy()
    sq = a**2
    np.testing.assert_allclose(y[:, 0], a[:, 0] / (2 + 0.2 * (sq[:, 0] + sq[:, 1] + sq[:, 2])) ** 0.75, rtol=RTOL)
    np.testing.assert_allclose(y[:, 5], a[:, 5] / (2 + 0.2 * (sq[:, 3] + sq[:, 4] + sq[:, 5])) ** 0.75, rtol=RTOL)
    np.testing.assert_allclose(y[:, 2], a[:, 2] / (2 + 0.2 * sq[:, 0:5].sum(1)) ** 0.75, rtol=RTOL)


@pytest.mark.parametrize("form", ["paper", "caffe"])
@pytest.mark.parametrize("size,beta", [(1, 0.75), (3, 0.75), (5, 0.75), (7, 0.75), (5, 0.6)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradient_matches_autograd_of_the_formula(path, form, size, beta, fmt):
    cfg = LRNConfig(size=size, alpha=0.05, beta=beta, k=1.5, form=form)
    x = sample((2, 10, 4, 3), fmt=FORMATS[fmt]).requires_grad_()
    g = sample((2, 10, 4, 3), scale=1.0, seed=1)
    local_response_norm(x, cfg).backward(g)
    x64 = x.detach().double().requires_grad_()
    reference(x64, size, 0.05, beta, 1.5, form).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_gradcheck_of_the_torch_path_in_float64(monkeypatch):
    monkeypatch.setenv("ALEXNET_LRN", "torch")
    for cfg in [LRNConfig(size=5, alpha=0.1, beta=0.75, k=1.0), LRNConfig(size=3, alpha=0.3, beta=0.6, k=0.5, form="caffe")]:
        x = sample((2, 6, 3, 2), scale=1.5).double().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: local_response_norm(t, cfg), (x,))


@pytest.mark.parametrize("form", ["paper", "caffe"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_agrees_with_the_torch_path(monkeypatch, form, fmt):
    # Agreement to float32 rounding, forward and backward (tolerance RTOL/ATOL, GRAD_*).
    # 70 channels and 33 x 37 pixels cover the kernel's partial strips and pixel blocks.
    if not kernel_available():
        pytest.skip("no working C compiler: the kernel cannot be built")
    cfg = LRNConfig(alpha=0.01, form=form)
    x = sample((2, 70, 33, 37), scale=10.0, fmt=FORMATS[fmt])
    g = sample((2, 70, 33, 37), scale=1.0, seed=1, fmt=FORMATS[fmt])
    results = {}
    for path in ["c", "torch"]:
        monkeypatch.setenv("ALEXNET_LRN", path)
        xi = x.clone().requires_grad_()
        y = local_response_norm(xi, cfg)
        y.backward(g)
        results[path] = (y, xi.grad)
    torch.testing.assert_close(results["c"][0], results["torch"][0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(results["c"][1], results["torch"][1], rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1e-4, 0.75, 2.0), (3, 0.5, 0.75, 1.0), (7, 0.2, 0.5, 1.5)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_caffe_form_equals_torch_nn_local_response_norm(path, size, alpha, beta, k, fmt):
    cfg = LRNConfig(size=size, alpha=alpha, beta=beta, k=k, form="caffe")
    x = sample((2, 12, 5, 5), scale=20.0 if alpha < 1e-3 else 2.0, fmt=FORMATS[fmt])
    g = sample((2, 12, 5, 5), scale=1.0, seed=1)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = local_response_norm(ours_x, cfg)
    theirs = torch.nn.LocalResponseNorm(size, alpha, beta, k)(theirs_x)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_and_gradient_keep_the_input_memory_format(path, fmt):
    x = sample((2, 8, 5, 5), fmt=FORMATS[fmt]).requires_grad_()
    y = local_response_norm(x, LRNConfig())
    y.backward(torch.ones_like(y))  # ones_like keeps the format; the kernel copes with any
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    assert x.grad.is_contiguous(memory_format=FORMATS[fmt])


def test_gradient_arriving_in_the_other_format(path):
    cfg = LRNConfig(alpha=0.05)
    x = sample((2, 9, 4, 4), fmt=torch.channels_last).requires_grad_()
    g = sample((2, 9, 4, 4), scale=1.0, seed=1)  # NCHW while x is channels_last
    local_response_norm(x, cfg).backward(g)
    x64 = x.detach().double().requires_grad_()
    reference(x64, 5, 0.05, 0.75, 2.0, "paper").backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_non_contiguous_input(path):
    cfg = LRNConfig(alpha=0.05)
    x = sample((2, 9, 6, 8))[:, :, ::2, 1:]  # strided view
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(local_response_norm(x, cfg).numpy(), oracle(x.numpy(), 5, 0.05, 0.75, 2.0, "paper"),
                               rtol=RTOL, atol=ATOL)


def test_no_grad_gives_the_same_values(path):
    cfg = LRNConfig(alpha=0.05)
    x = sample((2, 9, 4, 4)).requires_grad_()
    with torch.no_grad():
        y0 = local_response_norm(x, cfg)
    assert not y0.requires_grad
    torch.testing.assert_close(y0, local_response_norm(x, cfg), rtol=0, atol=0)


def test_float64_takes_the_torch_path_and_keeps_its_precision(monkeypatch):
    monkeypatch.delenv("ALEXNET_LRN", raising=False)
    x = sample((2, 7, 3, 3)).double()
    assert backend(x) == "torch"
    y = local_response_norm(x, LRNConfig(alpha=0.05))
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), oracle(x.numpy(), 5, 0.05, 0.75, 2.0, "paper"), rtol=1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_input(path, fmt):
    x = sample((2, 9, 4, 4), fmt=FORMATS[fmt]).bfloat16().requires_grad_()
    y = local_response_norm(x, LRNConfig(alpha=0.05))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=FORMATS[fmt])
    want = oracle(x.detach().float().numpy(), 5, 0.05, 0.75, 2.0, "paper")
    np.testing.assert_allclose(y.float().detach().numpy(), want, rtol=2e-2, atol=1e-2)  # bf16: 8 bits
    g = sample((2, 9, 4, 4), scale=1.0, seed=1)
    y.backward(g.bfloat16())
    x64 = x.detach().double().requires_grad_()
    reference(x64, 5, 0.05, 0.75, 2.0, "paper").backward(g.bfloat16().double())
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_beyond_256_do_not_overflow(path, dtype):
    """In float16, a^2 overflows from |a| = 256: computed in that type, the whole window's
    outputs were 0. The values are ReLU outputs of the size a first layer gives."""
    x = torch.tensor([10.0, 100.0, 300.0, 50.0, 20.0, 700.0, 5.0]).reshape(1, 7, 1, 1).repeat(2, 1, 3, 3)
    x = x.to(dtype).requires_grad_()
    y = local_response_norm(x, LRNConfig(alpha=1e-4))
    want = oracle(x.detach().float().numpy(), 5, 1e-4, 0.75, 2.0, "paper")
    np.testing.assert_allclose(y.detach().float().numpy(), want, rtol=1e-2)
    g = torch.ones_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    reference(x64, 5, 1e-4, 0.75, 2.0, "paper").backward(g.double())
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-3)


def test_under_cpu_autocast(path):
    conv = torch.nn.Conv2d(3, 8, 3)
    norm = LocalResponseNorm(LRNConfig(alpha=0.05))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = norm(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    want = oracle(h.detach().float().numpy(), 5, 0.05, 0.75, 2.0, "paper")
    np.testing.assert_allclose(y.detach().float().numpy(), want, rtol=2e-2, atol=1e-2)


def test_the_kernel_runs_when_a_compiler_exists(monkeypatch):
    monkeypatch.delenv("ALEXNET_LRN", raising=False)
    if not kernel_available():
        pytest.skip("no working C compiler: the kernel cannot be built")
    x = sample((2, 8, 4, 4)).requires_grad_()
    assert backend(x) == "c"
    assert type(local_response_norm(x, LRNConfig()).grad_fn).__name__ == "_KernelLRNBackward"
    # ... and not the torch path under another name: break that path and run again.
    monkeypatch.setattr(lrn, "_torch_denominator", None)
    local_response_norm(x, LRNConfig()).sum().backward()
    monkeypatch.setenv("ALEXNET_LRN", "torch")
    assert backend(x) == "torch"
    with pytest.raises(TypeError):
        local_response_norm(x, LRNConfig())


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Forget the loaded kernel and build into an empty cache folder."""
    monkeypatch.setattr(lrn, "_lib", None)
    monkeypatch.setattr(lrn, "_lib_failed", False)
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path))
    monkeypatch.delenv("ALEXNET_LRN", raising=False)
    return tmp_path


def test_a_failing_compiler_warns_once_and_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits with status 1
    x = sample((2, 7, 3, 3))
    with pytest.warns(RuntimeWarning, match="C kernel unavailable") as record:
        y = local_response_norm(x, LRNConfig(alpha=0.05))
        local_response_norm(x, LRNConfig(alpha=0.05))
        assert backend(x) == "torch"
    assert len(record) == 1 and "\n" not in str(record[0].message)
    np.testing.assert_allclose(y.numpy(), oracle(x.numpy(), 5, 0.05, 0.75, 2.0, "paper"), rtol=RTOL, atol=ATOL)
    assert not list(fresh_build.iterdir())  # no temporary file left behind


def test_the_build_is_cached(fresh_build):
    if not kernel_available():  # builds into the fresh cache
        pytest.skip("no working C compiler: the kernel cannot be built")
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].name.startswith("lrn-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    lrn._lib = None  # a new process: finds the library, compiles nothing
    assert lrn._build() == built[0] and built[0].stat().st_mtime_ns == mtime


def test_input_must_be_four_dimensional():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        local_response_norm(torch.randn(3, 4, 5), LRNConfig())


def test_module_interface():
    m = LocalResponseNorm(LRNConfig(form="caffe"))
    assert m.extra_repr() == "size=5, alpha=0.0001, beta=0.75, k=2.0, form=caffe"
    assert LocalResponseNorm().cfg == LRNConfig()
    x = sample((1, 6, 3, 3), scale=30.0)
    torch.testing.assert_close(m(x), local_response_norm(x, LRNConfig(form="caffe")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_torch_path():
    x = sample((2, 9, 4, 4)).cuda().requires_grad_()
    assert backend(x) == "torch"
    y = local_response_norm(x, LRNConfig(alpha=0.05))
    np.testing.assert_allclose(y.detach().cpu().numpy(), oracle(x.detach().cpu().numpy(), 5, 0.05, 0.75, 2.0, "paper"),
                               rtol=1e-4, atol=1e-5)
    y.backward(torch.ones_like(y))
    x64 = x.detach().cpu().double().requires_grad_()
    reference(x64, 5, 0.05, 0.75, 2.0, "paper").backward(torch.ones_like(x64))
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-3, atol=1e-4)
