"""Matchers: from a similarity over the M*O concatenated units of one merge point to an assignment.

An assignment gives every unit (model k's unit i is row k*O + i) the index of the merged unit it
joins, in [0, O): the merged model keeps the width of one model. Each matcher also returns the
mean similarity of the merges it chose, the objective of the refinement loop.

- `zip_match`: ZipIt!'s greedy zip (merge discount `a`, same-model budget `b`).
- `permute_match`: Hungarian alignment of every model to model 0 (Git Re-Basin style).
- `group_match`: heads / GN groups first paired by Hungarian on mean matched similarity, then
  units matched only inside paired groups.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

NEG_INF = float("-inf")
MERGE_EPS = 1e-5  # the official merge matrix: P / (P.sum(0) + 1e-5)


def zip_match(sim: torch.Tensor, num_models: int, a: float = 0.5, b: float = 1.0) -> tuple[torch.Tensor, float]:
    """ZipIt! greedy matching down to O = n / num_models merged units.

    Repeatedly merge the globally most similar pair (u < v): v's members join u; u's similarity
    to the rest becomes min(S[u], S[v]) (complete linkage) times `a`, so a merged unit is less
    likely to merge again (a <= 0: it may no longer match units of the models it contains).
    Merges inside one model are allowed, at most floor((to_remove / M) * b) per model (and at
    least one, as the official code checks the budget only after such a merge).
    """
    n = sim.shape[0]
    o = n // num_models
    s = sim.clone().double()
    s.fill_diagonal_(NEG_INF)
    origin = torch.arange(n) // o  # model each (surviving) unit came from; a merged unit keeps u's
    members = torch.arange(n)  # representative unit of each unit's cluster
    alive = torch.ones(n, dtype=torch.bool)
    budget = torch.full((num_models,), int((n - o) // num_models * b + 1e-4))
    contains = torch.nn.functional.one_hot(origin, num_models).bool()  # models inside each cluster
    # As the official ZipIt! and MuDSC code, a model's budget is checked after each merge inside
    # it, never before the first: one such merge happens even when the budget rounds to 0.
    values = []
    for _ in range(n - o):
        flat = int(torch.argmax(s))
        u, v = sorted(divmod(flat, n))
        values.append(float(s[u, v]))
        same_model = bool(origin[u] == origin[v])
        members[members == v] = u
        contains[u] |= contains[v]
        alive[v] = False
        s[:, u] = torch.minimum(s[:, u], s[:, v])
        s[u, :] = torch.minimum(s[u, :], s[v, :])
        s[v, :] = NEG_INF
        s[:, v] = NEG_INF
        if same_model:
            budget[origin[u]] -= 1
            if budget[origin[u]] <= 0:
                own = alive & (origin == origin[u])
                s[own[:, None] & own[None, :]] = NEG_INF
        if a <= 0:
            forbidden = alive & contains[:, contains[u]].any(dim=1)
            s[u, forbidden] = NEG_INF
            s[forbidden, u] = NEG_INF
        else:
            s[u, :] *= a
            s[:, u] *= a
    reps = torch.nonzero(alive).flatten()  # surviving clusters, in unit order
    index_of = torch.full((n,), -1, dtype=torch.long)
    index_of[reps] = torch.arange(len(reps))
    return index_of[members], float(np.mean(values)) if values else 0.0


def permute_match(sim: torch.Tensor, num_models: int) -> tuple[torch.Tensor, float]:
    """Model 0 keeps its order; every other model is aligned to it by Hungarian (maximise)."""
    n = sim.shape[0]
    o = n // num_models
    assign = torch.empty(n, dtype=torch.long)
    assign[:o] = torch.arange(o)
    values = []
    for k in range(1, num_models):
        block = sim[:o, k * o:(k + 1) * o].double().numpy()
        rows, cols = linear_sum_assignment(block, maximize=True)
        assign[k * o + torch.from_numpy(cols)] = torch.from_numpy(rows)
        values.append(block[rows, cols])
    return assign, float(np.mean(np.concatenate(values)))


def group_match(sim: torch.Tensor, num_models: int, group_size: int, inner) -> tuple[torch.Tensor, float]:
    """Units never cross groups: pair the groups of every model with model 0's, then match inside.

    Group score (g of model 0, h of model k) = mean similarity of the Hungarian matching inside
    the pair; Hungarian on the scores pairs the groups. `inner(sub_sim, num_models)` then matches
    the units of each group tuple (its zip budget is per group).
    """
    n = sim.shape[0]
    o = n // num_models
    groups = o // group_size
    unit = torch.arange(group_size)
    partner = [torch.arange(groups)]  # partner[k][g] = group of model k paired with group g of model 0
    for k in range(1, num_models):
        score = np.zeros((groups, groups))
        for g in range(groups):
            for h in range(groups):
                block = sim[g * group_size + unit][:, k * o + h * group_size + unit].double().numpy()
                r, c = linear_sum_assignment(block, maximize=True)
                score[g, h] = block[r, c].mean()
        _, cols = linear_sum_assignment(score, maximize=True)
        partner.append(torch.from_numpy(cols))
    assign = torch.empty(n, dtype=torch.long)
    values = []
    for g in range(groups):
        idx = torch.cat([k * o + int(partner[k][g]) * group_size + unit for k in range(num_models)])
        sub_assign, value = inner(sim[idx][:, idx], num_models)
        assign[idx] = g * group_size + sub_assign
        values.append(value)
    return assign, float(np.mean(values))


def match(sim: torch.Tensor, num_models: int, group_size: int, matcher: str, a: float = 0.5,
          b: float = 1.0) -> tuple[torch.Tensor, float]:
    """Dispatch to zip or permute, through group matching when the point has unit groups."""
    if matcher == "zip":
        def inner(s, m):
            return zip_match(s, m, a, b)
    elif matcher == "permute":
        inner = permute_match
    else:
        raise ValueError(f"unknown matcher {matcher!r}; use 'zip' or 'permute'")
    o = sim.shape[0] // num_models
    if group_size < o:
        return group_match(sim, num_models, group_size, inner)
    return inner(sim, num_models)


def merge_unmerge(assign: torch.Tensor, num_models: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmerge U (M*O, O): binary membership; merge Mx (O, M*O): U^T averaged over members,
    divided by (members + 1e-5) as the official code does (a merged weight is 1e-5/members
    smaller than the plain mean; kept so results match it)."""
    n = assign.shape[0]
    o = n // num_models
    unmerge = torch.zeros(n, o, dtype=torch.float64)
    unmerge[torch.arange(n), assign] = 1.0
    merge = unmerge.T / (unmerge.sum(0) + MERGE_EPS)[:, None]
    return merge, unmerge
