"""Function-preserving channel permutations before quantization (PQF: "Permute, Quantize, and
Fine-tune", Martinez et al., CVPR 2021).

A subvector of a 1x1 convolution, a linear layer or a transposed convolution spans ``d``
consecutive input channels (of a 3x3 convolution with ``d = 18``, two channels): *which*
channels share a subvector decides how well the layer quantizes. Permuting a layer's input
channels, together with the output channels of the layer that produces them and every
per-channel module in between (BatchNorm weight, bias and running statistics, the producer's
bias; ReLU and the like are transparent), changes those subvectors and leaves the network's
function unchanged.

Three parts:

- :func:`find_groups`: a trace of one forward pass (module hooks plus a torch-function mode
  that sees every tensor operation) finds the *groups*: producers (Conv2d, ConvTranspose2d,
  Linear, ``groups = 1``) whose output reaches only per-channel modules and consumers (the same
  layer types). A tensor with any other use (a residual add, a concatenation, a view, an
  unknown module, the model's output) rejects its group; producers that feed the same
  consumers, and consumers that read the same tensor, share one permutation.
- :func:`choose_permutation`: the permutation of a group's channels that lowers the PQF proxy
  of its consumers: with the consumer's input channels scaled by the root mean square of their
  activations (``1`` for the ``weights`` objective), the sum over subvector groups of
  ``log det`` of the covariance of that group's ``d``-dimensional subvectors over output rows.
  Local search by batches of independent pairwise swaps from the identity, deterministic, never
  worse than the identity.
- :func:`apply_permutation`: permute the weights (in place).

Torch only; the driver step lives in :mod:`bgd_dist.runner`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

PRODUCERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# modules that act on every element (or channel) alone: any layout, the output has the input's shape
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
                       nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout)
# per-channel spatial modules: (N, C, H, W) with the channels on axis 1
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# functions of one tensor that act element by element, seen outside a known module (F.relu in a forward)
ELEMENTWISE_OPS = frozenset({"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "tanh", "tanh_", "silu", "gelu",
                             "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid",
                             "elu", "elu_", "mish"})
SPATIAL_OPS = frozenset({"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"})
# reading these changes nothing the permutation could break (shapes, dtypes, devices)
METADATA = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse",
                      "is_quantized", "is_meta", "is_nested", "grad_fn", "is_leaf", "names", "size", "dim",
                      "numel", "nelement", "ndimension", "is_contiguous", "element_size", "get_device",
                      "is_floating_point", "is_complex", "data_ptr", "stride", "storage_offset", "__len__",
                      "_version"})


# -- the trace -----------------------------------------------------------------------------------
@dataclass
class _Op:
    name: str
    inputs: list[int]           # node ids of the tensor arguments, in order
    outputs: list[int]
    call: int | None            # the innermost module call running when the op ran


@dataclass
class _Call:
    name: str                   # the module's qualified name
    module: nn.Module
    leaf: bool
    input: int | None           # node of the first positional argument (a tensor) or None
    n_inputs: int               # tensor arguments (positional and keyword)
    output: int | None = None   # node of the output (a tensor) or None


def _func_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":   # a property of Tensor (x.shape): its descriptor's name
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _tensors(obj, depth: int = 0) -> list[Tensor]:
    """The tensors in ``obj`` (nested lists, tuples, dicts and plain objects' attributes)."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    if isinstance(obj, nn.Module):
        return []
    if hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in _tensors(v, depth + 1)]
    return []


