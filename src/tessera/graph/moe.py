"""MoE blocks written the usual way, captured whole and run as one `fused_moe` op under
`torch.compile(model, backend="tessera")`.

Mixtral / Qwen-MoE code routes with softmax + top-k and then loops over experts in Python
on data-dependent routing (`torch.where(mask[e])`, `x[idx]`, `out.index_add_(...)`, or
`for e in expert_hit` over a `nonzero()`): dynamo cannot trace that without a graph break
per expert. Here such a block never reaches dynamo as a loop:

1. Classes whose `forward` looks like an MoE block (it reads `self.experts`, or it calls
   `topk` and routes with `where`/`nonzero`/`one_hot`/`index_add_`) get a dispatching
   `forward`: every nn.Module subclass when this module is imported (with the tessera
   backend), and from then on the class of every module built (a global module
   registration hook: an MoE block registers its router and experts in __init__).
2. The dispatcher calls the class's own forward, except while dynamo traces for the tessera
   backend (never in eager, never for other backends). There it asks `plan` for a plan of
   this instance, which dynamo evaluates at trace time (`assume_constant_result`).
3. A plan is found structurally (a router `Linear(H, E)` or `weight [E, H]`; `experts`: E
   modules of three bias-free Linears — gate, up, down — or stacked `gate_up_proj` [E, 2I, H]
   and `down_proj` [E, H, I]; top_k; an optional shared expert with an optional sigmoid
   gate) and then checked numerically: on a probe input the plan, computed with
   `fused_moe`'s torch reference, must reproduce the original forward (outputs, router
   logits if returned, no buffer changed). Hyper-parameters structure cannot show
   (renormalization, which Linear is the gate, whether the shared expert is gated) are
   chosen by that check. No plan: the original forward runs (and graph-breaks as before).
4. With a plan, dynamo traces `fused_forward`: router logits, one
   `torch.ops.tessera.fused_moe` call, the shared expert — no loop, no data-dependent
   shape. Expert weights stacked from per-expert Linears are folded into constants at
   compile time (`fold_expert_weights`).

Options: `torch.compile(m, backend="tessera", options={"moe": False})` keeps blocks as
written.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from tessera.graph.interpreter import call_node, node_function
from tessera.graph.ir import Graph, Value

__all__ = ["Plan", "candidates", "exporting", "fold_expert_weights", "fused_forward", "plan"]

# names of Linears in an expert MLP: gate, up, down (Mixtral's w1/w3/w2, Llama's *_proj)
_GATE_NAMES = ("w1", "gate_proj", "gate", "wi_0")
_UP_NAMES = ("w3", "up_proj", "up", "wi_1")
_DOWN_NAMES = ("w2", "down_proj", "down", "wo")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected")
_ROUTING_CALLS = frozenset(("where", "nonzero", "one_hot", "index_add_", "index_add"))
_PROBE_TOKENS = 8
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # else 5e-2 (half precisions)


class Plan(NamedTuple):
    """How to compute one MoE block with fused_moe: attribute names inside the block and
    the routing hyper-parameters (plain values: dynamo treats a Plan as a constant)."""

    router: str  # child computing the logits
    router_called: bool  # True: call it (a Linear); False: F.linear with its .weight
    experts: str  # the experts child
    stacked: bool  # experts hold gate_up_proj / down_proj; else a list of expert MLPs
    names: tuple[str, ...]  # (gate, up, down) Linear names, or the two stacked params
    transposed: bool  # stacked params are stored [E, K, N] (x @ w) rather than [E, N, K]
    top_k: int
    renormalize: bool
    shared: str | None  # shared expert child, added to the routed output
    shared_gate: str | None  # Linear(H, 1): the shared expert is scaled by its sigmoid
    returns_logits: bool  # forward returns (output, router logits)


# -- classes ---------------------------------------------------------------------------------
_SEEN: set[type] = set()


def _consider(cls: type) -> None:
    """Install the dispatcher on `cls` (once) if its forward looks like an MoE block."""
    if cls not in _SEEN:
        _SEEN.add(cls)
        if _looks_like_moe(cls):
            _install(cls)


def _scan() -> None:
    """Every nn.Module subclass defined so far (a few hundred: under a millisecond)."""
    stack = [torch.nn.Module]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            _consider(cls)


def _on_register(module: torch.nn.Module, name: str, child: Any) -> None:
    """Global module-registration hook: the classes of modules built from now on (an MoE
    block registers its router and experts in __init__, before anything traces it)."""
    if type(module) not in _SEEN:
        for cls in type(module).__mro__:
            if issubclass(cls, torch.nn.Module):
                _consider(cls)


def _looks_like_moe(cls: type) -> bool:
    fn = cls.__dict__.get("forward")
    module = getattr(cls, "__module__", None) or ""
    if not isinstance(fn, types.FunctionType) or module.partition(".")[0] == "torch":
        return False
    names = set(_code_names(fn.__code__))
    return "experts" in names or ("topk" in names and bool(names & _ROUTING_CALLS))


def _code_names(code: types.CodeType) -> Iterator[str]:
    """Global and attribute names a function uses, nested functions included."""
    yield from code.co_names
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_names(c)


def _install(cls: type) -> None:
    """Give `cls` a forward that runs as one fused_moe op when dynamo traces an instance
    for the tessera backend and `plan` finds the instance's plan; otherwise (eager calls,
    other backends, no plan) the class's own forward runs."""
    original = cls.__dict__["forward"]
    first = next(iter(_parameters(original)), None)

    @functools.wraps(original)
    def dispatch(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # `plan` makes dynamo guard on the instance: only for the tessera backend, and only
        # for blocks with experts
        if torch.compiler.is_compiling() and not self.training and _fusing() and \
                isinstance(getattr(self, "experts", None), torch.nn.Module):
            x = args[0] if len(args) == 1 and not kwargs else \
                kwargs.get(first) if not args and len(kwargs) == 1 else None
            if isinstance(x, torch.Tensor):
                p = plan(self, original, x.dim(), x.dtype)
                if p is not None:
                    return fused_forward(self, p, x)
        return original(self, *args, **kwargs)

    dispatch._tessera_moe = True  # type: ignore[attr-defined]
    cls.forward = dispatch


def _parameters(fn: Callable[..., Any]) -> list[str]:
    """Names of fn's parameters after self."""
    code = fn.__code__
    return list(code.co_varnames[1:code.co_argcount])


# -- plans -----------------------------------------------------------------------------------
_PLANS: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Plan | None]] = \
    weakref.WeakKeyDictionary()


