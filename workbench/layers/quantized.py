"""Weight-quantized Linear / Conv2d layers that store packed integer codes, and an int8 Linear.

`QuantLinear` / `QuantConv2d` keep, in their ``state_dict``:

- ``packed``: the codes at ``bits`` bits each (`workbench.kernels.quant.pack_codes`), uint8;
- uniform scheme: ``scale`` and ``zero_point`` (float32, scalars or ``(out, 1, ...)``), the range
  chosen by ``clip`` ("max", "mse" or "percentile": `workbench.kernels.quant.quantize_uniform`);
- k-means scheme: ``codebook`` (float32 ``(2^bits,)`` or ``(out, 2^bits)``);
- ``bias`` in float.

A 4-bit layer thus takes ``numel / 2`` bytes + scales instead of ``4 numel``. ``forward`` unpacks
the codes, dequantizes and runs the float op: the saving is in bytes, not in time (weight-only
quantization without integer kernels). `Int8Linear` is the one that is faster on a CPU: int8
weights (per output channel) and dynamically quantized activations through PyTorch's x86/fbgemm
``quantized::linear_dynamic`` kernel (the kernel ``torch.ao.quantization.quantize_dynamic`` uses).

Fine-tuning: ``dequantized_weight()`` / ``to_float()`` give the float weights the
codes stand for; ``scale`` / ``zero_point`` / ``codebook`` the grid; re-pack trained float weights
with ``QuantLinear.from_float(linear, bits, ...)`` (new grid) or keep the grid with
``from_signed_codes(codes, scale, bias, layer, bits=b)`` (int8 codes in ``[-2^(b-1), 2^(b-1)-1]``,
the packer signature of ``workbench.recovery.lsq.FakeQuantLayer``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import quant as quant_kernels
from workbench.layers.convspec import ConvSpec


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A float ``nn.Linear`` holding ``weight: (out, in)`` and ``bias`` (copies), on their device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class _PackedWeight(nn.Module):
    """Packed codes of a weight ``weight_shape`` and the grid they index."""

    def __init__(self, weight_shape: tuple[int, ...], bits: int, scheme: str, per_channel: bool,
                 asymmetric: bool, clip: str | None = "max"):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.bits, self.scheme = bits, scheme
        self.per_channel, self.asymmetric, self.clip = per_channel, asymmetric, clip

    @property
    def numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    def _store(self, codes: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None,
               zero_point: torch.Tensor | None = None, codebook: torch.Tensor | None = None) -> None:
        self.register_buffer("packed", quant_kernels.pack_codes(codes, self.bits))
        if self.scheme == "uniform":
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero_point", zero_point.detach().float().clone())
        else:
            self.register_buffer("codebook", codebook.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def _quantize_from(self, weight: torch.Tensor, bias: torch.Tensor | None, seed: int) -> None:
        if self.scheme == "uniform":
            codes, scale, zero = quant_kernels.quantize_uniform(weight, self.bits, self.per_channel, self.asymmetric,
                                                                self.clip)
            self._store(codes, bias, scale=scale, zero_point=zero)
        else:
            codes, codebook = quant_kernels.kmeans_codebook(weight, self.bits, self.per_channel, seed)
            self._store(codes, bias, codebook=codebook)

    def codes(self) -> torch.Tensor:
        """uint8 codes shaped ``weight_shape``, unpacked from ``packed``."""
        return quant_kernels.unpack_codes(self.packed, self.bits, self.numel).reshape(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``weight_shape``: the values the codes stand for."""
        if self.scheme == "uniform":
            return quant_kernels.dequantize_uniform(self.codes(), self.scale, self.zero_point)
        return quant_kernels.dequantize_codebook(self.codes(), self.codebook)

    def grid(self) -> torch.Tensor:
        """Representable values ``(2^bits,)`` (per-tensor) or ``(out, 2^bits)`` (per channel)."""
        if self.scheme == "kmeans":
            return self.codebook
        levels = torch.arange(2 ** self.bits, dtype=torch.float32, device=self.scale.device)
        scale, zero = self.scale.reshape(-1, 1), self.zero_point.reshape(-1, 1)
        values = scale * (levels - zero)
        return values if self.per_channel else values.reshape(-1)

    def stored_weights(self) -> int:
        """Weights (one code each) plus bias entries (used by `workbench.measure.count_params`)."""
        return self.numel + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        grid = "per-channel" if self.per_channel else "per-tensor"
        kind = ("asymmetric " if self.asymmetric else "symmetric ") if self.scheme == "uniform" else ""
        clip = f", clip={self.clip}" if self.scheme == "uniform" and self.clip is not None else ""
        return f"shape={self.weight_shape}, bits={self.bits}, {kind}{self.scheme} {grid}{clip}"


def _check_settings(bits: int, scheme: str, name: str, clip: str) -> None:
    quant_kernels.check_bits(bits, name)
    quant_kernels.check_scheme(scheme)
    quant_kernels.check_clip(clip, name)