class _Tracer(TorchFunctionMode):
    """Every tensor operation of one forward pass as a graph of *values* (a tensor object between
    two writes: an in-place op gives the same object a new value), with the module calls it ran in."""

    def __init__(self):
        super().__init__()
        self.node_of: dict[int, int] = {}   # id(tensor) -> its current value
        self.shapes: list[tuple[int, ...]] = []
        self.keep: list[Tensor] = []        # alive until the trace is analysed: ids are never reused
        self.uses: list[list[int]] = []     # value -> ops that read it
        self.ops: list[_Op] = []
        self.calls: list[_Call] = []
        self.stack: list[int] = []
        self.escaped: set[int] = set()      # values returned by the forward pass

    def node(self, t: Tensor) -> int:
        i = self.node_of.get(id(t))
        if i is None:
            i = self._new(t)
        return i

    def _new(self, t: Tensor) -> int:
        self.node_of[id(t)] = len(self.shapes)
        self.shapes.append(tuple(t.shape))
        self.keep.append(t)
        self.uses.append([])
        return len(self.shapes) - 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _func_name(func)
        if name in METADATA:
            return func(*args, **kwargs)
        inputs = [self.node(t) for t in _tensors((args, kwargs))]
        out = func(*args, **kwargs)
        op = _Op(name, inputs, [], self.stack[-1] if self.stack else None)
        self.ops.append(op)
        for i in set(inputs):
            self.uses[i].append(len(self.ops) - 1)
        op.outputs = [self._new(t) for t in _tensors(out)]
        return out

    def pre_hook(self, name: str, module: nn.Module):
        def hook(m, args):
            first = self.node(args[0]) if args and isinstance(args[0], Tensor) else None
            self.calls.append(_Call(name, m, not any(True for _ in m.children()), first, len(_tensors(args))))
            self.stack.append(len(self.calls) - 1)
        return hook

    def post_hook(self, m, args, output):
        call = self.calls[self.stack.pop()]
        call.output = self.node(output) if isinstance(output, Tensor) else None


def _trace(model: nn.Module, run: Callable[[nn.Module], Any]) -> _Tracer:
    tracer = _Tracer()
    names: dict[int, str] = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), n)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(tracer.pre_hook(names[id(m)], m)))
        handles.append(m.register_forward_hook(tracer.post_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), tracer:
            out = run(model)
        tracer.escaped = {tracer.node_of[id(t)] for t in _tensors(out) if id(t) in tracer.node_of}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return tracer


# -- groups --------------------------------------------------------------------------------------
def _is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm (any dimension) or a frozen one (torchvision's / detectron2's FrozenBatchNorm2d:
    weight, bias, running_mean, running_var buffers)."""
    if isinstance(m, _BatchNorm):
        return True
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(m, k, None), Tensor) for k in ("weight", "bias", "running_mean", "running_var"))


def _channel_tensors(m: nn.Module, channels: int) -> list[str]:
    """The names of the per-channel parameters and buffers of a BatchNorm-like module."""
    return [k for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            if v is not None and v.dim() == 1 and v.shape[0] == channels]


def _plain_layer(m: nn.Module) -> bool:
    """A Conv2d, ConvTranspose2d or Linear whose forward is torch's own (a subclass with its own
    forward, e.g. one that normalises or activates inside, may not be channel-wise)."""
    return any(isinstance(m, cls) and type(m).forward is cls.forward for cls in PRODUCERS)


def _groups_of(m: nn.Module) -> int:
    return getattr(m, "groups", 1)


def out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.out_channels


def in_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels


@dataclass
class Group:
    """Layers whose channels are permuted together: the producers' outputs, the consumers'
    inputs and the per-channel modules between them (``channel_modules``)."""

    channels: int
    producers: list[str]
    consumers: list[str]
    channel_modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"channels": self.channels, "producers": self.producers, "consumers": self.consumers,
                "channel_modules": self.channel_modules}


@dataclass
class Rejected:
    """A producer whose output channels cannot be permuted, and why."""

    producer: str
    reason: str


def _layout(module: nn.Module, shape: tuple[int, ...]) -> int | None:
    """The channel axis of a producer's output, None if it is not one we handle."""
    if isinstance(module, nn.Linear):
        return len(shape) - 1 if len(shape) >= 1 else None
    return 1 if len(shape) == 4 else None


