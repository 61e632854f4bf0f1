"""Local response normalisation across channels (section 3.3 of the paper).

b[i] = a[i] / (k + alpha_sum * sum_{j=max(0,i-h)}^{min(N-1,i+h)} a[j]^2) ** beta,  h = n // 2

with alpha_sum = alpha in the paper's form and alpha / n in Caffe's. The forward and
the backward are written out by hand in one autograd Function, so that autograd keeps
two tensors instead of the eight intermediates of torch.nn.LocalResponseNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from alexnet.config import LRNConfig


def _window_sum(sq: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the `size` neighbouring channels (dim 1), zero beyond the edges."""
    s = sq.clone()
    for j in range(1, size // 2 + 1):
        s[:, j:] += sq[:, :-j]
        s[:, :-j] += sq[:, j:]
    return s


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha_sum: float, beta: float, k: float) -> torch.Tensor:
        d = _window_sum(x * x, size).mul_(alpha_sum).add_(k)  # k + alpha * sum a^2
        scale = d.pow(-beta)
        y = x * scale
        ctx.save_for_backward(x, d, scale)
        ctx.hyper = (size, alpha_sum, beta)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, d, scale = ctx.saved_tensors
        size, alpha_sum, beta = ctx.hyper
        # dy[i]/dx[j] = scale[i] [i == j] - 2 alpha beta x[i] scale[i] / d[i] x[j] for j in window(i);
        # the window is symmetric, so the sum over i runs over window(j).
        t = g * x * scale / d
        grad = g * scale - _window_sum(t, size) * x * (2.0 * alpha_sum * beta)
        return grad, None, None, None, None


def local_response_norm(x: torch.Tensor, cfg: LRNConfig) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"local response norm expects (N, C, H, W) input, got shape {tuple(x.shape)}")
    return _LRNFunction.apply(x, cfg.size, cfg.alpha_sum, cfg.beta, cfg.k)


class LocalResponseNorm(nn.Module):
    def __init__(self, cfg: LRNConfig | None = None):
        super().__init__()
        self.cfg = cfg or LRNConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.cfg)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"size={c.size}, alpha={c.alpha}, beta={c.beta}, k={c.k}, form={c.form}"