class QuantLinear(_PackedWeight):
    """``nn.Linear`` with packed ``bits``-bit weight codes; ``(…, in) -> (…, out)``."""

    def __init__(self, in_features: int, out_features: int, bits: int, scheme: str = "uniform",
                 per_channel: bool = False, asymmetric: bool = False, clip: str | None = "max"):
        super().__init__((out_features, in_features), bits, scheme, per_channel, asymmetric, clip)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, scheme: str = "uniform", per_channel: bool = False,
                    asymmetric: bool = False, seed: int = 0, name: str = "", clip: str = "max") -> "QuantLinear":
        """Quantize ``linear.weight`` (round to nearest on a ``clip`` range, or k-means with ``seed``);
        ``linear`` unchanged."""
        if not isinstance(linear, nn.Linear):
            raise UnsupportedLayerError(f"QuantLinear.from_linear needs nn.Linear, got {type(linear).__name__}")
        _check_settings(bits, scheme, name, clip)
        layer = cls(linear.in_features, linear.out_features, bits, scheme, per_channel, asymmetric, clip)
        layer._quantize_from(linear.weight, linear.bias, seed)
        return layer

    from_float = from_linear

    @classmethod
    def from_signed_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          layer: nn.Linear, *, bits: int) -> "QuantLinear":
        """Pack signed codes ``(out, in)`` in ``[-2^(b-1), 2^(b-1)-1]`` on the grid ``scale * code``
        (a given grid: ``clip`` is None)."""
        quant_kernels.check_bits(bits)
        per_channel = scale.numel() > 1
        packed = cls(layer.in_features, layer.out_features, bits, "uniform", per_channel, False, clip=None)
        offset = 2 ** (bits - 1)
        packed._store((codes.to(torch.int16) + offset).to(torch.uint8), bias,
                      scale=scale.reshape(-1, 1) if per_channel else scale.reshape(()),
                      zero_point=torch.full_like(scale.reshape(-1, 1) if per_channel else scale.reshape(()),
                                                 float(offset)))
        return packed

    def to_float(self) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weights (for fine-tuning through the STE)."""
        return dense_linear(self.dequantized_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class QuantConv2d(_PackedWeight):
    """``nn.Conv2d`` with packed ``bits``-bit kernel codes."""

    def __init__(self, spec: ConvSpec, bits: int, scheme: str = "uniform", per_channel: bool = False,
                 asymmetric: bool = False, clip: str | None = "max"):
        super().__init__(spec.weight_shape, bits, scheme, per_channel, asymmetric, clip)
        self.spec = spec

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int, scheme: str = "uniform", per_channel: bool = False,
                  asymmetric: bool = False, seed: int = 0, name: str = "", clip: str = "max") -> "QuantConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise UnsupportedLayerError(f"QuantConv2d.from_conv needs nn.Conv2d, got {type(conv).__name__}")
        _check_settings(bits, scheme, name, clip)
        layer = cls(ConvSpec.from_conv(conv), bits, scheme, per_channel, asymmetric, clip)
        layer._quantize_from(conv.weight, conv.bias, seed)
        return layer

    from_float = from_conv

    @classmethod
    def from_signed_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          layer: nn.Conv2d, *, bits: int) -> "QuantConv2d":
        """As `QuantLinear.from_signed_codes`, for a conv (``codes`` shaped like its kernel)."""
        quant_kernels.check_bits(bits)
        per_channel = scale.numel() > 1
        packed = cls(ConvSpec.from_conv(layer), bits, "uniform", per_channel, False, clip=None)
        offset = 2 ** (bits - 1)
        shape = (-1, 1, 1, 1) if per_channel else ()
        packed._store((codes.to(torch.int16) + offset).to(torch.uint8), bias, scale=scale.reshape(shape),
                      zero_point=torch.full_like(scale.reshape(shape), float(offset)))
        return packed

    def to_float(self) -> nn.Conv2d:
        return self.spec.to_conv(self.dequantized_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.extra_repr()}, {super().extra_repr()}"


def quantized_from_layer(module: nn.Module, bits: int, scheme: str = "uniform", per_channel: bool = False,
                         asymmetric: bool = False, seed: int = 0, name: str = "", clip: str = "max") -> nn.Module:
    """`QuantLinear` or `QuantConv2d` from a float layer."""
    if isinstance(module, nn.Linear):
        return QuantLinear.from_linear(module, bits, scheme, per_channel, asymmetric, seed, name, clip)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_conv(module, bits, scheme, per_channel, asymmetric, seed, name, clip)
    raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot be quantized; "
                                "quantization handles Linear and Conv2d")


class Int8Linear(nn.Module):
    """int8 weights per output channel + dynamic int8 activations (fbgemm/x86 kernels on CPU).

    State: ``weight_int8`` int8 ``(out, in)``, ``weight_scale`` float32 ``(out,)``, ``bias``.
    The kernel's prepacked weight is rebuilt from that state on first use (not saved).
    Activations are quantized per batch with a 7-bit range (``reduce_range``), as
    ``torch.ao.quantization.quantize_dynamic`` does on x86.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._prepacked = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "Int8Linear":
        if not isinstance(linear, nn.Linear):
            raise UnsupportedLayerError(
                f"int8 handles nn.Linear layers; layer {name!r} is {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        with torch.no_grad():
            layer.weight_int8.copy_(torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    from_float = from_linear

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _kernel_weight(self):
        if self._prepacked is None:
            with warnings.catch_warnings():  # quantized-tensor creation is deprecated in torch 2.13, still works
                warnings.simplefilter("ignore", UserWarning)
                self._prepacked = self._prepack()
        return self._prepacked

    def _prepack(self):
        """The x86/fbgemm prepacked weight (per-channel qint8) of ``weight_int8`` and ``bias``."""
        q = torch._make_per_channel_quantized_tensor(
            self.weight_int8, self.weight_scale.double(), torch.zeros(self.out_features, dtype=torch.int64), 0)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.quantized.linear_prepack(q, bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepacked = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise WorkbenchError(f"Int8Linear takes float32 inputs, got {x.dtype}")
        return torch.ops.quantized.linear_dynamic(x, self._kernel_weight(), True)

    def stored_weights(self) -> int:
        return self.weight_int8.numel() + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
