"""MuDSC library: exact recovery of permuted copies, graph constraints, matchers, BN reset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mergeflow.mudsc import mudsc, weight_matching, zipit
from mergeflow.mudsc.activations import collect_moments
from mergeflow.mudsc.apply import merge_state_dicts, unmerge_head
from mergeflow.mudsc.bn_reset import reset_bn_stats
from mergeflow.mudsc.graph import UnsupportedModelError, build_graph
from mergeflow.mudsc.matching import group_match, merge_unmerge, permute_match, zip_match
from mergeflow.mudsc.models import Classifier, build_backbone
from mergeflow.mudsc.similarity import activation_correlation

TINY_WIDTH = {"mlp": 16, "resnet_bn": 8, "cnn_gn": 8, "vit": 16}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Probe images: centred noise keeps every unit of a random-init model alive (real digits
    leave some ReLUs of an untrained model constant, which makes exact recovery ambiguous)."""
    return torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def tiny_model(family: str, images: torch.Tensor, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier(build_backbone(family, TINY_WIDTH[family]), list(range(5)))
    if family == "mlp":  # PyTorch's default Linear init shrinks activations layer by layer
        for m in model.backbone.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    reset_bn_stats(model, images)  # realistic BN statistics (no-op without BN)
    return model.eval()


def permuted_copy(model: Classifier, images: torch.Tensor, seed: int = 1) -> Classifier:
    """The same function with every merge point's units shuffled (groups shuffled as wholes;
    every block's q/k and v heads get the same head permutation, as attention requires)."""
    graph = build_graph(model.backbone, images)
    gen = torch.Generator().manual_seed(seed)
    head_order: dict[int, torch.Tensor] = {}
    mats = []
    for p in graph.points:
        groups = p.size // p.group_size
        if groups not in head_order:
            head_order[groups] = torch.randperm(groups, generator=gen)
        order = torch.cat([g * p.group_size + torch.randperm(p.group_size, generator=gen) for g in head_order[groups]])
        perm = torch.zeros(p.size, p.size, dtype=torch.float64)
        perm[torch.arange(p.size), order] = 1.0
        mats.append((perm, perm.T.clone()))
    other = copy.deepcopy(model)
    other.backbone.load_state_dict(merge_state_dicts([model.backbone.state_dict()], graph, mats))
    with torch.no_grad():
        other.head.weight.copy_(unmerge_head(model.head.weight, graph, mats, 0))
    return other.eval()


def has_dead_units(model: Classifier, images: torch.Tensor) -> bool:
    """A unit constant on the data correlates 0 with everything: activation matching is then
    ambiguous for it (as in ZipIt!), so exact-recovery tests use models without one."""
    graph = build_graph(model.backbone, images)
    moments = collect_moments([model.backbone], graph, images)
    return any(torch.diagonal(m.second_moment - torch.outer(m.mean, m.mean)).min() < 1e-10 for m in moments)


@pytest.mark.parametrize("family", ["mlp", "resnet_bn", "cnn_gn", "vit"])
def test_merging_a_permuted_copy_gives_back_the_model(family, images):
    model = next(m for m in (tiny_model(family, images, seed) for seed in range(20)) if not has_dead_units(m, images))
    other = permuted_copy(model, images)
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(other(images), expected, atol=1e-5)
        assert not torch.allclose(other.backbone(images), model.backbone(images), atol=1e-3)  # really shuffled
    for name, merge in [("weight matching", lambda: weight_matching([model, other], images, patience=2)),
                        ("zipit", lambda: zipit([model, other], images)),
                        ("mudsc zip", lambda: mudsc([model, other], images, patience=2))]:
        merged = merge().model
        with torch.no_grad():
            out = merged(images)
        assert torch.allclose(out[:, :5], expected, atol=1e-4), f"{family}: {name} did not recover the model"
        assert torch.allclose(out[:, 5:], expected, atol=1e-4), f"{family}: {name} broke the permuted head"


def _point_of(graph, tensor: str, axis: int = 0, start: int = 0):
    return next(i for i, p in enumerate(graph.points) for e in p.entries
                if e.tensor == tensor and e.axis == axis and e.start == start)


def test_residual_stream_is_one_merge_point(images):
    resnet = build_graph(build_backbone("resnet_bn", 8), images)
    stream = _point_of(resnet, "stem.0.weight")
    for name in ("stem.1.weight", "layer1.0.conv2.weight", "layer1.0.bn2.running_var"):
        assert _point_of(resnet, name) == stream
    assert _point_of(resnet, "layer1.0.conv1.weight", axis=1) == stream
    assert _point_of(resnet, "layer2.0.shortcut.0.weight", axis=1) == stream
    assert _point_of(resnet, "layer2.0.shortcut.1.weight") == _point_of(resnet, "layer2.0.conv2.weight")
    assert len(resnet.points) == 4  # stem stream, block-1 hidden, block-2 hidden, stage-2 stream
    vit = build_graph(build_backbone("vit", 16), images)
    stream = _point_of(vit, "patch_embed.weight")
    for name, axis in [("cls_token", 2), ("pos_embed", 2), ("blocks.1.norm1.weight", 0),
                       ("blocks.0.attn.proj.bias", 0), ("blocks.1.mlp.fc2.weight", 0), ("norm.bias", 0),
                       ("blocks.1.attn.qkv.weight", 1), ("blocks.0.mlp.fc1.weight", 1)]:
        assert _point_of(vit, name, axis) == stream, name
    assert vit.points[stream].is_output


def test_attention_heads_never_mix(images):
    models = [tiny_model("vit", images, seed) for seed in (0, 1)]
    result = mudsc(models, images, max_iter=2)
    graph = result.graph
    for p, point in enumerate(graph.points):
        if point.group_size == point.size:
            continue
        hd, o = point.group_size, point.size
        assign = result.matching.assignments[p]
        assert point.name.endswith((".qk", ".v")) and hd == 4
        for k in range(2):
            for unit in range(o):
                merged_head = int(assign[k * o + unit]) // hd
                same_head = [int(assign[k * o + u]) // hd for u in range(unit - unit % hd, unit - unit % hd + hd)]
                assert set(same_head) == {merged_head}  # one source head -> one merged head
    qk = _point_of(graph, "blocks.0.attn.qkv.weight", 0, 0)
    assert _point_of(graph, "blocks.0.attn.qkv.weight", 0, 16) == qk  # q and k share the matching
    assert _point_of(graph, "blocks.0.attn.qkv.weight", 0, 32) != qk  # v has its own


def test_zip_by_hand():
    # units: a0 a1 | b0 b1. b1 ~ a0 (0.9), b0 ~ a1 (0.8), a0 ~ a1 (0.85): zip takes 0.9, then a0's
    # merged row is min(...) * 0.5, so 0.85 drops below 0.8 and b0 joins a1.
    s = torch.tensor([[1.0, 0.85, 0.1, 0.9],
                      [0.85, 1.0, 0.8, 0.2],
                      [0.1, 0.8, 1.0, 0.0],
                      [0.9, 0.2, 0.0, 1.0]])
    assign, value = zip_match(s, 2, a=0.5, b=1.0)
    assert assign.tolist() == [0, 1, 1, 0] and value == pytest.approx((0.9 + 0.8) / 2)
    # with no discount (a=1) the same-model pair a0-a1 (0.85 vs min(0.85, 0.2)=0.2) merges first...
    assign, _ = zip_match(s, 2, a=1.0, b=1.0)
    assert assign.tolist() == [0, 1, 1, 0]
    # ... and a same-model merge happens when it is the best: budget b=1 allows 1 per model
    s2 = s.clone()
    s2[0, 1] = s2[1, 0] = 0.95
    assign, _ = zip_match(s2, 2, a=0.5, b=1.0)
    # a0+a1 (0.95) spends model a's budget; the merged row min(a0, a1) * 0.5 = [b0 0.05, b1 0.1]
    # still beats b0-b1 (0.0), so b1 joins them and b0 stays alone
    assert assign.tolist() == [0, 0, 1, 0]
    # b = 0 leaves no budget, but the official code checks it only after a same-model merge:
    # a0+a1 still merges once (then model a's merges stop), as with b = 1
    assign, _ = zip_match(s2, 2, a=0.5, b=0.0)
    assert assign.tolist() == [0, 0, 1, 0]
    merge, unmerge = merge_unmerge(torch.tensor([0, 1, 1, 0]), 2)
    half = 1 / (2 + 1e-5)  # the official merge matrix: P / (P.sum(0) + 1e-5)
    assert merge.tolist() == [[half, 0, 0, half], [0, half, half, 0]]
    assert unmerge.T.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]


def _zip_without_discount(sim: torch.Tensor, num_models: int, b: float = 1.0) -> list[int] | None:
    """The official zip with a <= 0, written out: after merging u and v, u may no longer match
    any unit whose model is u's or v's (the official code means that; it indexes the shrunk
    matrix by original positions). Each unit's representative, or None where no allowed pair is
    left (the official code would then merge a unit with itself)."""
    s = sim.clone().double().fill_diagonal_(float("-inf"))
    n, o = len(s), len(s) // num_models
    origin, rep, alive = [i // o for i in range(n)], list(range(n)), [True] * n
    budget = [int((n - o) // num_models * b + 1e-4)] * num_models
    for _ in range(n - o):
        u, v = sorted(divmod(int(torch.argmax(s)), n))
        if s[u, v] == float("-inf"):
            return None
        rep = [u if r == v else r for r in rep]
        alive[v] = False
        s[:, u] = torch.minimum(s[:, u], s[:, v])
        s[u, :] = torch.minimum(s[u, :], s[v, :])
        s[v, :] = s[:, v] = float("-inf")
        if origin[u] == origin[v]:
            budget[origin[u]] -= 1
            if budget[origin[u]] <= 0:
                own = [w for w in range(n) if alive[w] and origin[w] == origin[u]]
                s[torch.tensor(own)[:, None], torch.tensor(own)[None, :]] = float("-inf")
        for w in range(n):
            if alive[w] and origin[w] in (origin[u], origin[v]):
                s[u, w] = s[w, u] = float("-inf")
    return rep


def test_zip_without_discount_forbids_both_source_models_and_says_when_no_merge_is_left():
    g = torch.Generator().manual_seed(0)
    outcomes = {"same": 0, "refused": 0}
    for _ in range(60):
        num_models, o = 3, 4
        s = torch.corrcoef(torch.randn(num_models * o, 30, generator=g))
        expected = _zip_without_discount(s, num_models)
        if expected is None:
            with pytest.raises(ValueError, match="ran out of allowed merges.*use a > 0"):
                zip_match(s, num_models, a=0.0, b=1.0)
            outcomes["refused"] += 1
            continue
        assign, _ = zip_match(s, num_models, a=0.0, b=1.0)
        assert assign.tolist() == torch.unique(torch.tensor(expected), return_inverse=True)[1].tolist()
        outcomes["same"] += 1
    assert outcomes["same"] >= 10 and outcomes["refused"] >= 10, outcomes  # both paths are exercised


def _mlp_pair():
    """Two 2-2-2-2 MLPs by hand: A, and B with the second layer's rows swapped."""
    from mergeflow.mudsc.models import MLP

    net = MLP(width=2, depth=3, in_features=2)
    a = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    a["layers.1.weight"], a["layers.1.bias"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0])
    a["layers.3.weight"] = torch.tensor([[7.0, 8.0], [9.0, 10.0]])
    b = {k: v.clone() for k, v in a.items()}
    b["layers.3.weight"] = torch.tensor([[8.0, 7.0], [10.0, 9.0]])
    return net, a, b


def test_weight_vectors_take_neighbours_at_full_scale_by_hand():
    """Unit i of the first hidden layer: [W1[i], b1[i], W2[:, i] in the merged basis of layer 2]. As
    the official get_weight_vectors, a neighbour's produced axis takes the unmerge block (not the
    1/M average), so with identity matching W2's columns enter as they are."""
    from mergeflow.mudsc.apply import unit_vectors
    from mergeflow.mudsc.refine import identity_assignment

    net, a, b = _mlp_pair()
    graph = build_graph(net, torch.zeros(2, 1, 1, 2))
    mats = [merge_unmerge(identity_assignment(p.size, 2), 2) for p in graph.points]
    vectors = unit_vectors([a, b], graph, mats, 0)
    assert vectors.tolist() == [[1, 2, 5, 7, 9], [3, 4, 6, 8, 10], [1, 2, 5, 8, 10], [3, 4, 6, 7, 9]]


def test_refinement_goes_on_from_the_best_matching(monkeypatch):
    """An iteration that does not beat the best is undone, as in the official iter_transform: the
    next one starts from the best matching, not from the worse one."""
    from mergeflow.mudsc import refine

    net, a, b = _mlp_pair()
    graph = build_graph(net, torch.zeros(2, 1, 1, 2))
    n_points = len(graph.points)
    calls, seen = [], []
    identity, swapped = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 0])

    def scripted_match(sim, num_models, group_size, matcher, a_, b_):
        iteration = len(calls) // n_points
        calls.append(iteration)
        return (identity, 0.5) if iteration == 0 else (swapped, 0.4)  # iteration 1 is worse

    real_unit_vectors = refine.unit_vectors

    def recording_unit_vectors(state_dicts, graph_, mats, p):
        seen.append((len(calls) // n_points, [u.clone() for _, u in mats]))
        return real_unit_vectors(state_dicts, graph_, mats, p)

    monkeypatch.setattr(refine, "match", scripted_match)
    monkeypatch.setattr(refine, "unit_vectors", recording_unit_vectors)
    result = refine.solve([a, b], graph, None, alpha=1.0, matcher="permute", a=0.5, b=1.0, max_iter=3)
    assert result.history == pytest.approx([0.5, 0.4, 0.4]) and result.objective == 0.5
    first_of_iteration_2 = next(unmerges for iteration, unmerges in seen if iteration == 2)
    best = merge_unmerge(identity, 2)[1]
    assert all(torch.equal(u, best) for u in first_of_iteration_2)  # not the swapped matching
    assert all(torch.equal(ab[1], best) for ab in result.matrices)


def test_weight_correlation_is_the_official_pearson_with_its_floor():
    from mergeflow.mudsc.similarity import weight_correlation

    v = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], [1e-9, -1e-9, 1e-9, -1e-9]], dtype=torch.float64)
    c = weight_correlation(v)
    assert c[0, 1].item() == pytest.approx(1.0)
    # row 2 is nearly constant: cov(2, 0) = -0.5e-9 over sigma_2 sigma_0 = 1.118e-9, floored at 1e-7
    # as the official _correlation does (plain Pearson would say -0.447)
    assert c[2, 0].item() == pytest.approx(-0.5e-9 / 1e-7)