def _walk(t: _Tracer, start: int, axis: int, channels: int):
    """Follow the value ``start`` (channels on ``axis``) through per-channel operations.
    Returns ``(consumer calls, channel-module calls, values seen)`` or a reason string."""
    consumers: set[int] = set()
    channel_calls: set[int] = set()
    seen: set[int] = set()
    queue = [(start, axis)]
    while queue:
        node, ax = queue.pop()
        if node in seen:
            continue
        seen.add(node)
        shape = t.shapes[node]
        if ax >= len(shape) or shape[ax] != channels:
            return f"a tensor of shape {shape} does not carry the {channels} channels on axis {ax}"
        if node in t.escaped:
            return "a tensor is returned by the forward pass"
        done_calls: set[int] = set()
        for o in t.uses[node]:
            op = t.ops[o]
            call = t.calls[op.call] if op.call is not None else None
            if call is not None and call.leaf and call.input == node:
                if op.call in done_calls:
                    continue
                done_calls.add(op.call)
                m = call.module
                if call.n_inputs != 1:
                    return f"{call.name} ({type(m).__name__}) reads it with other tensors"
                if isinstance(m, PRODUCERS):
                    if not _plain_layer(m):
                        return f"it feeds {call.name} ({type(m).__name__}), a layer with its own forward"
                    if _groups_of(m) != 1:
                        return f"it feeds the grouped convolution {call.name}"
                    if in_channels(m) != channels:
                        return f"it feeds {call.name} with {in_channels(m)} input channels"
                    want = len(shape) - 1 if isinstance(m, nn.Linear) else 1
                    if ax != want or (not isinstance(m, nn.Linear) and len(shape) != 4):
                        return f"it feeds {call.name} with the channels on another axis"
                    consumers.add(op.call)
                    continue
                if call.output is None or t.shapes[call.output] is None:
                    return f"{call.name} ({type(m).__name__}) does not return one tensor"
                if _is_batchnorm(m):
                    if ax != 1 or len(_channel_tensors(m, channels)) < 2:
                        return f"{call.name} ({type(m).__name__}) normalises another axis"
                    channel_calls.add(op.call)
                elif isinstance(m, ELEMENTWISE_MODULES) and type(m).__module__.startswith("torch.nn"):
                    if t.shapes[call.output] != shape:
                        return f"{call.name} ({type(m).__name__}) changes the shape"
                elif isinstance(m, SPATIAL_MODULES):
                    if ax != 1 or len(shape) != 4 or getattr(m, "return_indices", False):
                        return f"{call.name} ({type(m).__name__}) on a tensor of shape {shape}"
                else:
                    return f"it feeds {call.name} ({type(m).__name__}), which is not a per-channel module"
                queue.append((call.output, ax))
                continue
            where = f" in {call.name or type(call.module).__name__}" if call is not None else ""
            if call is not None and call.leaf:
                return f"{call.name} ({type(call.module).__name__}) uses it besides its input"
            if op.name in ELEMENTWISE_OPS | SPATIAL_OPS and op.inputs.count(node) == 1 and len(op.inputs) == 1 \
                    and len(op.outputs) == 1:
                out_shape = t.shapes[op.outputs[0]]
                if op.name in SPATIAL_OPS and (ax != 1 or len(shape) != 4):
                    return f"{op.name}{where} on a tensor of shape {shape}"
                if op.name in ELEMENTWISE_OPS and out_shape != shape:
                    return f"{op.name}{where} changes the shape"
                queue.append((op.outputs[0], ax))
                continue
            return f"it is used by {op.name}{where}"
    return consumers, channel_calls, seen


