"""Fake-quant semantics against hand-computed values."""

import torch

from diffquant.quant.fake import MIN_SCALE, fake_quant, quantize_int, round_scale, scale_from_amax
from diffquant.quant.format import PerAxis, PerBlock, QuantFormat


def test_round_half_to_even_and_saturation():
    fmt = QuantFormat(bits=8)
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.6, 300.0, -128.4, -129.0, -500.0])
    #                 ties go to the even neighbour; saturate to [-128, 127]
    want = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 126.0, 127.0, 127.0, -128.0, -128.0, -128.0])
    assert torch.equal(fake_quant(x, s, fmt), want)


def test_low_bit_grid_bounds():
    fmt = QuantFormat(bits=4)
    assert (fmt.qmin, fmt.qmax) == (-8, 7)
    x = torch.tensor([-20.0, -8.4, 6.6, 7.4, 20.0]) * 0.5
    assert torch.equal(quantize_int(x, torch.tensor(0.5), fmt), torch.tensor([-8.0, -8.0, 7.0, 7.0, 7.0]))


def test_scale_rounded_to_fp16_and_clamped():
    s = round_scale(torch.tensor([0.1, 1e-9, 3.0]))
    assert s[0].item() == torch.tensor(0.1, dtype=torch.float16).float().item()
    assert s[0].item() != 0.1
    assert s[1].item() == MIN_SCALE
    assert s[2].item() == 3.0
    # amax 127 at 8 bits is scale 1 exactly
    assert scale_from_amax(torch.tensor(127.0), QuantFormat(bits=8)).item() == 1.0


def test_per_channel_broadcast_uses_axis():
    fmt = QuantFormat(bits=8, granularity=PerAxis(0))
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    out = fake_quant(w, torch.tensor([1.0, 0.5]), fmt)
    assert torch.equal(out, w)  # both representable
    out = fake_quant(torch.tensor([[0.7, 0.7], [0.7, 0.7]]), torch.tensor([1.0, 0.5]), fmt)
    assert torch.equal(out, torch.tensor([[1.0, 1.0], [0.5, 0.5]]))  # 0.7/0.5 = 1.4 -> 1


def test_per_block_scales():
    fmt = QuantFormat(bits=4, granularity=PerBlock(2))
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    scale = torch.tensor([[1.0, 0.25]])
    out = fake_quant(w, scale, fmt)
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    out = fake_quant(w * 3, scale, fmt)  # second block saturates at 7 * 0.25
    assert torch.equal(out, torch.tensor([[3.0, 3.0, 1.75, 1.75]]))


def test_ste_passes_gradient_inside_range_only():
    fmt = QuantFormat(bits=8)
    x = torch.tensor([0.3, 200.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(1.0), fmt, ste=True)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.0, 127.0]))
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0]))