def test_group_zip_shares_the_model_budget_across_groups():
    """The official group zip runs one zip over the point, a group tuple at a time, with one model
    budget for all tuples. Units a0..a3 (model a, groups {a0,a1} {a2,a3}), b0..b3 likewise;
    a0~a1 and a2~a3 (0.9) are the best pairs of their tuples. b = 0.5 gives model a one merge
    inside itself: a0+a1 spends it, so a2 and a3 must join b's units instead."""
    from mergeflow.mudsc.matching import group_zip_match

    s = torch.zeros(8, 8)
    def pair(i, j, v):
        s[i, j] = s[j, i] = v
    pair(0, 1, 0.9)
    pair(2, 3, 0.9)
    for i, j, v in [(0, 4, 0.5), (1, 5, 0.5), (0, 5, 0.3), (1, 4, 0.3), (2, 6, 0.5), (3, 7, 0.4), (2, 7, 0.3),
                    (3, 6, 0.3)]:
        pair(i, j, v)  # cross-model similarity only inside the group pairs {a0a1|b0b1}, {a2a3|b2b3}
    assign, _ = group_zip_match(s, 2, 2, a=0.5, b=0.5)
    assert assign[0] == assign[1]  # the budget's one merge inside model a
    assert assign[2] != assign[3] and assign[2] == assign[6] and assign[3] == assign[7]
    assert assign[:2].div(2, rounding_mode="floor").tolist() == [0, 0]  # never across groups
    assert set(assign[[2, 3, 6, 7]].div(2, rounding_mode="floor").tolist()) == {1}


