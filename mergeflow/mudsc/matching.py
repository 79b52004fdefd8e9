"""Matchers: from a similarity over the M*O concatenated units of one merge point to an assignment.

An assignment gives every unit (model k's unit i is row k*O + i) the index of the merged unit it
joins, in [0, O): the merged model keeps the width of one model. Each matcher also returns the
mean similarity of the merges it chose, the objective of the refinement loop.

- `zip_match`: ZipIt!'s greedy zip (merge discount `a`, same-model budget `b`).
- `permute_match`: Hungarian alignment of every model to model 0 (Git Re-Basin style).
- `group_match` / `group_zip_match`: heads / GN groups first paired by Hungarian on mean matched
  similarity, then units matched only inside paired groups (the zip over all group tuples in
  turn, with shared budgets, as the official group zip).
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
    likely to merge again (a <= 0: it may no longer match units of the two models u and v came from).
    Merges inside one model are allowed, at most floor((to_remove / M) * b) per model (and at
    least one, as the official code checks the budget only after such a merge).
    """
    clusters, value = _zip(sim, num_models, a, b, [torch.arange(sim.shape[0])])
    return _cluster_index(clusters), value


def _zip(sim: torch.Tensor, num_models: int, a: float, b: float, tuples: list[torch.Tensor],
         group_of: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The zip over `tuples` of units in turn, each down to 1 / num_models of its units, on one
    shared similarity matrix and model budget (the official group zip; one tuple: plain zip).
    `group_of` (per unit; None: no groups) adds the official per-group budget: floor(to_remove /
    number of groups) merges inside one group. Returns each unit's cluster representative and
    the mean similarity of the merges."""
    n = sim.shape[0]
    o = n // num_models
    s = sim.clone().double()
    s.fill_diagonal_(NEG_INF)
    origin = torch.arange(n) // o  # model each (surviving) unit came from; a merged unit keeps u's
    members = torch.arange(n)  # representative unit of each unit's cluster
    alive = torch.ones(n, dtype=torch.bool)
    budget = torch.full((num_models,), int((n - o) // num_models * b + 1e-4))
    # As the official ZipIt! and MuDSC code, a budget is checked after each merge it counts,
    # never before the first: one such merge happens even when the budget rounds to 0.
    groups = 0 if group_of is None else int(group_of.max()) + 1
    group_budget = torch.full((groups,), int((n - o) // max(groups, 1) + 1e-4))
    values = []
    for units in tuples:
        units = units.sort().values  # so the block's first maximum is the whole matrix's first
        whole = len(units) == n
        for _ in range(len(units) - len(units) // num_models):
            # the best pair inside the tuple: argmax over its block, not over a masked copy of all
            block = s if whole else s[units[:, None], units[None, :]]
            i, j = divmod(int(torch.argmax(block)), len(units))
            u, v = sorted((int(units[i]), int(units[j])))
            if s[u, v] == NEG_INF:  # the official code would merge a unit with itself here
                raise ValueError(
                    f"zip matching ran out of allowed merges with {int(alive.sum())} units left of the "
                    f"{n // num_models} wanted: the same-model budget b={b} and a={a} forbid every remaining "
                    "pair (a <= 0 bars a merged unit from both its source models, which with 3 or more "
                    "models often leaves none); use a > 0, or raise b")
            values.append(float(s[u, v]))
            source_models = (origin[u].item(), origin[v].item())
            members[members == v] = u
            alive[v] = False
            s[:, u] = torch.minimum(s[:, u], s[:, v])
            s[u, :] = torch.minimum(s[u, :], s[v, :])
            s[v, :] = NEG_INF
            s[:, v] = NEG_INF
            _spend(s, alive, origin, u, v, budget)
            if group_of is not None:
                _spend(s, alive, group_of, u, v, group_budget)
            if a <= 0:  # the official code's intent (it indexes the shrunk matrix by the original positions)
                forbidden = alive & torch.isin(origin, torch.tensor(source_models))
                s[u, forbidden] = NEG_INF
                s[forbidden, u] = NEG_INF
            else:
                s[u, :] *= a
                s[:, u] *= a
    return members, float(np.mean(values)) if values else 0.0


def _spend(s: torch.Tensor, alive: torch.Tensor, owner: torch.Tensor, u: int, v: int, budget: torch.Tensor) -> None:
    """A merge of u and v of the same owner (model, or group) spends one of its budget; at 0, no
    more merges inside that owner."""
    if owner[u] == owner[v]:
        budget[owner[u]] -= 1
        if budget[owner[u]] <= 0:
            own = alive & (owner == owner[u])
            s[own[:, None] & own[None, :]] = NEG_INF


def _cluster_index(members: torch.Tensor) -> torch.Tensor:
    """Each unit's merged index: clusters numbered in the order of their representatives."""
    return torch.unique(members, return_inverse=True)[1]


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
    the units of each group tuple on its own (the permute matcher; the zip has `group_zip_match`).
    """
    tuples = _group_tuples(sim, num_models, group_size)
    assign = torch.empty(sim.shape[0], dtype=torch.long)
    values = []
    for g, idx in enumerate(tuples):
        sub_assign, value = inner(sim[idx][:, idx], num_models)
        assign[idx] = g * group_size + sub_assign
        values.append(value)
    return assign, float(np.mean(values))


def group_zip_match(sim: torch.Tensor, num_models: int, group_size: int, a: float = 0.5,
                    b: float = 1.0) -> tuple[torch.Tensor, float]:
    """The official group zip (default_group_fusion_weight): groups paired as in `group_match`,
    then one zip over the whole point, a group tuple at a time, with the model budget shared by
    all tuples (floor(to_remove / M * b) per model) and floor(to_remove / groups) merges inside
    any one group."""
    n = sim.shape[0]
    tuples = _group_tuples(sim, num_models, group_size)
    members, value = _zip(sim, num_models, a, b, tuples, group_of=torch.arange(n) // group_size)
    assign = torch.empty(n, dtype=torch.long)
    for g, idx in enumerate(tuples):
        assign[idx] = g * group_size + _cluster_index(members[idx])
    return assign, value


def _group_tuples(sim: torch.Tensor, num_models: int, group_size: int) -> list[torch.Tensor]:
    """The unit indices of each group of model 0 with the groups of the other models paired to
    it (Hungarian on the mean similarity of each pair's own Hungarian matching)."""
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
    return [torch.cat([k * o + int(partner[k][g]) * group_size + unit for k in range(num_models)])
            for g in range(groups)]


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
        if matcher == "zip":
            return group_zip_match(sim, num_models, group_size, a, b)
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
