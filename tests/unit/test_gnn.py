"""The GATv2 predictor: the layer graph of a real (tiny) denoiser traced through torch, attention
that normalizes over each node's neighbours, and a fit that ranks unseen configurations."""

import random

import torch

from diffquant.passes.qua2sedimo.gnn import GATv2Layer, GNNTraining, Space, denoiser_graph, fit_predictor, train_gnn
from diffquant.passes.qua2sedimo.options import OptionCache, WeightOption
from diffquant.passes.qua2sedimo.predictor import spearman
from diffquant.passes.qua2sedimo.sensitivity import sample_configs, weight_layers


def test_layer_graph_connects_every_weight_layer_through_combine_nodes(tiny_dit, tiny_unet):
    for d in (tiny_dit, tiny_unet):
        layers = list(weight_layers(d.model))
        g = denoiser_graph(d, layers)
        n = len(layers) + len(g.combine)
        assert g.edges.shape[0] == 2 and int(g.edges.max()) == n - 1
        assert {"add", "norm"} <= set(g.combine)
        real = g.edges[:, g.edges[0] != g.edges[1]]
        touched = set(real.flatten().tolist())
        assert set(range(len(layers))) <= touched  # no weight layer is left unconnected
        pairs = set(map(tuple, real.T.tolist()))
        assert all((b, a) in pairs for a, b in pairs)  # undirected
    names = list(weight_layers(tiny_dit.model))
    g = denoiser_graph(tiny_dit, names)
    q, k = names.index("transformer_blocks.0.attn1.to_q"), names.index("transformer_blocks.0.attn1.to_k")
    # Q and K meet in the attention product: one combine node is a neighbour of both
    nb = {i: set(g.edges[1][g.edges[0] == i].tolist()) for i in (q, k)}
    assert any(g.combine[j - len(names)] == "matmul" for j in nb[q] & nb[k] if j >= len(names))


def test_attention_weights_sum_to_one_per_node_and_ignore_non_neighbours():
    torch.manual_seed(0)
    layer = GATv2Layer(8)
    edges = torch.tensor([[0, 1, 2, 0, 1, 2], [1, 0, 1, 0, 1, 2]])  # j -> i, with self loops
    h = torch.randn(2, 3, 8)
    out = layer(h, edges)
    h2 = h.clone()
    h2[:, 2] += 5.0  # node 2 feeds node 1 and itself only: node 0 must not move
    assert torch.allclose(layer(h2, edges)[:, 0], out[:, 0]) and not torch.allclose(layer(h2, edges)[:, 1], out[:, 1])


def test_gnn_learns_to_rank_unseen_configurations(tiny_dit):
    layers = list(weight_layers(tiny_dit.model))
    options = [WeightOption("uaq", 3), WeightOption("uaq", 4)]
    rng = random.Random(0)
    sens = {n: rng.uniform(0.0, 2.0) for n in layers}
    configs = sample_configs(layers, 160, seed=1, bits=(3, 4), methods=("uaq",))
    scores = [sum(sens[n] * (o.bits == 4) for n, o in c.items()) for c in configs]
    pred = fit_predictor(
        "gnn",
        Space(tiny_dit, layers, options, OptionCache()),
        configs[:120],
        scores[:120],
        seed=0,
        training=GNNTraining(epochs=60, batch=32),
    )
    assert spearman(pred.predict(configs[120:]), torch.tensor(scores[120:])) > 0.8
    untrained = train_gnn(
        type(pred)(pred.graph, pred.static, pred.errors), configs[:120], scores[:120], 0, GNNTraining(epochs=0)
    )
    mse = [
        float((p.predict(configs[:120]) - torch.tensor(scores[:120], dtype=torch.float64)).pow(2).mean())
        for p in (pred, untrained)
    ]
    assert mse[0] < 0.3 * mse[1]  # it learned the scores, not only their order