@torch._dynamo.assume_constant_result
def _fusing() -> bool:
    """Whether dynamo traces for the tessera backend with the "moe" option on (at trace
    time: dynamo bakes the answer in)."""
    options = _tessera_options()
    return options is not None and bool(options.get("moe", True))


@torch._dynamo.assume_constant_result
def plan(block: torch.nn.Module, original: Callable[..., Any], ndim: int,
         dtype: torch.dtype) -> Plan | None:
    """The verified plan of `block` for inputs of this rank and dtype, or None. Runs at
    trace time (dynamo bakes the result in); None unless dynamo traces for the tessera
    backend with the "moe" option on, and None where autograd would need fused_moe's
    gradient (it has none: inference only)."""
    if not _fusing():
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
        return None
    return _cached(block, original, ndim, dtype, verify=not torch.compiler.is_exporting())


def _cached(block: torch.nn.Module, original: Callable[..., Any], ndim: int,
            dtype: torch.dtype, verify: bool) -> Plan | None:
    """The block's plan from the cache, verified first if it is not there and `verify`."""
    cache = _PLANS.setdefault(block, {})
    key = (original, ndim, dtype, tuple(map(id, block.modules())))  # children replaced: anew
    if key not in cache:
        if not verify:
            return None
        cache[key] = _verified(block, original, ndim, dtype)
    return cache[key]


_EXPORTING: list[dict[str, Any]] = []  # options of the tessera.compile exporting now


@contextlib.contextmanager
def exporting(model: torch.nn.Module, options: dict[str, Any] | None) -> Iterator[None]:
    """While torch.export traces `model` for tessera.compile (with these compiler
    options), its MoE blocks are traced as fused_moe as under the tessera backend. Their
    plans are found first, for 2-D and 3-D inputs of the router's dtype: the export traces
    with fake weights, which no probe can check."""
    options = dict(options or {})
    _EXPORTING.append(options)
    try:
        if options.get("moe", True):
            for block in model.modules():
                originals = _originals(type(block))
                plans = candidates(block) if originals else []
                for original, ndim in itertools.product(originals if plans else (), (2, 3)):
                    dtype = getattr(block, plans[0].router).weight.dtype
                    _cached(block, original, ndim, dtype, verify=True)
        yield
    finally:
        _EXPORTING.pop()