def find_groups(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[list[Group], list[Rejected]]:
    """The permutable groups of ``model`` on the forward pass ``run(model)`` (eval mode, no
    gradients), in order of their first producer's call, and the producers rejected, with why.

    Conservative: a group is kept only when every call of every producer, consumer and
    per-channel module in it is accounted for by the group (a module shared with another path,
    a parameter shared with another module, a consumer also fed from elsewhere reject it)."""
    t = _trace(model, run)
    calls_of: dict[str, list[int]] = {}
    for i, c in enumerate(t.calls):
        calls_of.setdefault(c.name, []).append(i)
    modules = dict(model.named_modules())
    results: dict[str, tuple] = {}           # producer name -> (consumers, channel modules, seen) or reason
    order: list[str] = []
    for i, c in enumerate(t.calls):
        m = c.module
        if not isinstance(m, PRODUCERS) or c.name in results:
            continue
        order.append(c.name)
        if not _plain_layer(m):
            results[c.name] = f"{type(m).__name__} has its own forward"
            continue
        if _groups_of(m) != 1:
            results[c.name] = "it is a grouped convolution"
            continue
        parts = ([], [], set())
        for j in calls_of[c.name]:
            call = t.calls[j]
            axis = _layout(m, t.shapes[call.output]) if call.output is not None else None
            if axis is None:
                walked = "its output is not an (N, C, H, W) or (..., C) tensor"
            else:
                walked = _walk(t, call.output, axis, out_channels(m))
            if isinstance(walked, str):
                results[c.name] = walked
                break
            for k in sorted(walked[0]):
                if t.calls[k].name not in parts[0]:
                    parts[0].append(t.calls[k].name)
            for k in sorted(walked[1]):
                if t.calls[k].name not in parts[1]:
                    parts[1].append(t.calls[k].name)
            parts[2].update(walked[2])
        else:
            results[c.name] = parts

    # union producers with their consumers and channel modules
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in order:   # keys by role: a layer consumes one group's channels and produces another's
        find(("out", p))
        if isinstance(results[p], tuple):
            for other in [("in", c) for c in results[p][0]] + [("channel", c) for c in results[p][1]]:
                parent[find(other)] = find(("out", p))
    components: dict[tuple, list[str]] = {}
    for p in order:
        components.setdefault(find(("out", p)), []).append(p)

    owners: dict[int, set[str]] = {}
    for n, m in model.named_modules():
        for p in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False)]:
            owners.setdefault(id(p), set()).add(n)

    groups, rejected = [], []
    for root, producers in components.items():
        reason = next((f"{p}: {results[p]}" for p in producers if isinstance(results[p], str)), None)
        consumers, channel_modules, seen = [], [], set()
        if reason is None:
            for p in producers:
                consumers += [c for c in results[p][0] if c not in consumers]
                channel_modules += [c for c in results[p][1] if c not in channel_modules]
                seen |= results[p][2]
            both = set(producers) & set(consumers)
            if both:
                reason = f"{sorted(both)[0]} both produces and consumes the channels"
        if reason is None:
            for name in consumers + channel_modules:
                stray = [j for j in calls_of[name] if t.calls[j].input not in seen]
                if stray:
                    reason = f"{name} is also called on a tensor outside the group"
                    break
        if reason is None:
            members = set(producers) | set(consumers) | set(channel_modules)
            for name in members:
                for p in list(modules[name].parameters(recurse=False)) + list(modules[name].buffers(recurse=False)):
                    if owners.get(id(p), set()) - {name}:
                        reason = f"{name} shares a parameter with {sorted(owners[id(p)] - {name})[0]}"
                        break
                if reason:
                    break
        if reason is not None:
            rejected += [Rejected(p, reason) for p in producers]
            continue
        groups.append(Group(out_channels(modules[producers[0]]), producers, consumers, channel_modules))
    return groups, rejected


