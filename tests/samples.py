"""Sample inputs of the custom ops, shared by the tests and the GPU checks (as torch's OpInfo sample inputs).

Per op, ``<op>_inputs(device, requires_grad=False)`` returns Samples: the positional arguments of
``torch.ops.deeplab_fast.<op>`` on ``device``, fresh random values from a fixed seed (never zeros; the CRF's
unaries are smooth fields and its images blocky, so the lattices look like a photo's), with ``requires_grad`` set on
the tensors the op differentiates when asked. They feed the reference checks, opcheck on both devices,
torch.compile, the device checks, and the GPU scripts (.ci/gpu_quick_cases.py, tests/cuda/sanitize_*.py), which
run them on CUDA against ``reference`` (float64 convolutions; the CPU op for the CRF). ``<op>_errors(device)``
lists bad calls: each must raise ValueError with its message, from the real kernel and the fake kernel alike.

Imported as ``from samples import ...`` (pytest puts tests/ on sys.path; the scripts put it there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Sample", "BadCall", "crf_problem", "DEFAULT_KERNELS", "DEEPLAB_V2_KERNELS", "atrous_conv2d_inputs",
           "dense_crf_inputs", "dense_crf_features_inputs", "dense_crf_pairwise_energy_inputs",
           "dense_crf_image_features_inputs", "INPUTS", "reference", "conv_reference", "atrous_conv2d_errors", "dense_crf_errors",
           "ERRORS", "prefix", "on_device"]

# pydensecrf's example kernels and DeepLab v2's: (gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
# bilateral_compat).
DEFAULT_KERNELS = (3.0, 3.0, 80.0, 13.0, 10.0)
DEEPLAB_V2_KERNELS = (1.0, 3.0, 67.0, 3.0, 4.0)


@dataclass
class Sample:
    name: str
    args: tuple             # the op's positional arguments
    tol: float = 1e-4       # relative error allowed against ``reference`` on CUDA
    cutlass: bool = False   # an atrous conv the CUDA path runs with CUTLASS (16-bit or TF32, channels_last, C, K % 8)
    grad: tuple = ()        # the positions of args (or of tensors in a list arg: (pos, k)) that require grad

    def __repr__(self) -> str:
        return self.name


@dataclass
class BadCall:
    name: str
    args: tuple
    message: str            # the start of the error message (after the op's name)
    values: bool = False    # the mistake is in the values (NaN, inf): only the real kernels see it
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def on_device(x, device, requires_grad=False):
    """x (a tensor, a list of tensors, or anything else) on device; tensors become leaves (the memory format kept)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device)
        return t.requires_grad_(requires_grad and t.is_floating_point())
    if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
        return [on_device(t, device, requires_grad) for t in x]
    return x


def _finish(samples, device, requires_grad):
    out = []
    for s in samples:
        grad = set(s.grad) if requires_grad else set()
        args = []
        for i, a in enumerate(s.args):
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                args.append([on_device(t, device, (i, k) in grad) for k, t in enumerate(a)])
            else:
                args.append(on_device(a, device, i in grad))
        out.append(Sample(s.name, tuple(args), s.tol, s.cutlass, s.grad))
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# atrous_conv2d(input, weight, bias?, scale?, stride, padding, dilation, relu)


def _conv(seed, N, C, K, H, W, R=3, S=3, dtype=torch.float32, bias=True, scale=True, channels_last=False,
          crop=False):
    g = _gen(seed)
    x = torch.randn(N, C, H + 4 * crop, W + 4 * crop, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, R, S, generator=g, dtype=torch.float64) / (C * R * S) ** 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    s = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5) if scale else None
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if crop:  # a spatial crop: a view with the parent's strides
        x = x[:, :, 2:2 + H, 1:1 + W]
    return x, w.to(dtype), None if b is None else b.to(dtype), None if s is None else s.to(dtype)