def _originals(cls: type) -> list[Callable[..., Any]]:
    """The forwards our dispatchers wrap along cls's MRO."""
    return [f.__wrapped__ for c in cls.__mro__
            if getattr(f := c.__dict__.get("forward"), "_tessera_moe", False)]


def _tessera_options() -> dict[str, Any] | None:
    """The options of the tessera backend dynamo is tracing for (or of the tessera.compile
    exporting), or None when tracing for anything else. The backend sits under
    torch.compile's wrappers (which keep the options; also under dynamo's
    ExplainWithBackend) in the compiling frame's output graph."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    from tessera.graph.backend import tessera
    if _EXPORTING and torch.compiler.is_exporting():
        return _EXPORTING[-1]
    try:
        fn = InstructionTranslator.current_tx().output.compiler_fn
    except AttributeError:  # not under dynamo (torch.export's non-strict tracing)
        return None
    options: dict[str, Any] = {}
    for _ in range(8):
        if fn is tessera:
            return options
        kwargs = getattr(fn, "kwargs", None) or getattr(fn, "keywords", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict):
            options = kwargs["options"]
        fn = next((w for a in ("compiler_fn", "backend", "func", "__wrapped__")
                   if (w := getattr(fn, a, None)) is not None), None)
    return None


def candidates(block: torch.nn.Module) -> list[Plan]:
    """Plans that fit the block's structure, most likely first (unverified)."""
    experts = getattr(block, "experts", None)
    if not isinstance(experts, torch.nn.Module):
        return []
    layouts = _stacked_layouts(experts) or _list_layouts(experts)
    if not layouts:
        return []
    e, h = layouts[0][0], layouts[0][1]
    routers = [(name, isinstance(m, torch.nn.Linear)) for name, m in block.named_children()
               if name != "experts" and _is_router(m, e, h)]
    owners = (block, getattr(block, "config", None), *(getattr(block, r) for r, _ in routers))
    tops = sorted({k for m in owners
                   for k in (getattr(m, n, None) for n in _TOP_K_NAMES)
                   if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= e})
    hint = next((v for m in owners if isinstance(v := getattr(m, "norm_topk_prob", None),
                                                 bool)), True)
    renorms = [hint, not hint]  # the probe decides; the block's own flag is tried first
    # a shared expert: any other child with parameters; its gate: a Linear(H, 1)
    others = [(n, m) for n, m in block.named_children()
              if n != "experts" and n not in dict(routers)]
    gates = [n for n, m in others if isinstance(m, torch.nn.Linear)
             and tuple(m.weight.shape) == (1, h)]
    shared = [n for n, m in others if n not in gates and next(m.parameters(), None) is not None]
    shares = [(n, g) for n in shared for g in (*gates, None)] + [(None, None)]
    return [Plan(r, called, "experts", stacked, names, transposed, k, renorm, s, g, False)
            for (_, _, stacked, names, transposed), (r, called), k, renorm, (s, g)
            in itertools.product(layouts, routers, tops, renorms, shares)]


def _is_router(m: torch.nn.Module, e: int, h: int) -> bool:
    if isinstance(m, torch.nn.Linear):
        return (m.out_features, m.in_features) == (e, h)
    params = dict(m.named_parameters())
    return set(params) == {"weight"} and tuple(params["weight"].shape) == (e, h)


Layout = tuple[int, int, bool, tuple[str, ...], bool]  # E, H, stacked, names, transposed


