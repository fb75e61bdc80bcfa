"""Cut a model in two at a module, by name: the client part runs the model up to and
including that module, the server part runs the rest from its output.

An ``nn.Sequential`` is cut between its children. Any other model is traced with torch.fx,
the named module kept whole as one call; the client graph is every operation before it and
the call itself, the server graph every operation after it, reading the module's output as
its one input. The cut is valid only where that output is the one value that crosses: a
skip connection around the cut, or an input the server part reads again (an attention mask),
cannot be expressed by one smashed-data tensor and is refused with the names involved. Both
parts hold the original submodules (the same parameters, no copy); a parameter used on both
sides is refused too.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import fx, nn


class _KeepWhole(fx.Tracer):
    """Traces ``cut`` as one call instead of stepping into it."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.cut = cut

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.cut or super().is_leaf_module(m, qualname)


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def split(model: nn.Module, cut: str) -> tuple[nn.Module, nn.Module]:
    """(client, server) with server(client(x)) == model(x); ValueError if ``cut`` is not a
    module of ``model`` or not a place where one tensor crosses."""
    names = module_names(model)
    if cut not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"cut={cut!r} is not a module of {type(model).__name__} ({shown})")
    if isinstance(model, nn.Sequential) and cut in dict(model.named_children()):
        stages = list(model.named_children())
        at = [n for n, _ in stages].index(cut) + 1
        client, server = (
            nn.Sequential(OrderedDict(stages[:at])),
            nn.Sequential(OrderedDict(stages[at:])),
        )
    else:
        client, server = _split_graph(model, cut)
    shared = {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}
    if shared:
        raise ValueError(f"cut={cut!r}: {len(shared)} parameter(s) are used on both sides")
    return client, server


def _said(node: fx.Node) -> str:
    """A value that crosses a cut, in the user's words."""
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "call_module":
        return f"the output of {node.target!r} (a skip connection around the cut)"
    inputs, seen, todo = set(), set(), [node]
    while todo:  # which of the model's inputs the value is computed from
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            inputs.add(repr(n.target))
        todo += [a for a in n.all_input_nodes]
    source = f" from the input {', '.join(sorted(inputs))}" if inputs else ""
    return (f"the value {node.name!r} computed{source} (a skip connection around the cut, or "
            "a mask or positions derived from an input)")  # fmt: skip


def _split_graph(model: nn.Module, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    try:
        graph = _KeepWhole(cut).trace(model)
    except Exception as e:  # fx raises many kinds for code it cannot trace
        raise ValueError(
            f"cut={cut!r}: {type(model).__name__} cannot be traced by torch.fx ({e}); pass the "
            "client and server modules yourself"
        ) from None
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == cut]
    if len(calls) != 1:
        raise ValueError(f"cut={cut!r}: the module is called {len(calls)} times in forward")
    at = nodes.index(calls[0]) + 1
    after = set(nodes[at:])
    crossing = [n for n in nodes[:at] if any(u in after for u in n.users)]
    if crossing != [calls[0]]:
        others = "; ".join(_said(n) for n in crossing if n is not calls[0])
        raise ValueError(
            f"cut={cut!r}: the rest of the model also reads {others} from before the cut. "
            "Choose a cut that only its output crosses, or give ModelTask client= and server= "
            "modules that pass the extra value on as a feature (as hosfl.tasks.language does "
            "with an attention mask); a transformers model is cut by layer: cut=K"
        )
    client_graph, env = fx.Graph(), {}
    for n in nodes[:at]:
        env[n] = client_graph.node_copy(n, lambda a: env[a])
    client_graph.output(env[calls[0]])
    server_graph = fx.Graph()
    env = {calls[0]: server_graph.placeholder("z")}
    for n in nodes[at:]:
        env[n] = server_graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(model, client_graph), fx.GraphModule(model, server_graph)