def test_permute_and_group_match_by_hand():
    s = torch.eye(8)
    order = torch.tensor([3, 2, 1, 0])  # b's unit j is a's unit order[j]: crosses 2-unit groups
    s[:4, 4:] = s[4:, :4].T.clone()
    cross = torch.zeros(4, 4)
    cross[order, torch.arange(4)] = 1.0
    s[:4, 4:], s[4:, :4] = cross, cross.T
    assign, value = permute_match(s, 2)
    assert assign[4:].tolist() == order.tolist() and value == 1.0
    # groups {0,1},{2,3}: b's group 1 pairs with a's group 0, units matched inside the pair
    assign, _ = group_match(s, 2, 2, permute_match)
    assert assign[4:].tolist() == [3, 2, 1, 0]
    cross2 = torch.zeros(4, 4)
    cross2[torch.tensor([1, 2, 0, 3]), torch.arange(4)] = 1.0  # a crossing match, forbidden by groups
    s[:4, 4:], s[4:, :4] = cross2, cross2.T
    assign, _ = group_match(s, 2, 2, permute_match)
    assert all(int(assign[4 + u]) // 2 == int(assign[4 + (u ^ 1)]) // 2 for u in range(4))


def test_each_point_is_read_where_the_official_code_reads_it(images):
    """One place per point: the last layer that reads it (a residual stream: the last block's
    shortcut), the output space at the avg-pool's input (spatial features), a ViT's stream at the
    heads' input (the backbone output), attention's q/k space at k only (the official ViT spec)."""
    def read_at(family: str) -> dict[str, list[tuple]]:
        graph = build_graph(build_backbone(family, 8 if family == "resnet_bn" else 16), images)
        return {p.name: [(c.module, c.where, c.slices) for c in p.captures] for p in graph.points}

    resnet = read_at("resnet_bn")
    assert resnet["stem.0"] == [("layer2.0.shortcut.0", "input", ((0, 8),))]
    assert resnet["layer2.0.conv2"] == [("pool", "input", ((0, 16),))]
    vit = read_at("vit")
    assert vit["patch_embed"] == [("", "output", ((0, 16),))]
    assert vit["blocks.0.attn.qk"] == [("blocks.0.attn.qkv", "output", ((16, 32),))]


def test_activation_moments_stream_exactly(images):
    backbone = build_backbone("cnn_gn", 8).eval()
    graph = build_graph(backbone, images)
    full = collect_moments([backbone, backbone], graph, images, batch_size=len(images))
    streamed = collect_moments([backbone, backbone], graph, images, batch_size=7)
    for f, s in zip(full, streamed, strict=True):
        assert f.count == s.count and torch.allclose(f.outer, s.outer) and torch.allclose(f.sum, s.sum)
    # output point: read at the avg-pool's input, as the official code (every position a sample);
    # correlation = torch.corrcoef
    seen = []
    handle = backbone.pool.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        backbone(images)
    handle.remove()
    feats = seen[0].movedim(1, -1).reshape(-1, seen[0].shape[1]).double()
    corr = activation_correlation(full[graph.output_point])
    expected = torch.corrcoef(torch.cat([feats, feats], 1).T)
    assert torch.allclose(corr, expected, atol=1e-6)


def test_bn_reset_changes_only_running_statistics(images):
    model = tiny_model("resnet_bn", images)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "running" in name:
                t.mul_(3.0).add_(1.0)  # stale statistics, as after merging
    before = copy.deepcopy(model.state_dict())
    reset_bn_stats(model, images, batch_size=32)
    after = model.state_dict()
    assert not model.training
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == ("running" in name or "num_batches" in name), name
    with torch.no_grad():  # the stem BN's mean is the batch mean of the stem conv over all images
        conv = model.backbone.stem[0](images)
    assert torch.allclose(after["backbone.stem.1.running_mean"], conv.mean((0, 2, 3)), atol=1e-5)


def test_merge_is_deterministic(images):
    models = [tiny_model("mlp", images, seed) for seed in (0, 1)]
    a = mudsc(models, images, max_iter=3).model.state_dict()
    b = mudsc(models, images, max_iter=3).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_module_is_named(images):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedModelError, match=r"'2' \(Softmax\)"):
        build_graph(backbone, images)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="'1' is a grouped Conv2d"):
        build_graph(grouped, images)


def test_bad_inputs_fail_before_work(images):
    a = tiny_model("mlp", images)
    with pytest.raises(ValueError, match="matcher"):
        mudsc([a, a], images, matcher="greedy")
    with pytest.raises(ValueError, match="alpha"):
        mudsc([a, a], images, alpha=1.5)
    with pytest.raises(ValueError, match="differs"):
        mudsc([a, tiny_model("cnn_gn", images)], images)