def _stacked_layouts(experts: torch.nn.Module) -> list[Layout]:
    """Stacked expert weights: gate_up_proj [E, 2I, H] + down_proj [E, H, I] (as nn.Linear
    stores them), or both transposed. Nothing else may hold parameters."""
    params = dict(experts.named_parameters())
    if set(params) != {"gate_up_proj", "down_proj"}:
        return []
    gu, dn = params["gate_up_proj"].shape, params["down_proj"].shape
    if len(gu) != 3 or len(dn) != 3 or gu[0] != dn[0]:
        return []
    found = []
    if gu[1] % 2 == 0 and tuple(dn[1:]) == (gu[2], gu[1] // 2):
        found.append((gu[0], gu[2], True, ("gate_up_proj", "down_proj"), False))
    if gu[2] % 2 == 0 and tuple(dn[1:]) == (gu[2] // 2, gu[1]):
        found.append((gu[0], gu[1], True, ("gate_up_proj", "down_proj"), True))
    return found


def _list_layouts(experts: torch.nn.Module) -> list[Layout]:
    """A list of expert MLPs, each three bias-free Linears (gate and up [I, H], down
    [H, I]) and nothing else with parameters; the same names in every expert. Which two
    are gate and up comes from their names where known, else every assignment is tried."""
    if not isinstance(experts, (torch.nn.ModuleList, torch.nn.Sequential)) or not len(experts):
        return []
    first = experts[0]
    linears = {n: m for n, m in first.named_children() if isinstance(m, torch.nn.Linear)}
    if len(linears) != 3 or len(dict(first.named_parameters())) != 3 or \
            any(m.bias is not None for m in linears.values()):
        return []
    found = []
    for gate, up, down in itertools.permutations(linears):
        g, u, d = (linears[n].weight.shape for n in (gate, up, down))
        if g != u or tuple(d) != (g[1], g[0]):
            continue
        named = gate in _GATE_NAMES and up in _UP_NAMES and down in _DOWN_NAMES
        found.append((named, (len(experts), g[1], False, (gate, up, down), False)))
    if any(named for named, _ in found):
        found = [f for f in found if f[0]]
    layouts = [layout for _, layout in found]
    same = all(_same_expert(first, ex) for ex in experts)
    return layouts if same else []


def _same_expert(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return type(a) is type(b) and [(n, p.shape) for n, p in a.named_parameters()] == \
        [(n, p.shape) for n, p in b.named_parameters()]


# -- the fused forward -----------------------------------------------------------------------
def fused_forward(block: torch.nn.Module, p: Plan, x: torch.Tensor,
                  moe: Callable[..., torch.Tensor] | None = None) -> Any:
    """The block's output computed by `p`: router logits, one fused_moe call (or `moe`, a
    function with its signature), the shared expert. Traced by dynamo, so torch only."""
    moe = moe or torch.ops.tessera.fused_moe
    rows = x.reshape(-1, x.shape[-1])
    router = getattr(block, p.router)
    logits = router(rows) if p.router_called else F.linear(rows, router.weight)
    w_gate_up, w_down = _weights(getattr(block, p.experts), p)
    out = moe(rows, logits, w_gate_up, w_down, p.top_k, p.renormalize)
    if p.shared is not None:
        shared = getattr(block, p.shared)(rows)
        if p.shared_gate is not None:
            shared = torch.sigmoid(getattr(block, p.shared_gate)(rows)) * shared
        out = out + shared
    out = out.view(x.shape)
    return (out, logits) if p.returns_logits else out


def _weights(experts: torch.nn.Module, p: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert weights as fused_moe takes them: [E, H, 2I] = [gate | up] and [E, I, H], as
    views of stacked parameters or stacked from per-expert Linears (constants the graph
    compiler folds)."""
    if p.stacked:
        gate_up, down = (getattr(experts, n) for n in p.names)
        return (gate_up, down) if p.transposed else (gate_up.transpose(1, 2),
                                                     down.transpose(1, 2))
    gate, up, down = p.names
    gate_up = torch.stack([torch.cat([getattr(e, gate).weight, getattr(e, up).weight])
                           for e in experts])
    down_w = torch.stack([getattr(e, down).weight for e in experts])
    return gate_up.transpose(1, 2), down_w.transpose(1, 2)


# -- verification ----------------------------------------------------------------------------
def _verified(block: torch.nn.Module, original: Callable[..., Any], ndim: int,
              dtype: torch.dtype) -> Plan | None:
    """The first candidate plan that reproduces `original` on a probe, or None."""
    plans = candidates(block)
    if not plans or ndim < 2 or not dtype.is_floating_point:
        return None
    from torch.utils._python_dispatch import _disable_current_modes

    from tessera.ops import registry
    reference = registry.get("fused_moe").reference
    h = getattr(block, plans[0].router).weight.shape[1]
    lead = (1,) * (ndim - 3) + ((2, _PROBE_TOKENS // 2) if ndim > 2 else (_PROBE_TOKENS,))
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn((*lead, h), generator=gen).to(dtype)
    with _disable_current_modes(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        buffers = {n: b.clone() for n, b in block.named_buffers()}
        try:
            want = original(block, probe)
        except Exception:  # a forward this probe does not fit: keep the block as written
            return None
        finally:
            changed = any(not torch.equal(b, buffers[n]) for n, b in block.named_buffers())
            for n, b in block.named_buffers():
                b.copy_(buffers[n])
        if changed:  # the forward keeps state (expert-load statistics, ...): not ours
            return None
        for p in plans:
            p = p._replace(returns_logits=isinstance(want, tuple))
            try:
                got = fused_forward(block, p, probe, reference)
            except Exception:  # e.g. a shared expert that does not take [T, H] rows
                continue
            if _close(got, want, dtype):
                return p
    return None


def _close(got: Any, want: Any, dtype: torch.dtype) -> bool:
    """Same structure, and every tensor within the dtype's tolerance of the largest
    magnitude of its counterpart."""
    if isinstance(want, (tuple, list)):
        return isinstance(got, tuple) and len(got) == len(want) and \
            all(_close(g, w, dtype) for g, w in zip(got, want, strict=True))
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or \
            got.shape != want.shape or not torch.isfinite(want).all():
        return False
    w, g = want.double(), got.double()
    scale = w.abs().max().item() if w.numel() else 0.0
    return bool(((g - w).abs() <= _TOLERANCE.get(dtype, 5e-2) * scale + 1e-12).all())


# -- graph pass ------------------------------------------------------------------------------
def fold_expert_weights(g: Graph) -> bool:
    """Compute at compile time the expert weights of fused_moe nodes that the graph
    derives from constants only (per-expert Linears stacked by `fused_forward`, transposed
    stacked parameters), instead of at every call; float weights end up as fused_moe reads
    them fastest, as nn.Linear stores them ([E, N, K] memory, passed as [E, K, N]). Whether
    anything changed (the nodes that built them are then dead)."""
    changed = False
    for n in g.nodes:
        if n.op != "fused_moe":
            continue
        for arg in ("w_gate_up", "w_down", "gate_up_scales", "down_scales"):
            v = n.args.get(arg)
            if isinstance(v, Value) and v.kind == "node" and _from_constants(v):
                data = _evaluate(g, v)
                if arg.startswith("w_") and data.is_floating_point() and \
                        not data.transpose(1, 2).is_contiguous():
                    data = data.transpose(1, 2).contiguous().transpose(1, 2)
                n.args[arg] = g.value(f"{v.name}_folded", v.dtype, v.shape, "const", data)
                changed = True
    return changed


def _from_constants(v: Value) -> bool:
    if v.kind == "const":
        return True
    return v.kind == "node" and v.producer is not None and \
        all(_from_constants(u) for u in v.producer.inputs())


# transposes as torch views (the registry's ops copy): a transposed parameter stays a view
_VIEWS: dict[str, Callable[[dict[str, Any]], torch.Tensor]] = {
    "transpose": lambda a: a["x"].transpose(a["dim0"], a["dim1"]),
    "permute": lambda a: a["x"].permute(a["dims"]),
}


def _evaluate(g: Graph, v: Value) -> torch.Tensor:
    """v's tensor, running the nodes it depends on (all fed by constants)."""
    needed: set[Value] = set()
    todo = [v]
    while todo:
        u = todo.pop()
        if u.kind == "node" and u not in needed:
            needed.add(u)
            todo.extend(u.producer.inputs())  # type: ignore[union-attr]
    env: dict[Value, Any] = {c: c.data for c in g.constants}
    for n in g.nodes:
        if any(o in needed for o in n.outputs):
            call_node(n, env, _VIEWS.get(n.op) or node_function(n))
    return env[v]


_scan()
torch.nn.modules.module.register_module_module_registration_hook(_on_register)
