import pytest

from diffquant.errors import DiffquantError
from diffquant.quant.format import PerAxis, PerBlock, PerTensor, QuantFormat, parse_bits


@pytest.mark.parametrize(
    ("text", "wb", "ab"),
    [("w8a8", 8, 8), ("W4A8", 4, 8), ("w4a6", 4, 6), ("w2a4", 2, 4), ("w8a16", 8, None)],
)
def test_parse_bits(text, wb, ab):
    s = parse_bits(text)
    assert s.weight.bits == wb and s.weight.granularity == PerAxis(0)
    assert (s.act.bits if s.act else None) == ab
    if s.act:
        assert s.act.granularity == PerTensor()


@pytest.mark.parametrize("text", ["w9a8", "w8", "int8", "w1a8", "w8a12", ""])
def test_bad_bits(text):
    with pytest.raises(DiffquantError, match="bits"):
        parse_bits(text)


def test_format_validation():
    with pytest.raises(DiffquantError, match="symmetric"):
        QuantFormat(bits=8, symmetric=False)
    with pytest.raises(DiffquantError, match="size > 0"):
        PerBlock(0)
    with pytest.raises(DiffquantError, match="unknown"):
        QuantFormat.from_dict({"bits": 8, "zero_point": 3})
