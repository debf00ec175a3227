"""Inference-time fusion of ``conv -> BatchNorm -> activation [+ residual]`` into one op.

The models are written as the reference computes them -- a convolution, then an eval-mode
BatchNorm, then an activation, each a separate pass over a large feature map. On CPU those passes,
not the convolutions, took most of the time (CAM++'s 2-D head: BatchNorm + ReLU + residual add
were 60% of the model under bf16). ``conv_bn`` is the one place the models call such a chain:

* by default it runs the modules one by one, exactly like the reference;
* after ``enable_fusion(model)`` it folds the BatchNorm into the convolution's weight and bias
  (``w * s``, ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``, computed in
  float64) and runs conv + bias + activation (+ residual add) as a single oneDNN primitive on CPU
  (``torch.ops.mkldnn._convolution_pointwise``), or as one conv with the folded bias followed by
  the activation elsewhere (CUDA, or a torch build without oneDNN); under bf16/fp16 the folded bias
  stays fp32 on every path.

The folded weights are cached on the conv module per (device, dtype); they are not parameters,
so ``state_dict()`` is unchanged, and a later ``load_state_dict`` is noticed (the cache is keyed
on the parameters' versions) and refolded. Fusion is for inference: no gradients flow through
the folded weights, and modules in training mode always run unfused.
"""
import functools
import threading
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerlab.devices import autocast_enabled, autocast_off

_FLAG = "_speakerlab_fuse"
_CACHE = "_speakerlab_folded"
_KEEP_FP32 = "_speakerlab_keep_fp32"
_lock = threading.Lock()

# name -> (eager function, oneDNN unary attr, its scalars)
ACTIVATIONS: Dict[Optional[str], tuple] = {
    None: (lambda x: x, "none", []),
    "relu": (lambda x: F.relu(x, inplace=True), "relu", []),
    "hardtanh20": (lambda x: F.hardtanh(x, 0.0, 20.0, inplace=True), "hardtanh", [0.0, 20.0]),
    "silu": (lambda x: F.silu(x, inplace=True), "swish", []),
    "tanh": (torch.tanh, "tanh", []),
    "sigmoid": (torch.sigmoid, "sigmoid", []),
}


def enable_fusion(model: nn.Module, enabled: bool = True) -> int:
    """Mark every conv of ``model`` so that ``conv_bn`` runs it fused; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            setattr(module, _FLAG, enabled)
            module.__dict__.pop(_CACHE, None)
            count += 1
    return count


def keep_fp32(conv: nn.Module) -> None:
    """Run this conv in fp32 even under autocast (its output is cast back), fused or not."""
    setattr(conv, _KEEP_FP32, True)


@functools.lru_cache(maxsize=None)
def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 / AMX, or AVX-NE-CONVERT)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def mkldnn_available() -> bool:
    """Whether this torch has oneDNN's fused conv op, and it computes what F.conv2d does.

    It is a private op (the one torch.compile's CPU backend emits), so a torch whose op is missing or
    changed gets the plain fused path instead of an error: checked once, on a tiny conv.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # it may first run under autocast
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, 5, 7, generator=gen)
            w = torch.randn(4, 3, 3, 3, generator=gen)
            b = torch.randn(4, generator=gen)
            other = torch.randn(2, 4, 5, 7, generator=gen)
            want = F.conv2d(x, w, b, 1, 1)
            got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            got2 = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
        return (torch.allclose(got, want.relu(), atol=1e-4)
                and torch.allclose(got2, (want + other).relu(), atol=1e-4))
    except Exception:  # noqa: BLE001 -- any failure means: do not use it
        return False


