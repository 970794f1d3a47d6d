"""Qua2SeDiMo's graph predictor: a GATv2 network (plain torch) over the denoiser's graph that
predicts a weight configuration's score, trained with MSE plus a pairwise ranking loss.

The graph comes from one forward pass followed through every torch function (a
``TorchFunctionMode``; torch only, no export): nodes are the weight layers (``linear`` /
``conv2d`` on their weight) and the combine nodes between them (adds and matmuls of two traced
tensors, normalizations); every other op is contracted away, an edge joining each kept node to
its nearest kept producers. Node features: method (one-hot), bits, the option's relative weight
error, the layer's share of all weights, its block index and op type (one-hot), the combine
kind. The paper's hop-level ranking loss is read here as a RankNet loss over all pairs of a
batch (a smooth surrogate of the order the search needs); the readout is mean + max pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from diffquant.models.denoiser import Denoiser
from diffquant.passes.qua2sedimo.options import METHODS, OptionCache, WeightOption
from diffquant.passes.qua2sedimo.predictor import RidgePredictor
from diffquant.passes.qua2sedimo.sensitivity import OP_TYPES, block_of, op_type, weight_layers

__all__ = [
    "GATv2Layer",
    "GNNPredictor",
    "GNNTraining",
    "LayerGraph",
    "Space",
    "denoiser_graph",
    "fit_predictor",
    "static_features",
    "train_gnn",
]

KINDS = ("add", "matmul", "norm")
COMBINE = {
    "add": "add",
    "__add__": "add",
    "__radd__": "add",
    "add_": "add",
    "__iadd__": "add",
    "matmul": "matmul",
    "__matmul__": "matmul",
    "bmm": "matmul",
    "baddbmm": "matmul",
    "einsum": "matmul",
    "scaled_dot_product_attention": "matmul",
    "layer_norm": "norm",
    "group_norm": "norm",
    "instance_norm": "norm",
    "rms_norm": "norm",
}
TYPES = [t for t, _ in OP_TYPES] + ["final projection", "patchify", "other"]


@dataclass
class LayerGraph:
    """Nodes (weight layers first, in ``layers`` order, then combine nodes by kind) and
    undirected edges as a [2, E] index with self loops."""

    layers: list[str]
    combine: list[str]
    edges: torch.Tensor


class _Tracer(TorchFunctionMode):
    """Follows one forward pass through every torch function: a weight layer (``linear`` /
    ``conv2d`` on a known weight) or a combine op (two traced operands) becomes a node fed by
    the nearest nodes upstream; any other op passes its inputs' nodes on."""

    def __init__(self, weights: dict[int, int], n_layers: int) -> None:
        super().__init__()
        self.weights, self.n_layers = weights, n_layers
        self.reach: dict[int, frozenset[int]] = {}
        self.keep: list = []  # tensors seen, kept alive so their ids stay unique
        self.combine: list[str] = []
        self.pairs: set[tuple[int, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in _tensors(args) + _tensors(list(kwargs.values())) if id(t) in self.reach]
        parents = frozenset().union(*(self.reach[id(t)] for t in inputs))
        name = getattr(func, "__name__", "")
        weight = (
            next((self.weights[id(a)] for a in args[1:2] if id(a) in self.weights), None)
            if name in ("linear", "conv2d")
            else None
        )
        kind = COMBINE.get(name)
        if weight is not None or (kind and (kind == "norm" or len({id(t) for t in inputs}) >= 2)):
            me = weight if weight is not None else self.n_layers + len(self.combine)
            if weight is None:
                self.combine.append(kind)
            self.pairs.update((p, me) for p in parents if p != me)
            parents = frozenset([me])
        for t in _tensors([out]):
            self.reach[id(t)] = parents
            self.keep.append(t)
        return out


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(v)
    return out


def denoiser_graph(denoiser: Denoiser, layers: list[str]) -> LayerGraph:
    """The contracted layer graph of ``denoiser`` from one traced forward pass (see `_Tracer`)."""
    mods = weight_layers(denoiser.model)
    tracer = _Tracer({id(mods[n].weight): i for i, n in enumerate(layers)}, len(layers))
    inputs = denoiser.example_inputs(batch=1)
    named = {k: inputs[k] for k in inputs.keys()}
    with torch.no_grad():
        for v in _tensors(list(named.values())):
            tracer.reach[id(v)] = frozenset()
        with tracer:
            denoiser(**named)
    pairs, n = tracer.pairs, len(layers) + len(tracer.combine)
    src = [a for a, b in pairs] + [b for a, b in pairs] + list(range(n))
    dst = [b for a, b in pairs] + [a for a, b in pairs] + list(range(n))
    return LayerGraph(layers, tracer.combine, torch.tensor([src, dst], dtype=torch.long))


class GATv2Layer(nn.Module):
    """One GATv2 attention layer: e_ij = a . LeakyReLU(W_s h_i + W_t h_j), softmax over the
    neighbours j of i, h_i' = sum_j alpha_ij W_t h_j; ELU and a residual around it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.src, self.dst = nn.Linear(width, width), nn.Linear(width, width)
        self.att = nn.Parameter(torch.randn(width) / width**0.5)

    def forward(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        i, j = edges[1], edges[0]  # message j -> i
        hs, ht = self.src(h), self.dst(h)
        e = torch.nn.functional.leaky_relu(hs[:, i] + ht[:, j], 0.2) @ self.att  # [B, E]
        w = (e - e.amax(dim=1, keepdim=True).detach()).exp()  # one shift per graph: softmax is shift-invariant
        denom = torch.zeros_like(h[..., 0]).index_add(1, i, w)[:, i]
        msg = (w / denom).unsqueeze(-1) * ht[:, j]
        return h + torch.nn.functional.elu(torch.zeros_like(h).index_add(1, i, msg))


class GNNPredictor(nn.Module):
    """Node features -> 4 GATv2 layers of width 64 -> mean + max pooling -> score (standardized)."""

    def __init__(
        self,
        graph: LayerGraph,
        static: torch.Tensor,
        errors: dict[tuple[str, WeightOption], float],
        width: int = 64,
        depth: int = 4,
    ) -> None:
        super().__init__()
        self.graph, self.static, self.errors = graph, static, errors
        self.embed = nn.Linear(static.shape[1] + len(METHODS) + 2, width)
        self.layers = nn.ModuleList(GATv2Layer(width) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.ELU(), nn.Linear(width, 1))
        self.mean, self.std = 0.0, 1.0

    def features(self, configs: list[dict[str, WeightOption]]) -> torch.Tensor:
        """[configs, nodes, F]: the static features and, on layer nodes, method, bits and the option's error."""
        dyn = torch.zeros(len(configs), self.static.shape[0], len(METHODS) + 2)
        for b, c in enumerate(configs):
            for li, name in enumerate(self.graph.layers):
                o = c[name]
                dyn[b, li, METHODS.index(o.method)] = 1.0
                dyn[b, li, len(METHODS)] = o.bits - 3.5
                dyn[b, li, len(METHODS) + 1] = 10.0 * self.errors[(name, o)]
        return torch.cat([self.static.expand(len(configs), -1, -1), dyn], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, self.graph.edges)
        return self.head(torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=1)).squeeze(1)

    def predict(self, configs: list[dict[str, WeightOption]]) -> torch.Tensor:
        with torch.no_grad():
            return self(self.features(configs)).double() * self.std + self.mean