def atrous_conv2d_inputs(device, requires_grad: bool = False) -> list:
    """Both devices' paths: ATen layouts, strides and filters (float32, float64), and the CUTLASS cases (bf16 /
    fp16 / TF32 float32, channels_last, C and K multiples of 8): rate 18 at 17x17 (every tap region), stride 2, a
    cropped view, a region without an in-bounds tap."""
    grad = (0, 1, 2, 3)
    samples = [
        Sample("f32_bias_scale_relu", (*_conv(40, 2, 8, 8, 11, 9), [1, 1], [2, 2], [2, 2], True), 1e-5, grad=grad),
        Sample("f32_plain_stride2", (*_conv(41, 2, 8, 8, 11, 9, bias=False, scale=False), [2, 1], [1, 3], [3, 2],
                                     False), 1e-5, grad=grad),
        Sample("f32_channels_last_bias", (*_conv(42, 2, 8, 8, 11, 9, scale=False, channels_last=True), [1, 2],
                                          [6, 6], [6, 6], True), 1e-5, grad=grad),
        Sample("f32_channels_last_crop_rate12", (*_conv(43, 1, 8, 8, 11, 9, bias=False, channels_last=True,
                                                        crop=True), [1, 1], [12, 12], [12, 12], False), 1e-5,
               grad=grad),
        Sample("f32_1x3_filter", (*_conv(44, 1, 8, 16, 7, 9, R=1, S=3, channels_last=True), [1, 1], [0, 4], [1, 4],
                                  True), 1e-5, grad=grad),
        Sample("f64_stride2", (*_conv(45, 2, 4, 6, 9, 8, dtype=torch.float64, bias=False), [2, 2], [3, 3], [2, 2],
                               False), 1e-10, grad=grad),
    ]
    for dtype, tol, tag in ((torch.bfloat16, 2e-2, "bf16"), (torch.float16, 2e-2, "fp16"), (torch.float32, 5e-3,
                                                                                              "tf32")):
        for i, (N, C, H, W, K, st, pad, dil, crop) in enumerate([(1, 16, 17, 17, 24, 1, 18, 18, False),
                                                                  (2, 32, 20, 13, 16, 2, 4, 4, False),
                                                                  (1, 8, 12, 12, 8, 1, 2, 2, True),
                                                                  (1, 8, 4, 4, 8, 1, 7, 5, False)]):
            name = ["rate18_every_region", "stride2", "crop", "no_tap_region"][i]
            x, w, b, s = _conv(50 + i, N, C, K, H, W, dtype=dtype, scale=False, channels_last=True, crop=crop)
            samples.append(Sample(f"cutlass_{tag}_{name}", (x, w, b, s, [st, st], [pad, pad], [dil, dil], True), tol,
                                  cutlass=True, grad=grad))
    return _finish(samples, device, requires_grad)


# ----------------------------------------------------------------------------------------------------------
# The dense CRF ops