# -- applying a permutation ----------------------------------------------------------------------
@torch.no_grad()
def apply_permutation(model: nn.Module, group: Group, perm: Tensor) -> None:
    """Permute ``group``'s channels in place: new channel ``i`` is old channel ``perm[i]``."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    if sorted(perm.tolist()) != list(range(group.channels)):
        raise ValueError(f"permutation of group {group.producers}: not a permutation of {group.channels} channels")
    modules = dict(model.named_modules())

    def take(t: Tensor, dim: int) -> None:
        t.copy_(t.index_select(dim, perm.to(t.device)))

    for name in group.producers:
        m = modules[name]
        take(m.weight, 1 if isinstance(m, nn.ConvTranspose2d) else 0)
        if m.bias is not None:
            take(m.bias, 0)
    for name in group.channel_modules:
        m = modules[name]
        for k in _channel_tensors(m, group.channels):
            take(getattr(m, k), 0)
    for name in group.consumers:
        m = modules[name]
        take(m.weight, 0 if isinstance(m, nn.ConvTranspose2d) else 1)


# -- choosing the permutation --------------------------------------------------------------------
def channel_matrix(weight: Tensor, kind: str) -> Tensor:
    """A consumer's weight as ``(n_rows, C_in, taps)``: the taps of one input channel that one
    weight row multiplies (conv2d: the kh*kw kernel; linear and conv_transpose2d: one value)."""
    if kind == "conv_transpose2d":
        c_in = weight.shape[0]
        return weight.permute(1, 2, 3, 0).reshape(-1, c_in, 1)
    if kind == "linear":
        return weight.reshape(weight.shape[0], -1, 1)
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def channels_per_subvector(kind: str, weight_shape: tuple[int, ...], block_size: int, groups: int = 1) -> int:
    """How many whole input channels one subvector spans (0 when a subvector lies inside one
    channel's kernel, or straddles channels unevenly: permuting input channels is then pointless
    or not handled)."""
    if groups != 1:
        return 0
    taps = weight_shape[2] * weight_shape[3] if kind == "conv2d" else 1
    if block_size % taps:
        return 0
    k = block_size // taps
    return k if k >= 2 else 0


@dataclass
class _Consumer:
    cov: Tensor      # (C*T, C*T) covariance of the scaled weight over rows (+ eps I)
    k: int           # channels per subvector
    taps: int


def _consumer(weight: Tensor, kind: str, k: int, scale: Tensor | None, rel_eps: float) -> _Consumer:
    w = channel_matrix(weight.detach().to(torch.float64).cpu(), kind)
    if scale is not None:
        w = w * scale.to(torch.float64).view(1, -1, 1)
    rows, c, taps = w.shape
    x = w.reshape(rows, c * taps)
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(rows, 1)
    eps = rel_eps * float(cov.diagonal().mean()) + 1e-30
    cov = cov + eps * torch.eye(c * taps, dtype=torch.float64)
    return _Consumer(cov, k, taps)


def _logdet(matrices: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(matrices)
    out = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if bool((info != 0).any()):   # not positive definite (round-off): slower and exact
        bad = info != 0
        out[bad] = torch.linalg.slogdet(matrices[bad])[1]
    return out


def _taps_index(channels: Tensor, taps: int) -> Tensor:
    """Channel indices (..., k) -> their covariance indices (..., k*taps)."""
    return (channels.unsqueeze(-1) * taps + torch.arange(taps)).flatten(-2)


def _bucket_logdets(cons: _Consumer, perm: Tensor) -> Tensor:
    idx = _taps_index(perm.view(-1, cons.k), cons.taps)
    return _logdet(cons.cov[idx.unsqueeze(-1), idx.unsqueeze(-2)])


def _replacement_logdets(cons: _Consumer, perm: Tensor, buckets: Tensor, max_bytes: float = 64e6) -> Tensor:
    """``R[b, q, j]``: log det of bucket ``buckets[b]`` with its slot ``q`` holding channel ``j``
    (values where ``j`` is already in the bucket are meaningless). By the Schur complement:
    ``log det A + log det (Σ_jj - Σ_jA A⁻¹ Σ_Aj)`` with ``A`` the bucket without slot ``q``."""
    k, taps, c = cons.k, cons.taps, perm.numel()
    rest = (k - 1) * taps
    diag = cons.cov.view(c, taps, c, taps).diagonal(dim1=0, dim2=2).permute(2, 0, 1)       # (C, T, T)
    keep = ~torch.eye(k, dtype=torch.bool)                                                 # slot q -> the others
    chunk = max(1, int(max_bytes // (rest * c * taps * 8 * 2)))
    pairs = (buckets.view(-1, 1) * k + torch.arange(k)).reshape(-1)                      # (b, q) as positions
    out = []
    for part in pairs.split(chunk):
        members = perm.view(-1, k)[part // k]                                             # (P, k)
        others = members[keep[part % k]].view(-1, k - 1)                                  # (P, k-1)
        idx = _taps_index(others, taps)                                                   # (P, rest)
        a = cons.cov[idx.unsqueeze(-1), idx.unsqueeze(-2)]                                # (P, rest, rest)
        chol, _ = torch.linalg.cholesky_ex(a)
        logdet_a = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        eye = torch.eye(rest, dtype=chol.dtype).expand_as(chol)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)                  # small: L⁻¹
        x = torch.bmm(inverse, cons.cov[idx])                                             # (P, rest, C*T)
        x = x.view(x.shape[0], rest, c, taps)
        schur = diag.unsqueeze(0) - torch.einsum("prct,prcs->pcts", x, x)                 # (P, C, T, T)
        out.append(logdet_a.view(-1, 1) + _logdet(schur))
    return torch.cat(out).view(len(buckets), k, c)


def proxy(consumers: list[_Consumer], perm: Tensor) -> float:
    """The PQF proxy of a permutation: the sum over consumers and subvector groups of log det."""
    return float(sum(_bucket_logdets(c, perm).sum() for c in consumers))


def _search(consumers: list[_Consumer], channels: int, max_passes: int, tol: float,
            min_gain: float = 1e-3) -> tuple[Tensor, int]:
    """Local search by pairwise swaps from the identity. Each pass evaluates every swap exactly
    (for each consumer, the log dets of its buckets with one channel replaced) and applies the
    improving swaps that touch disjoint buckets of every consumer, best first; it stops when no
    swap improves, or a pass gains less than ``min_gain`` of what the passes gained so far."""
    perm = torch.arange(channels)
    pos = torch.arange(channels)
    bucket = [pos // c.k for c in consumers]
    logdets = [_bucket_logdets(c, perm) for c in consumers]
    repl = [_replacement_logdets(c, perm, torch.arange(channels // c.k)) for c in consumers]
    passes, total_gain = 0, 0.0
    for passes in range(1, max_passes + 1):
        delta = torch.zeros(channels, channels, dtype=torch.float64)
        for c, b, ld, r in zip(consumers, bucket, logdets, repl):
            rp = r.reshape(channels, channels)                   # position p -> channel j
            a = rp[:, perm]                                      # position p <- channel at position p2
            dc = a + a.T - ld[b].view(-1, 1) - ld[b].view(1, -1)
            dc[b.view(-1, 1) == b.view(1, -1)] = 0.0             # same bucket: this consumer is unchanged
            delta += dc
        delta = torch.triu(delta, diagonal=1).flatten()
        flat = (delta < -tol).nonzero().view(-1)
        if flat.numel() > 4 * channels:
            flat = flat[torch.topk(-delta[flat], 4 * channels).indices]
        flat = flat[torch.sort(delta[flat], stable=True).indices]
        buckets_of = [b.tolist() for b in bucket]
        used = [set() for _ in consumers]
        chosen = []
        gain = 0.0
        for f, v in zip(flat.tolist(), delta[flat].tolist()):
            p1, p2 = divmod(f, channels)
            touched = [(b[p1], b[p2]) for b in buckets_of]
            if any(x in u or y in u for (x, y), u in zip(touched, used)):
                continue
            for (x, y), u in zip(touched, used):
                u.update((x, y))
            chosen.append((p1, p2))
            gain -= v
        if not chosen:
            break
        total_gain += gain
        for p1, p2 in chosen:
            perm[p1], perm[p2] = perm[p2].clone(), perm[p1].clone()
        for i, (c, b) in enumerate(zip(consumers, bucket)):
            changed = torch.tensor(sorted({int(b[p]) for pair in chosen for p in pair}))
            logdets[i][changed] = _bucket_logdets(c, perm).index_select(0, changed)
            repl[i][changed] = _replacement_logdets(c, perm, changed)
        if gain < min_gain * total_gain:   # the passes now gain next to nothing
            break
    return perm, passes


@dataclass
class Choice:
    """The permutation chosen for a group, with the proxy before (identity) and after."""

    perm: list[int]
    proxy_before: float
    proxy_after: float
    passes: int
    seconds: float


def choose_permutation(weights: list[tuple[Tensor, str, int]], scales: list[Tensor | None],
                       max_passes: int = 200, rel_eps: float = 1e-6) -> Choice:
    """The permutation of a group's channels for its consumers ``weights`` (``(weight, kind,
    channels per subvector)``; see :func:`channels_per_subvector`) with per-channel input
    scales ``scales`` (root mean square of the activations; None: 1). Deterministic; the proxy
    after is never above the proxy before."""
    start = time.perf_counter()
    consumers = [_consumer(w, kind, k, s, rel_eps) for (w, kind, k), s in zip(weights, scales)]
    channels = consumers[0].cov.shape[0] // consumers[0].taps
    before = proxy(consumers, torch.arange(channels))
    tol = 1e-9 * max(1.0, abs(before))
    perm, passes = _search(consumers, channels, max_passes, tol)
    after = proxy(consumers, perm)
    if not after <= before:   # round-off on a flat proxy: keep the identity
        perm, after = torch.arange(channels), before
    return Choice(perm.tolist(), before, after, passes, time.perf_counter() - start)


def is_identity(perm: list[int]) -> bool:
    return all(i == p for i, p in enumerate(perm))


# -- a run's permutations ------------------------------------------------------------------------
PERMUTATIONS_VERSION = 1


def sensitive_consumers(group: Group, plan) -> list[tuple[str, int]]:
    """``(name, channels per subvector)`` of the group's consumers that the plan quantizes with
    subvectors spanning several whole input channels (the layers a permutation can help)."""
    out = []
    for name in group.consumers:
        try:
            layer = plan.layer(name)
        except KeyError:
            continue
        if layer.skip:
            continue
        g = layer.geometry
        k = channels_per_subvector(g.kind, g.weight_shape, layer.block_size, g.groups)
        if k:
            out.append((name, k))
    return out


def plan_groups(model: nn.Module, plan, run: Callable[[nn.Module], Any]) -> tuple[list[tuple[Group, list]], list]:
    """The groups worth permuting under ``plan`` (with their sensitive consumers) and, as plain
    dicts, every producer left alone with the reason."""
    groups, rejected = find_groups(model, run)
    kept, left = [], [{"producer": r.producer, "reason": r.reason} for r in rejected]
    for g in groups:
        sensitive = sensitive_consumers(g, plan)
        if sensitive:
            kept.append((g, sensitive))
        else:
            left += [{"producer": p, "reason": "no consumer is quantized with subvectors spanning several channels"}
                     for p in g.producers]
    return kept, left


def check_record(model: nn.Module, record: dict, where: str) -> list[tuple[Group, list[int]]]:
    """The groups and permutations of a ``permutations.json`` record, checked against ``model``
    (every module exists, with the channels recorded; every permutation is one)."""
    if record.get("version") != PERMUTATIONS_VERSION:
        raise ValueError(f"{where}: version {record.get('version')!r} is not {PERMUTATIONS_VERSION}")
    modules = dict(model.named_modules())
    out = []
    for i, entry in enumerate(record["groups"]):
        g = Group(int(entry["channels"]), list(entry["producers"]), list(entry["consumers"]),
                  list(entry["channel_modules"]))
        for name in g.producers + g.consumers + g.channel_modules:
            if name not in modules:
                raise ValueError(f"{where}: group {i} names {name!r}, which the model does not have")
        if any(out_channels(modules[p]) != g.channels for p in g.producers) or \
                any(in_channels(modules[c]) != g.channels for c in g.consumers):
            raise ValueError(f"{where}: group {i} ({g.producers[0]}) does not have {g.channels} channels")
        perm = [int(p) for p in entry["perm"]]
        if sorted(perm) != list(range(g.channels)):
            raise ValueError(f"{where}: group {i} ({g.producers[0]}): not a permutation of {g.channels} channels")
        out.append((g, perm))
    return out
