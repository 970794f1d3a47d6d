from torch import nn

from diffquant.quant.targeting import Rule, resolve_targets


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 4, 3)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_deny_all_by_default():
    d = resolve_targets(Net(), [])
    assert set(d) == {"conv_in", "block.0", "block.1", "head"}
    assert not any(x.quantize for x in d.values())
    assert all(x.rule == "deny-all (default)" for x in d.values())


def test_last_match_wins():
    rules = [
        Rule(pattern="*", name="all"),
        Rule(pattern="block.*", quantize=False, name="no-block"),
        Rule(pattern="block.1", name="but-block-linear"),
    ]
    d = resolve_targets(Net(), rules)
    assert d["conv_in"].quantize and d["conv_in"].rule == "all"
    assert not d["block.0"].quantize and d["block.0"].rule == "no-block"
    assert d["block.1"].quantize and d["block.1"].rule == "but-block-linear"
    assert d["block.1"].history == ["all", "no-block", "but-block-linear"]
    # the same rules in another order give another answer
    d2 = resolve_targets(Net(), [rules[2], rules[1], rules[0]])
    assert d2["block.0"].quantize and d2["block.0"].rule == "all"


def test_class_filter_and_sides():
    rules = [Rule(pattern="*", classes=("Linear",), activations=False, name="weight-only-linears")]
    d = resolve_targets(Net(), rules)
    assert not d["conv_in"].quantize
    assert d["head"].quantize and d["head"].weights and not d["head"].activations