def crf_problem(seed: int, B: int, L: int, H: int, W: int, dtype=torch.float32):
    """Unary energies (-log softmax of coarse logits, bilinearly upsampled) [B, L, H, W] and a blocky RGB image
    with pixel noise [B, 3, H, W] uint8: lattices like a photo's."""
    g = _gen(seed)
    low = torch.randn(B, L, max(1, H // 8), max(1, W // 8), generator=g) * 3
    logits = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    unary = (-torch.log_softmax(logits, 1)).to(dtype).contiguous()
    blocks = torch.randint(0, 256, (B, 3, max(1, H // 16), max(1, W // 16)), generator=g).float()
    image = F.interpolate(blocks, size=(H, W), mode="nearest")
    image = (image + torch.randint(-8, 9, image.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return unary, image.contiguous()


def _kernels(kernels, gaussian_compat=None, bilateral_compat=None):
    gs, gc, bs, bsrgb, bc = kernels
    gc = torch.tensor(gc) if gaussian_compat is None else gaussian_compat
    bc = torch.tensor(bc) if bilateral_compat is None else bilateral_compat
    return gs, gc, bs, bsrgb, bc


def dense_crf_inputs(device, requires_grad: bool = False) -> list:
    """dense_crf(unary, image, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
    bilateral_compat): both kernel sets, a batch, one-pixel and one-row images, the CUDA kernels' most labels
    (2048), diagonal and matrix compatibilities, float64 (CPU)."""
    g = _gen(60)
    cases = [("1x21x37x29_default", 1, 21, 37, 29, 3, DEFAULT_KERNELS, None, None),
             ("1x21x37x29_deeplab_v2", 1, 21, 37, 29, 3, DEEPLAB_V2_KERNELS, None, None),
             ("2x5x23x31", 2, 5, 23, 31, 2, DEFAULT_KERNELS, None, None),
             ("1x2x1x1", 1, 2, 1, 1, 2, DEFAULT_KERNELS, None, None),
             ("1x3x1x97_deeplab_v2", 1, 3, 1, 97, 2, DEEPLAB_V2_KERNELS, None, None),
             ("1x2048x5x7", 1, 2048, 5, 7, 1, DEFAULT_KERNELS, None, None),
             ("2x3x5x6_diagonal_matrix", 2, 3, 5, 6, 2, (1.0, 0, 67.0, 3.0, 0), torch.ones(3) * 2,
              torch.rand(3, 3, generator=g) * 3),
             ("1x21x11x13_matrix_potts", 1, 21, 11, 13, 3, DEFAULT_KERNELS,
              -3.0 * torch.eye(21) + 0.1 * torch.randn(21, 21, generator=g), None)]
    samples = []
    for i, (name, B, L, H, W, it, kernels, gc, bc) in enumerate(cases):
        unary, image = crf_problem(70 + i, B, L, H, W)
        gs, gc, bs, bsrgb, bc = _kernels(kernels, gc, bc)
        samples.append(Sample(name, (unary, image, it, gs, gc, bs, bsrgb, bc), grad=(0, 4, 7)))
    if torch.device(device).type == "cpu":
        unary, image = crf_problem(80, 1, 4, 9, 10, dtype=torch.float64)
        samples.append(Sample("f64_1x4x9x10", (unary, image, 2, *_kernels(DEFAULT_KERNELS,
                                                                         torch.rand(4, 4, dtype=torch.float64,
                                                                                    generator=g))),
                              grad=(0, 4, 7)))
    return _finish(samples, device, requires_grad)


def dense_crf_features_inputs(device, requires_grad: bool = False) -> list:
    """dense_crf_features(unary, features, compat, normalization, iterations, q_init): 2, 5 and 16 feature
    dimensions, every normalisation, Potts / diagonal / matrix compatibilities, q_init."""
    g = _gen(90)
    B, L, N = 2, 4, 300
    unary = torch.randn(B, L, N, generator=g) * 2
    q_init = torch.softmax(torch.randn(B, L, N, generator=g), 1)
    compats = [torch.tensor(2.5), -torch.rand(L, generator=g) * 4, torch.rand(L, L, generator=g) * 3]
    samples = []
    for n, D in enumerate([2, 5, 16]):
        feats = [torch.randn(B, D, N, generator=g) * 3, torch.randn(B, 3, N, generator=g) * 2]
        compat = [compats[n % 3], compats[(n + 1) % 3]]
        normalization = [n % 4, (n + 3) % 4]
        q0 = q_init if n == 1 else None
        samples.append(Sample(f"D{D}_3_norm{normalization[0]}{normalization[1]}{'_q_init' if q0 is not None else ''}",
                              (unary, feats, compat, normalization, 3, q0), grad=(0, (2, 0), (2, 1), 5)))
    u = torch.rand(2, 4, 60, generator=g)
    feats = [torch.rand(2, 3, 60, generator=g) * 5, torch.rand(2, 2, 60, generator=g) * 5]
    samples.append(Sample("D3_2_potts_matrix", (u, feats, [torch.tensor(2.0), torch.rand(4, 4, generator=g)], [3, 1],
                                                2, None), grad=(0, (2, 0), (2, 1))))
    return _finish(samples, device, requires_grad)


def dense_crf_pairwise_energy_inputs(device, requires_grad: bool = False) -> list:
    """dense_crf_pairwise_energy(q, features, compat, normalization): not differentiable (requires_grad ignored)."""
    g = _gen(100)
    B, L, N = 2, 4, 300
    q = torch.softmax(torch.randn(B, L, N, generator=g), 1)
    samples = [Sample("D3_matrix", (q, [torch.randn(B, 3, N, generator=g) * 3], [torch.rand(L, L, generator=g) * 3],
                                    [3])),
               Sample("D3_2_potts_diagonal", (q, [torch.rand(B, 3, N, generator=g) * 5,
                                                  torch.rand(B, 2, N, generator=g) * 5],
                                              [torch.tensor(2.0), torch.rand(L, generator=g)], [3, 1]))]
    return _finish(samples, device, False)


def dense_crf_image_features_inputs(device, requires_grad: bool = False) -> list:
    """dense_crf_image_features(image, gaussian_sxy, bilateral_sxy, bilateral_srgb)."""
    _, image = crf_problem(110, 2, 1, 5, 6)
    _, tall = crf_problem(111, 1, 1, 37, 3)
    return _finish([Sample("2x3x5x6", (image, 3.0, 80.0, 13.0)), Sample("1x3x37x3", (tall, 1.0, 67.0, 3.0))],
                   device, False)


INPUTS: dict[str, Callable] = {
    "atrous_conv2d": atrous_conv2d_inputs,
    "dense_crf": dense_crf_inputs,
    "dense_crf_features": dense_crf_features_inputs,
    "dense_crf_pairwise_energy": dense_crf_pairwise_energy_inputs,
    "dense_crf_image_features": dense_crf_image_features_inputs,
}


def reference(op: str, sample: Sample):
    """The independent reference of a sample's result, on the CPU: the convolution in float64 with the epilogue,
    the dense CRF ops' CPU kernels (themselves bit-exact with pydensecrf2, tests/test_dense_crf.py)."""
    args = [on_device(a, "cpu") for a in sample.args]
    if op == "atrous_conv2d":
        return conv_reference(*args)
    return getattr(torch.ops.deeplab_fast, op)(*args)


def conv_reference(x, w, b, s, stride, padding, dilation, relu):
    """relu?(conv2d(x, w) * s + b) in float64 (F.conv2d; s and b may be None), on x's device."""
    y = F.conv2d(x.double(), w.double(), None, stride, padding, dilation)
    if s is not None:
        y = y * s.double().view(1, -1, 1, 1)
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1)
    return y.relu() if relu else y


# ----------------------------------------------------------------------------------------------------------
# Bad calls: each raises ValueError, its message starting "<op>: <message>"


def atrous_conv2d_errors(device="cpu") -> list:
    x, w, b, s = _conv(120, 2, 8, 6, 9, 10)
    x, w, b, s = (on_device(t, device) for t in (x, w, b, s))
    p = ([1, 1], [0, 0], [1, 1])

    def call(name, args, message, params=p):
        return BadCall(name, (*args, *params, False), message)

    return [
        call("channels", (x, w[:, :7], b, s), "weight has 7 input channels (dim 1) but the input has 8"),
        call("input_3d", (x[0], w, b, s), "input must be 4-D [N, C, H, W], got 3-D"),
        call("weight_3d", (x, w[0], b, s), "weight must be 4-D [K, C, R, S], got 3-D"),
        call("bias_shape", (x, w, b[:5], s), "bias must be a 1-D tensor of one value per output channel ([6])"),
        call("scale_shape", (x, w, b, s[None]), "scale must be a 1-D tensor of one value per output channel ([6])"),
        call("weight_dtype", (x, w.double(), b, s), "weight must have the input's dtype (Float), got Double"),
        call("bias_dtype", (x, w, b.half(), s), "bias must have the input's dtype (Float), got Half"),
        call("input_dtype", (x.long(), w.long(), None, None), "input must be float32, float64, bfloat16 or float16"),
        call("empty_batch", (x[:0], w, b, s), "input has an empty batch (N = 0)"),
        call("empty_channels", (x[:, :0], w[:, :0], b, s), "input must have C, H, W > 0"),
        call("empty_filter", (x, w[:0], b[:0], s[:0]), "weight must have K, R, S > 0"),
        call("stride_0", (x, w, b, s), "stride must be >= 1 and <= 2147483647, got [0, 1]",
             ([0, 1], [0, 0], [1, 1])),
        call("stride_len", (x, w, b, s), "stride must have 2 values (height, width), got 3",
             ([1, 1, 1], [0, 0], [1, 1])),
        call("padding_neg", (x, w, b, s), "padding must be >= 0", ([1, 1], [-1, 0], [1, 1])),
        call("dilation_big", (x, w, b, s), "dilation must be >= 1 and <= 2147483647 (the atrous rate)",
             ([1, 1], [0, 0], [1, 2**31])),
        call("padding_huge", (x, w, b, s), "padding must be >= 0 and <= 2147483647", ([1, 1], [2**62, 0], [1, 1])),
        call("empty_output", (x, w, b, s), "the output would be empty: input 9x10 with a 3x3 filter",
             ([1, 1], [0, 0], [10, 1])),
        call("output_bytes", (x, w, b, s), "the output [N, K, P, Q] = [2, 6, 4294967301, 4294967302] would take "
             "more than 2^63 - 1 bytes", ([1, 1], [2**31 - 1, 2**31 - 1], [1, 1])),
    ]


def dense_crf_errors(device="cpu") -> dict:
    """{op: [BadCall]} for the dense CRF ops."""
    unary, image = (on_device(t, device) for t in crf_problem(130, 1, 3, 5, 6))
    u3 = unary.flatten(2)
    f = on_device(torch.randn(1, 2, 30, generator=_gen(131)), device)
    one = torch.tensor(1.0)
    nan = float("nan")

    def crf(name, message, u=unary, im=image, it=2, gs=3.0, gc=torch.tensor(3.0), bs=80.0, bsrgb=13.0,
            bc=torch.tensor(10.0), values=False):
        return BadCall(name, (u, im, it, gs, gc, bs, bsrgb, bc), message, values)

    def features(name, message, u=u3, feats=(f,), compat=(one,), norm=(3,), it=2, q_init=None, values=False):
        return BadCall(name, (u, list(feats), list(compat), list(norm), it, q_init), message, values)

    return {
        "dense_crf": [
            crf("unary_dtype", "unary must be float32 or float64, got Half" if torch.device(device).type == "cpu"
                else "unary must be float32, got Half", u=unary.half()),
            crf("unary_3d", "unary must be 4-D [B, L, H, W], got 3-D with shape [3, 5, 6]", u=unary[0]),
            crf("image_dtype", "image must be uint8 RGB, got Float", im=image.float()),
            crf("image_channels", "image must have 3 channels (RGB) in dim 1, got 2", im=image[:, :2]),
            crf("image_size", "image size (H, W) = (4, 6) does not match the unary size (5, 6)", im=image[:, :, :4]),
            crf("image_batch", "image batch size 2 does not match the unary batch size 1",
                im=torch.cat([image, image])),
            crf("empty_batch", "unary has an empty batch (B = 0)", u=unary[:0], im=image[:0]),
            crf("no_label", "unary must have at least one label (L >= 1), got L = 0", u=unary[:, :0]),
            crf("iterations", "iterations must be in [0, 2147483647], got -1", it=-1),
            crf("gaussian_compat_length", "gaussian_compat as a vector must have one weight per label (3), got 4",
                gc=torch.ones(4)),
            crf("bilateral_compat_shape", "bilateral_compat must be a scalar (Potts weight), a vector [L] or a "
                "matrix [L, L] with L = 3, got shape [3, 2]", bc=torch.ones(3, 2)),
            crf("gaussian_compat_dims", "gaussian_compat must be a scalar (Potts weight)", gc=torch.ones(3, 3, 3)),
            crf("gaussian_compat_dtype", "gaussian_compat must be a floating-point tensor, got Long",
                gc=torch.tensor(3)),
            crf("bilateral_compat_inf", "bilateral_compat must be finite", bc=torch.tensor(float("inf")),
                values=True),
            crf("gaussian_sxy_small", "gaussian_sxy must be at least 9.53674e-06 for this image size (5 / "
                "gaussian_sxy must stay below 2^19 to fit the lattice), got 1e-30", gs=1e-30),
            crf("bilateral_srgb_small", "bilateral_srgb must be at least 0.000486374 for 8-bit colours", bsrgb=1e-5),
            crf("bilateral_sxy_float32", "bilateral_sxy must be representable in float32 (between 1.2e-38 and "
                "3.4e38), got 1e+300", bs=1e300),
            crf("gaussian_sxy_negative", "gaussian_sxy must be a finite value > 0, got -1", gs=-1.0),
        ],
        "dense_crf_features": [
            features("terms", "features, compat and normalization must have one entry per pairwise term, got 1, 0 "
                     "and 1", compat=()),
            features("unary_4d", "unary must be 3-D [B, L, N], got 4-D with shape [1, 3, 5, 6]", u=unary),
            features("features_dtype", "features[0] must be float32 or float64, got Half", feats=(f.half(),)),
            features("features_shape", "features[0] must have shape [B, D, N] = [1, D, 30], got [1, 2, 29]",
                     feats=(f[:, :, :29],)),
            features("features_dims", "features[0] must have between 1 and 16 feature dimensions, got 17",
                     feats=(torch.cat([f] * 9, 1)[:, :17],)),
            features("features_nan", "features[0] contains NaN or inf", feats=(torch.full_like(f, nan),),
                     values=True),
            features("compat_length", "compat[0] as a vector must have one weight per label (3), got 2",
                     compat=(torch.ones(2),)),
            features("compat_dtype", "compat[0] must be a floating-point tensor, got Long",
                     compat=(torch.ones(3, dtype=torch.long),)),
            features("normalization", "normalization[0] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), "
                     "got 7", norm=(7,)),
            features("iterations", "iterations must be in [0, 2147483647], got -1", it=-1),
            features("q_init_dtype", "q_init must have the unary's dtype (Float), got Double", q_init=u3.double()),
            features("q_init_shape", "q_init must have the unary's shape [1, 3, 30], got [1, 2, 30]",
                     q_init=u3[:, :2]),
            features("q_init_nan", "q_init contains NaN or inf", q_init=torch.full_like(u3, nan), values=True),
        ],
        "dense_crf_pairwise_energy": [
            BadCall("q_4d", (unary, [], [], []), "q must be a non-empty [B, L, N] tensor, got shape [1, 3, 5, 6]"),
            BadCall("q_nan", (torch.full_like(u3, nan), [], [], []), "q contains NaN or inf", values=True),
            BadCall("features_shape", (u3, [f[:, :, :29]], [one], [3]),
                    "features[0] must have shape [B, D, N] = [1, D, 30], got [1, 2, 29]"),
        ],
        "dense_crf_features_backward": [
            BadCall("grad_q", (u3[:, :2], u3, None, u3, [], [], [], 2, None, []),
                    "grad_q must match the unary (Float, [1, 3, 30]), got Float, [1, 2, 30]"),
            BadCall("history", (u3, u3, u3[:, :, :, None], u3, [], [], [], 2, None, []), "history must be Float "),
            BadCall("compat_grad", (u3, u3, None, u3, [], [], [], 2, None, [True]),
                    "compat_grad needs one flag per term (0), got 1"),
        ],
        "dense_crf_image_features": [
            BadCall("image_dtype", (image.float(), 3.0, 80.0, 13.0), "image must be uint8 RGB, got Float"),
            BadCall("image_channels", (image[:, :1], 3.0, 80.0, 13.0),
                    "image must have 3 channels (RGB) in dim 1, got 1 (shape [1, 1, 5, 6])"),
            BadCall("sd_negative", (image, -1.0, 80.0, 13.0), "gaussian_sxy must be a finite value > 0, got -1"),
            BadCall("sd_small", (image, 3.0, 80.0, 1e-5), "bilateral_srgb must be at least 0.000486374"),
        ],
    }


def _errors_of(op: str):
    if op == "atrous_conv2d":
        return atrous_conv2d_errors
    return lambda device="cpu": dense_crf_errors(device)[op]


ERRORS: dict[str, Callable] = {op: _errors_of(op) for op in ("atrous_conv2d", "dense_crf", "dense_crf_features",
                                                             "dense_crf_pairwise_energy", "dense_crf_features_backward",
                                                             "dense_crf_image_features")}
# The prefix of each op's messages.
PREFIX = {"dense_crf_features_backward": "dense_crf backward: "}


def prefix(op: str) -> str:
    return PREFIX.get(op, "atrous_conv2d: " if op == "atrous_conv2d" else "dense_crf: ")