def _one_hot(value: str, values: list[str] | tuple[str, ...]) -> list[float]:
    return [1.0 if v == value else 0.0 for v in values]


def static_features(graph: LayerGraph, denoiser: Denoiser) -> torch.Tensor:
    """[nodes, F]: size share (relative to the mean layer), block index in [0, 1], is-a-layer,
    op type one-hot, combine kind one-hot."""
    mods = weight_layers(denoiser.model)
    sizes = [mods[n].weight.numel() for n in graph.layers]
    blocks = list(dict.fromkeys(block_of(n) for n in graph.layers))
    rows = [
        [s * len(sizes) / sum(sizes), blocks.index(block_of(n)) / max(1, len(blocks) - 1), 1.0]
        + _one_hot(op_type(n), TYPES)
        + [0.0] * len(KINDS)
        for n, s in zip(graph.layers, sizes)
    ]
    rows += [[0.0, 0.0, 0.0] + [0.0] * len(TYPES) + _one_hot(k, KINDS) for k in graph.combine]
    return torch.tensor(rows)


@dataclass
class GNNTraining:
    """Adam on MSE + ``rank_weight`` x pairwise RankNet loss, over standardized scores."""

    epochs: int = 200
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    rank_weight: float = 1.0


def train_gnn(
    model: GNNPredictor,
    configs: list[dict[str, WeightOption]],
    scores: list[float],
    seed: int,
    cfg: GNNTraining | None = None,
) -> GNNPredictor:
    """Fit ``model`` to ``scores`` (seeded)."""
    cfg = cfg or GNNTraining()
    gen = torch.Generator().manual_seed(seed)
    x, y = model.features(configs), torch.tensor(scores, dtype=torch.float32)
    model.mean, model.std = float(y.mean()), float(y.std().clamp_min(1e-6))
    y = (y - model.mean) / model.std
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for k in range(0, len(y), cfg.batch):
            idx = perm[k : k + cfg.batch]
            pred, yb = model(x[idx]), y[idx]
            sign = torch.sign(yb[:, None] - yb[None, :])
            rank = torch.nn.functional.softplus(-sign * (pred[:, None] - pred[None, :]))[sign != 0]
            loss = (pred - yb).pow(2).mean() + cfg.rank_weight * (rank.mean() if rank.numel() else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


_GRAPHS: dict[tuple[int, tuple[str, ...]], LayerGraph] = {}


@dataclass
class Space:
    """What a predictor is fitted over: the denoiser, the weight layers a configuration assigns,
    the options each may take, and the cache of their quantized weights."""

    denoiser: Denoiser
    layers: list[str]
    options: list[WeightOption]
    cache: OptionCache


def fit_predictor(
    kind: str,
    space: Space,
    configs: list[dict[str, WeightOption]],
    scores: list[float],
    *,
    seed: int = 0,
    training: GNNTraining | None = None,
):
    """A fitted predictor of ``kind`` (``ridge`` or ``gnn``) with ``predict(configs)``."""
    denoiser, layers, options, cache = space.denoiser, space.layers, space.options, space.cache
    if kind == "ridge":
        return RidgePredictor(layers, options).fit(configs, scores)
    key = (id(denoiser.model), tuple(layers))
    if key not in _GRAPHS:
        _GRAPHS[key] = denoiser_graph(denoiser, layers)
    graph = _GRAPHS[key]
    mods = weight_layers(denoiser.model)
    errors = {(n, o): cache.get(mods[n].weight, o).error(mods[n].weight) for n in layers for o in options}
    torch.manual_seed(seed)
    return train_gnn(GNNPredictor(graph, static_features(graph, denoiser), errors), configs, scores, seed, training)
