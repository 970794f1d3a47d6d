"""Fake-quant on CUDA gives the CPU result (plans replay on any device). Needs a CUDA GPU."""

import copy

import pytest
import torch

from diffquant.passes import load_recipe, quantize
from diffquant.quant import apply_plan
from tests.conftest import make_tiny_unet, tiny_calib

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def test_plan_replays_on_cuda(calib_cache):
    d = make_tiny_unet()
    plan = quantize(d, load_recipe("minmax"), tiny_calib(d, calib_cache), bits="w8a8", progress=False)
    cpu = copy.deepcopy(d)
    apply_plan(cpu.model, plan)
    gpu = copy.deepcopy(cpu).cuda()
    inp = d.example_inputs(4)
    with torch.no_grad():
        ref = cpu(**inp)
        got = gpu(**inp.to("cuda")).cpu()
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