def conv_bn(conv: nn.Module, bn: Optional[nn.Module], x: torch.Tensor, act: Optional[str] = None,
            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(bn(conv(x)) + residual)``; ``bn``, ``act`` and ``residual`` are optional."""
    if not is_fused(conv) or (bn is not None and bn.training):
        if x.dim() == 4 and isinstance(conv, nn.Conv1d):  # a 1-D map held as (B, C, 1, T)
            residual = None if residual is None else residual.squeeze(2)
            return conv_bn(conv, bn, x.squeeze(2), act, residual).unsqueeze(2)
        y = conv(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            y = y + residual
        return ACTIVATIONS[act][0](y)
    return _fused(conv, bn, x, act, residual)


def _compute_dtype(conv: nn.Module, x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if autocast_enabled(device_type) and not getattr(conv, _KEEP_FP32, False):
        return torch.get_autocast_dtype(device_type)
    return torch.float32 if getattr(conv, _KEEP_FP32, False) else x.dtype


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter
        return tensor.data_ptr()


def _bn_affine(bn: nn.Module):
    """Eval BatchNorm as y = a * x + b, per channel, in float64."""
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    b = -bn.running_mean.double() * a
    if bn.bias is not None:
        b = b + bn.bias.double()
    return a, b


def _folded(conv: nn.Module, bn: Optional[nn.Module], device: torch.device, dtype: torch.dtype,
            channels_last: bool, as_2d: bool = False, bias_dtype: Optional[torch.dtype] = None):
    """(weight, bias) of ``bn(conv(x))`` folded into one conv, cached on the conv."""
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    if bn is not None:
        params += [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]
    version = tuple(_version(p) for p in params) + (id(bn),)
    key = (device, dtype, channels_last, as_2d, bias_dtype)
    cache = conv.__dict__.get(_CACHE)
    if cache is not None and cache[0] == version and key in cache[1]:
        return cache[1][key]
    with _lock, torch.no_grad():
        cache = conv.__dict__.get(_CACHE)
        if cache is None or cache[0] != version:
            cache = (version, {})
            conv.__dict__[_CACHE] = cache
        if key not in cache[1]:
            weight = conv.weight.detach().double()
            bias = (conv.bias.detach().double() if conv.bias is not None
                    else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
            if bn is not None:
                scale, shift = _bn_affine(bn)
                weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
                bias = bias * scale + shift
            weight = weight.to(device=device, dtype=dtype)
            if as_2d:  # a Conv1d run on (B, C, 1, T): kernel (1, k)
                weight = weight.unsqueeze(2)
            if channels_last and weight.dim() == 4:
                weight = weight.contiguous(memory_format=torch.channels_last)
            cache[1][key] = (weight, bias.to(device=device, dtype=bias_dtype or dtype))
        return cache[1][key]


def _fused(conv, bn, x, act, residual):
    dtype = _compute_dtype(conv, x)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast_enabled(x.device.type) else dtype
    eager_act, attr, scalars = ACTIVATIONS[act]
    use_mkldnn = (x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                  and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                  and mkldnn_available() and (dtype == torch.float32 or mkldnn_bf16_supported()))
    as_2d = isinstance(conv, nn.Conv1d) and x.dim() == 4
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # The folded BatchNorm shift stays fp32 (rounded to bf16 it can cancel against the conv output):
    # oneDNN adds it to its fp32 accumulator; elsewhere (CUDA) it is added to the conv's output in
    # place, computed in fp32 and rounded once -- what torch's own conv does with a bias anyway (one
    # add after cuDNN's conv), so it costs nothing. oneDNN's binary (residual) op wants the input's dtype.
    bias_dtype = torch.float32 if use_mkldnn or dtype != torch.float32 else None
    weight, bias = _folded(conv, bn, x.device, dtype, channels_last and use_mkldnn, as_2d, bias_dtype)
    x = x.to(dtype)
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    if as_2d:
        padding, stride, dilation = [0] + padding, [1] + stride, [1] + dilation
    if use_mkldnn:
        args = (padding, stride, dilation, conv.groups)
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, attr, scalars, "")
        elif channels_last:
            # oneDNN takes a unary op after the add only for ReLU; others run after it
            post = "relu" if attr == "relu" else None
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.to(dtype), weight, bias.to(dtype), *args, "add", None, post, [], "" if post else None)
            if post is None:
                y = eager_act(y)
        else:  # (its add+relu fallback for other layouts has no bf16 kernel)
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")
            y = eager_act(y.add_(residual.to(dtype)))
        return y.to(out_dtype)
    conv_fn: Callable = F.conv2d if x.dim() == 4 else F.conv1d
    with autocast_off(x.device.type):
        if bias.dtype == dtype:
            y = conv_fn(x, weight, bias, stride, padding, dilation, conv.groups)
        else:  # an fp32 bias under bf16/fp16: added in fp32, rounded once
            y = conv_fn(x, weight, None, stride, padding, dilation, conv.groups)
            y.add_(bias.view(-1, *([1] * (y.dim() - 2))))
        if residual is not None:
            y = y + residual.to(dtype)
        y = eager_act(y)
    return y.to(out_dtype)


def batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``, also for a BatchNorm1d applied to a (B, C, 1, T) map (eval mode)."""
    if bn.training or x.dim() <= 3:
        return bn(x)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def is_fused(conv: nn.Module) -> bool:
    return bool(getattr(conv, _FLAG, False)) and not conv.training
