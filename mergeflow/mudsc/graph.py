"""Merge points derived from a backbone's torch.fx graph.

A *merge point* is a feature space shared by several tensors: axis 0 of a tensor *produces* it
(rows of a Linear/Conv weight, bias, norm scale/shift, cls/pos embeddings), axis 1 *consumes* it
(input columns). Walking the traced graph, every Linear/Conv output opens a new space; norms and
elementwise ops keep it; an addition or concatenation unites the spaces of its operands, so a
residual stream becomes ONE merge point for the whole network (skip additions force its units
to agree everywhere). GroupNorm and fused-qkv attention add unit groups (GN groups, heads) that
matching must not cross. Each point also says where its activations are read (`Capture`), in
one place, as the official MuDSC code does ("the last input module of each node"): the input
of the last layer, in forward order, that reads it; for the backbone's output space, the input
of the pooling module that makes it (ResNet's avgpool: the spatial features) or else the
backbone output (the heads' input); for attention's q/k space, the k part of the qkv output
(the official ViT spec reads `k_norm` for both its q and k entries).

Anything the walker does not know is an error naming the module or operation: a silent
mismatch would produce a broken merged model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class UnsupportedModelError(ValueError):
    """The backbone contains a module or operation whose effect on units is unknown."""


@dataclass(frozen=True)
class TensorAxis:
    """Entries [start, stop) of `tensor` along `axis` are the units of a merge point."""

    tensor: str
    axis: int
    start: int
    stop: int
    consumes: bool = False  # True: input columns (transformed by unmerge), else produced units


@dataclass(frozen=True)
class Capture:
    """Read a point's units from `module`'s input or output (module "" = the backbone).

    `slices` are ranges of the feature axis that each hold the point's units (k of a fused qkv
    output); each range adds its rows as extra samples.
    """

    module: str
    where: Literal["input", "output"]
    feature_axis: int
    slices: tuple[tuple[int, int], ...]


@dataclass
class MergePoint:
    name: str
    size: int
    group_size: int  # units per group (head, GN group); == size when unconstrained
    entries: list[TensorAxis]
    captures: list[Capture]
    is_output: bool = False  # the backbone's output space, read by the per-model heads


@dataclass
class MergeGraph:
    points: list[MergePoint]
    # tensor name -> [(point index, entry)], every axis-slice of that tensor that a point owns
    tensor_entries: dict[str, list[tuple[int, TensorAxis]]] = field(default_factory=dict)

    @property
    def output_point(self) -> int:
        return next(i for i, p in enumerate(self.points) if p.is_output)


class _Space:
    """Union-find node of a feature space during the walk."""

    def __init__(self, size: int, name: str, index: int) -> None:
        self.index = index  # creation order: a united stream keeps its first space's name
        self.parent: _Space = self
        self.size, self.name = size, name
        self.group_size = size
        self.entries: list[TensorAxis] = []
        self.captures: list[Capture] = []  # every place it is read, in forward order
        self.pooled_at: Capture | None = None  # the input of the last pooling module it went through
        self.is_output = False

    def root(self) -> _Space:
        node = self
        while node.parent is not node:
            node = node.parent
        return node

    def union(self, other: _Space, where: str) -> _Space:
        a, b = self.root(), other.root()
        if a is b:
            return a
        if a.size != b.size:
            raise UnsupportedModelError(f"{where}: joins feature spaces of sizes {a.size} and {b.size}")
        if a.group_size != b.group_size and a.group_size != a.size and b.group_size != b.size:
            raise UnsupportedModelError(f"{where}: joins unit groups of sizes {a.group_size} and {b.group_size}")
        b.parent = a
        if b.index < a.index:
            a.name, a.index = b.name, b.index
        a.group_size = min(a.group_size, b.group_size)
        a.entries += b.entries
        a.captures += b.captures
        a.pooled_at = a.pooled_at or b.pooled_at
        a.is_output |= b.is_output
        return a


@dataclass(frozen=True)
class _Val:
    """A tensor in the walk: its feature space (None = fixed, e.g. the input pixels) and axis."""

    space: _Space | None
    axis: int | None
    ndim: int


_NOT_TENSOR = object()
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Dropout, nn.Identity)
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.dropout}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d}
_JOIN_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul}
_SAME_METHODS = {"contiguous", "expand", "float", "to", "clone", "relu", "detach"}
_SHAPE_METHODS = {"view", "reshape", "flatten"}
SUPPORTED = (
    "Linear, Conv2d (groups=1), BatchNorm1d/2d, GroupNorm, LayerNorm (last dim), elementwise "
    "activations, Dropout, Identity, pooling, Flatten, fused-qkv attention (modules with qkv, "
    "proj and heads), and add/cat/reshape/transpose/indexing of their outputs"
)


def is_fused_attention(module: nn.Module) -> bool:
    """Multi-head self-attention with a fused qkv Linear, an output proj Linear and `heads`."""
    return (isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear)
            and isinstance(getattr(module, "heads", None), int))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_fused_attention(m) or super().is_leaf_module(m, qualname)


def build_graph(backbone: nn.Module, example: torch.Tensor) -> MergeGraph:
    """Trace `backbone` on `example` inputs (a few images) and derive its merge points."""
    tracer = _Tracer()
    graph = tracer.trace(backbone)
    gm = fx.GraphModule(backbone, graph)
    was_training = backbone.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example[:2])
    backbone.train(was_training)
    walker = _Walker(backbone)
    for node in graph.nodes:
        walker.visit(node)
    return walker.finish()


class _Walker:
    def __init__(self, backbone: nn.Module) -> None:
        self.modules = dict(backbone.named_modules())
        self.vals: dict[fx.Node, object] = {}
        self.spaces: list[_Space] = []

    # -- helpers -------------------------------------------------------------------------------
    def new_space(self, size: int, name: str, entries: list[TensorAxis]) -> _Space:
        s = _Space(size, name, len(self.spaces))
        s.entries = entries
        self.spaces.append(s)
        return s

    def val(self, arg: object) -> object:
        return self.vals[arg] if isinstance(arg, fx.Node) else _NOT_TENSOR

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_val(self, node: fx.Node, space: _Space | None, axis: int | None) -> _Val:
        shape = self.shape(node)
        if shape is None:
            raise UnsupportedModelError(f"operation {node.format_node()} does not give one tensor")
        return _Val(space, None if axis is None else axis % len(shape), len(shape))

    def entries(self, module: str, param: str, axis: int, size: int, start: int = 0,
                consumes: bool = False) -> list[TensorAxis]:
        m = self.modules[module]
        if getattr(m, param, None) is None:
            return []
        name = f"{module}.{param}" if module else param
        return [TensorAxis(name, axis, start, start + size, consumes)]

    # -- the walk -------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.vals[node] = self.tensor_val(node, None, None)
        elif node.op == "get_attr":
            shape = self.shape(node)
            entry = [TensorAxis(node.target, len(shape) - 1, 0, shape[-1])]
            self.vals[node] = self.tensor_val(node, self.new_space(shape[-1], node.target, entry), -1)
        elif node.op == "call_module":
            self.vals[node] = self.visit_module(node, self.modules[node.target], node.target)
        elif node.op in ("call_function", "call_method"):
            self.vals[node] = self.visit_function(node)
        elif node.op == "output":
            out = self.val(node.args[0])
            if not isinstance(out, _Val) or out.space is None or out.ndim != 2:
                raise UnsupportedModelError("the backbone must return features of shape (batch, units)")
            root = out.space.root()
            root.is_output = True
            root.captures.append(Capture("", "output", -1, ((0, root.size),)))

    def visit_module(self, node: fx.Node, m: nn.Module, name: str) -> _Val:
        x = self.val(node.args[0])
        assert isinstance(x, _Val)
        if isinstance(m, nn.Linear | nn.Conv2d):
            feat_axis = -1 if isinstance(m, nn.Linear) else 1
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise UnsupportedModelError(f"module '{name}' is a grouped Conv2d (groups={m.groups}); only groups=1 is supported")
            if x.space is not None:
                self._check_axis(x, feat_axis, name)
                root = x.space.root()
                root.entries += self.entries(name, "weight", 1, root.size, consumes=True)
                root.captures.append(Capture(name, "input", feat_axis, ((0, root.size),)))
            out_size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            entries = self.entries(name, "weight", 0, out_size) + self.entries(name, "bias", 0, out_size)
            return self.tensor_val(node, self.new_space(out_size, name, entries), feat_axis)
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
            return self.visit_norm(node, m, name, x)
        if isinstance(m, _POOL_MODULES) and x.space is not None:
            x.space.root().pooled_at = Capture(name, "input", 1, ((0, x.space.root().size),))
        if isinstance(m, _ELEMENTWISE_MODULES + _POOL_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self.reshaped(node, x)
        if is_fused_attention(m):
            return self.visit_attention(node, m, name, x)
        raise UnsupportedModelError(f"unsupported module '{name}' ({type(m).__name__}); mudsc supports {SUPPORTED}")

    def visit_norm(self, node: fx.Node, m: nn.Module, name: str, x: _Val) -> _Val:
        if x.space is None:
            return x  # a norm on the fixed input: its parameters are simply averaged
        root = x.space.root()
        if isinstance(m, nn.LayerNorm):
            if tuple(m.normalized_shape) != (root.size,):
                raise UnsupportedModelError(f"LayerNorm '{name}' must normalise exactly the unit axis")
            self._check_axis(x, -1, name)
        else:
            self._check_axis(x, 1, name)
        params = ["weight", "bias"] + (["running_mean", "running_var"] if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) else [])
        for p in params:
            root.entries += self.entries(name, p, 0, root.size)
        if isinstance(m, nn.GroupNorm):
            group = root.size // m.num_groups
            if root.group_size not in (root.size, group):
                raise UnsupportedModelError(f"GroupNorm '{name}' groups of {group} clash with groups of {root.group_size}")
            root.group_size = group
        return x

    def visit_attention(self, node: fx.Node, m: nn.Module, name: str, x: _Val) -> _Val:
        if x.space is None:
            raise UnsupportedModelError(f"attention '{name}' reads the fixed input directly")
        self._check_axis(x, -1, name)
        d = m.proj.out_features
        if m.qkv.out_features != 3 * d or m.proj.in_features != d or d % m.heads:
            raise UnsupportedModelError(f"attention '{name}': qkv/proj shapes do not form {m.heads} heads of a width-{d} model")
        root = x.space.root()
        root.entries += self.entries(f"{name}.qkv", "weight", 1, root.size, consumes=True)
        root.captures.append(Capture(f"{name}.qkv", "input", -1, ((0, root.size),)))
        # q and k share one space (q.k sums over it), v and the proj input another; both by head.
        qk_entries, v_entries = [], []
        for p in ("weight", "bias"):
            qk_entries += self.entries(f"{name}.qkv", p, 0, d, 0) + self.entries(f"{name}.qkv", p, 0, d, d)
            v_entries += self.entries(f"{name}.qkv", p, 0, d, 2 * d)
        v_entries += self.entries(f"{name}.proj", "weight", 1, d, consumes=True)
        qk = self.new_space(d, f"{name}.qk", qk_entries)
        v = self.new_space(d, f"{name}.v", v_entries)
        qk.group_size = v.group_size = d // m.heads
        qk.captures.append(Capture(f"{name}.qkv", "output", -1, ((d, 2 * d),)))  # k, as the official spec
        v.captures.append(Capture(f"{name}.proj", "input", -1, ((0, d),)))
        entries = self.entries(f"{name}.proj", "weight", 0, d) + self.entries(f"{name}.proj", "bias", 0, d)
        return self.tensor_val(node, self.new_space(d, f"{name}.proj", entries), -1)

    def visit_function(self, node: fx.Node) -> object:
        target = node.target
        args = [self.val(a) for a in node.args]
        tensors = [a for a in args if isinstance(a, _Val)]
        what = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if node.op == "call_function" and target is torch.cat:
            parts = [self.val(a) for a in node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if any(p.space is not None and p.axis == dim % p.ndim for p in parts):
                raise UnsupportedModelError(f"{node.format_node()}: concatenation along the unit axis")
            return self.joined(node, parts, "cat")
        if node.op == "call_function" and target in (getattr, operator.getitem) and not tensors:
            return _NOT_TENSOR
        if node.op == "call_function" and target is getattr:
            return _NOT_TENSOR  # x.shape and friends
        if node.op == "call_method" and target in ("size", "dim"):
            return _NOT_TENSOR
        if not tensors:
            return _NOT_TENSOR
        x = tensors[0]
        if node.op == "call_function" and target in _JOIN_FUNCTIONS:
            return self.joined(node, tensors, what)
        if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS | _POOL_FUNCTIONS) or (
                node.op == "call_method" and target in _SAME_METHODS):
            return self.tensor_val(node, x.space, x.axis)
        if (node.op == "call_function" and target is torch.flatten) or (node.op == "call_method" and target in _SHAPE_METHODS):
            return self.reshaped(node, x)
        if node.op == "call_method" and target == "transpose":
            a, b = (d % x.ndim for d in node.args[1:3])
            axis = {a: b, b: a}.get(x.axis, x.axis)
            return self.tensor_val(node, x.space, axis)
        if node.op == "call_function" and target is operator.getitem:
            return self.indexed(node, x, node.args[1])
        if node.op == "call_method" and target in ("mean", "sum"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.reduced(node, x, dims, node.kwargs.get("keepdim", False))
        if x.space is None and all(t.space is None for t in tensors):
            return self.tensor_val(node, None, None)  # anything on fixed inputs keeps them fixed
        raise UnsupportedModelError(f"unsupported operation {what!r} on merged units ({node.format_node()}); mudsc supports {SUPPORTED}")

    # -- operation rules -------------------------------------------------------------------------
    def joined(self, node: fx.Node, parts: list[_Val], what: str) -> _Val:
        spaced = [p for p in parts if p.space is not None]
        if not spaced:
            return self.tensor_val(node, None, None)
        if len(spaced) != len(parts):
            raise UnsupportedModelError(f"{what} ({node.format_node()}) mixes merged units with a fixed tensor")
        root = spaced[0].space.root()
        for p in spaced[1:]:
            root = root.union(p.space, f"{what} ({node.format_node()})")
        out_shape = self.shape(node)
        return self.tensor_val(node, root, spaced[0].axis - spaced[0].ndim + len(out_shape))

    def reshaped(self, node: fx.Node, x: _Val) -> _Val:
        if x.space is None:
            return self.tensor_val(node, None, None)
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        prefix = 1
        for d in in_shape[: x.axis]:
            prefix *= d
        running = 1
        for j, d in enumerate(out_shape):
            if running == prefix and d == x.space.root().size:
                rest_in = 1
                for s in in_shape[x.axis + 1:]:
                    rest_in *= s
                rest_out = 1
                for s in out_shape[j + 1:]:
                    rest_out *= s
                if rest_in == rest_out:
                    return self.tensor_val(node, x.space, j)
            running *= d
        raise UnsupportedModelError(f"{node.format_node()}: reshape {in_shape} -> {out_shape} mixes the unit axis with others")

    def indexed(self, node: fx.Node, x: _Val, index: object) -> _Val:
        if x.space is None:
            return self.tensor_val(node, None, None)
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None for i in index):
            raise UnsupportedModelError(f"{node.format_node()}: indexing with ... or None is not supported")
        if len(index) > x.axis and index[x.axis] != slice(None):
            raise UnsupportedModelError(f"{node.format_node()}: indexing selects merged units")
        removed = sum(1 for i in index[: x.axis] if isinstance(i, int))
        return self.tensor_val(node, x.space, x.axis - removed)

    def reduced(self, node: fx.Node, x: _Val, dims: object, keepdim: bool) -> _Val:
        if x.space is None:
            return self.tensor_val(node, None, None)
        if dims is None:
            raise UnsupportedModelError(f"{node.format_node()}: reduction over all axes")
        dims = [d % x.ndim for d in (dims if isinstance(dims, list | tuple) else [dims])]
        if x.axis in dims:
            raise UnsupportedModelError(f"{node.format_node()}: reduction over the unit axis")
        return self.tensor_val(node, x.space, x.axis if keepdim else x.axis - sum(d < x.axis for d in dims))

    @staticmethod
    def _check_axis(x: _Val, axis: int, name: str) -> None:
        if x.axis != axis % x.ndim:
            raise UnsupportedModelError(f"module '{name}' reads merged units on axis {axis % x.ndim}, they are on axis {x.axis}")

    def finish(self) -> MergeGraph:
        roots, seen = [], set()
        for s in self.spaces:
            r = s.root()
            if id(r) not in seen:
                seen.add(id(r))
                roots.append(r)
        points = []
        for r in roots:
            if not r.captures:
                raise UnsupportedModelError(f"feature space of '{r.name}' is never read by a supported layer")
            if r.size % r.group_size:
                raise UnsupportedModelError(f"feature space of '{r.name}': {r.size} units do not split into groups of {r.group_size}")
            entries = list(dict.fromkeys(r.entries))
            points.append(MergePoint(r.name, r.size, r.group_size, entries, [_read_at(r)], r.is_output))
        graph = MergeGraph(points)
        for i, p in enumerate(points):
            for e in p.entries:
                graph.tensor_entries.setdefault(e.tensor, []).append((i, e))
        if sum(p.is_output for p in points) != 1:
            raise UnsupportedModelError("the backbone output must be one merged feature space")
        return graph


def _read_at(space: _Space) -> Capture:
    """Where a point's activations are read (see the module docstring): the official code's one
    place, the last reader in forward order, or for the output space its pooling's input."""
    if space.is_output and space.pooled_at is not None:
        return space.pooled_at
    return space.captures[-1]
