"""A strided convolution whose weight gradient runs as a forward (dilated) convolution.

Profiling the CapsNet train step on CPU showed oneDNN's weight-gradient kernel for the 9x9 stride-2 PrimaryCaps
convolution running 4-9x slower than its forward in bf16 (1.5x in fp32). The weight gradient of a stride-s
convolution is itself a convolution: grad_W[o, c] = sum_b x[b, c] (*) grad_y[b, o] with the output gradient as a
kernel dilated by s, i.e. one forward convolution over the batch, which takes oneDNN's fast (AMX) forward path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _StridedConv2d(torch.autograd.Function):
    """conv2d(x, weight, bias, stride) without padding; backward: native input grad, dilated-conv weight grad."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int
    ) -> torch.Tensor:
        """The plain convolution."""
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, bias, stride=stride)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        """Grads of x (oneDNN), weight (forward conv of x by grad dilated by the stride) and bias (a sum)."""
        x, weight = ctx.saved_tensors
        stride, (need_x, need_w, need_b, _) = ctx.stride, ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        if need_w:
            rows = stride * (grad.shape[2] - 1) + weight.shape[2]  # input rows/cols the kernel ever touches
            cols = stride * (grad.shape[3] - 1) + weight.shape[3]
            used = x[:, :, :rows, :cols].transpose(0, 1)  # [C, B, rows, cols]: the batch becomes the channels
            grad_w = F.conv2d(used, grad.transpose(0, 1), dilation=stride).transpose(0, 1).contiguous()
        if need_b:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None


def strided_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """`conv(x)`; on CPU, for an unpadded, undilated, ungrouped conv with square stride, the fast weight gradient.

    Under autocast the inputs are cast to the autocast dtype first, as F.conv2d would.
    """
    general = conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1 or len(set(conv.stride)) != 1
    if x.device.type != "cpu" or general:
        return conv(x)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return _StridedConv2d.apply(x.to(dtype), conv.weight.to(dtype), bias, conv.stride[0])
