"""A Hugging Face ``transformers`` model cut at a layer: one small adapter per family.

    client, server = cut_transformer(model, 2)   # embeddings + layers 0-1 | layers 2.. + head

The model becomes stages ``embeddings, layer_0, …, layer_{n-1}, head`` (``stages``); the client
holds the embeddings and the first k layers. Every stage passes on ``[h | m]`` (``language``):
the hidden states with the padding mask as one extra feature; a stage that needs positions
derives them from the mask (right padding: a token's position is the number of tokens before
it), so nothing else crosses the cut, and λ is zero on the mask by construction.

Families: BERT, RoBERTa, DistilBERT (encoders; sequence classification), GPT-2, OPT and the
LLaMA layout (rotary positions, ``model.layers``; LLaMA, Mistral, Qwen2) as decoders with a
sequence-classification (last token) or a causal-LM head (an output embedding tied to the
input one is untied: each side trains its own). Another family is refused by name,
with the ``ModelTask(client=, server=)`` way out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from hosfl.tasks.language import Layer, _bias, _with_mask, bert_stages, opt_stages, positions


class TokenEmbed(nn.Module):
    """``embed(ids)`` (and learned positions counted from the mask, where the family has them)
    with the padding mask appended."""

    def __init__(self, tokens: nn.Module, pad_id: int, positions: nn.Module | None = None,
                 drop: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.tokens, self.positions, self.drop, self.pad_id = tokens, positions, drop, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        h = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(positions(mask))
        if self.drop is not None:
            h = self.drop(h)
        return _with_mask(h, mask.unsqueeze(-1))


class Embeddings(nn.Module):
    """A family's own embeddings module called on the ids (BERT, RoBERTa, DistilBERT)."""

    def __init__(self, embeddings: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.embeddings, self.pad_id = embeddings, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _with_mask(self.embeddings(input_ids=ids), (ids != self.pad_id).unsqueeze(-1))


class RotaryLayer(nn.Module):
    """A LLaMA-layout decoder layer on ``[h | m]``, its rotary angles from the mask."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        h, mask = hm[..., :-1], hm[..., -1:]
        position_ids = positions(mask.detach().squeeze(-1).long())
        out = self.layer(h, attention_mask=_bias(mask, causal=True), position_ids=position_ids,
                         position_embeddings=self.rotary(h, position_ids))  # fmt: skip
        return _with_mask(out[0] if isinstance(out, tuple) else out, mask)


class Head(nn.Module):
    """A final norm (if any), then ``score`` on the first token (encoders), on the last token
    (decoders' sequence classification), or on every token (a causal-LM head)."""

    def __init__(self, norm: nn.Module | None, score: nn.Module, token: str) -> None:
        super().__init__()
        self.norm, self.score, self.token = norm, score, token

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        h, mask = hm[..., :-1], hm[..., -1]
        if self.norm is not None:
            h = self.norm(h)
        if self.token == "all":
            return self.score(h)
        if self.token == "first":
            return self.score(h[:, 0])
        last = (mask.detach().sum(1).long() - 1).clamp(min=0)
        return self.score(h[torch.arange(len(h), device=h.device), last])


def _pad(model: nn.Module) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else int(pad)


def _decoder_head(model: nn.Module, norm: nn.Module | None) -> tuple[str, Head]:
    if hasattr(model, "score"):
        return "head", Head(norm, model.score, "last")
    if hasattr(model, "lm_head"):
        return "head", Head(norm, model.lm_head, "all")
    raise ValueError(f"{type(model).__name__}: a sequence-classification or causal-LM model")


def _sequential(embed: nn.Module, layers: list[nn.Module], head: tuple[str, nn.Module]):
    stages = [("embeddings", embed), *((f"layer_{i}", m) for i, m in enumerate(layers)), head]
    return nn.Sequential(OrderedDict(stages))


def _renamed(whole: nn.Sequential, prefix: str) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        (name.replace("layer_", f"{prefix}_", 1), m) for name, m in whole.named_children()))


def _language(build: Callable[[nn.Module], nn.Sequential], head: str, family: str):
    """The adapter of a family whose stages ``tasks.language`` already builds (BERT, OPT)."""

    def adapter(model: nn.Module) -> nn.Sequential:
        if not hasattr(model, head):
            raise ValueError(f"{type(model).__name__}: {family} cuts a sequence classifier")
        stages = build(model)
        return _sequential(stages[0], list(stages)[1:-1], ("head", stages[-1]))

    return adapter


def _roberta(model: nn.Module) -> nn.Sequential:
    base = model.roberta
    layers = [Layer(m, causal=False) for m in base.encoder.layer]
    # RobertaClassificationHead reads the first token of the whole sequence itself
    head = Head(None, _FirstOfSequence(model.classifier), "first")
    return _sequential(Embeddings(base.embeddings, _pad(model)), layers, ("head", head))


class _FirstOfSequence(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.head(first[:, None])


def _distilbert(model: nn.Module) -> nn.Sequential:
    base = model.distilbert
    layers = [Layer(m, causal=False) for m in base.transformer.layer]
    score = nn.Sequential(model.pre_classifier, nn.ReLU(), model.dropout, model.classifier)
    return _sequential(Embeddings(base.embeddings, _pad(model)), layers,
                       ("head", Head(None, score, "first")))  # fmt: skip


def _gpt2(model: nn.Module) -> nn.Sequential:
    base = model.transformer
    embed = TokenEmbed(base.wte, _pad(model), base.wpe, base.drop)
    return _sequential(embed, [Layer(m, causal=True) for m in base.h],
                       _decoder_head(model, base.ln_f))  # fmt: skip


def _llama(model: nn.Module) -> nn.Sequential:
    base = model.model
    layers = [RotaryLayer(m, base.rotary_emb) for m in base.layers]
    return _sequential(TokenEmbed(base.embed_tokens, _pad(model)), layers,
                       _decoder_head(model, base.norm))  # fmt: skip


FAMILIES: dict[str, Callable[[nn.Module], nn.Sequential]] = {
    "bert": _language(bert_stages, "classifier", "BERT"),
    "roberta": _roberta,
    "distilbert": _distilbert,
    "gpt2": _gpt2,
    "opt": _language(opt_stages, "score", "OPT"),
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
}


def family(model: nn.Module) -> str | None:
    """The ``transformers`` model type of ``model`` (None for any other module)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    return kind if isinstance(kind, str) and hasattr(config, "to_dict") else None


def stages(model: nn.Module, prefix: str = "layer") -> nn.Sequential:
    """``model`` (a ``transformers`` model of a family in ``FAMILIES``) as the stages
    ``embeddings, layer_0, …, head`` (``prefix`` names the layers: the built-in MiniLM task's
    are ``encoder_K``), sharing its modules (no copy)."""
    family_ = family(model)
    if family_ not in FAMILIES:
        raise ValueError(
            f"hosfl cuts transformers models of the families {', '.join(FAMILIES)}, not "
            f"{family_ or type(model).__name__!r}: give ModelTask(client=..., server=...) the two "
            "parts as modules, with the attention mask carried as an extra feature as "
            "hosfl.tasks.language does"
        )
    _untie(model)
    whole = FAMILIES[family_](model)
    return whole if prefix == "layer" else _renamed(whole, prefix)


def _untie(model: nn.Module) -> None:
    """An output embedding tied to the input one (GPT-2's, small LLaMAs') gets its own copy:
    the client trains the input table, the server the output one, and nothing is shared across
    the cut (``config.tie_word_embeddings`` is cleared, so an export keeps both)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        out.weight = nn.Parameter(inp.weight.detach().clone())
        model.config.tie_word_embeddings = False


def cut_transformer(model: nn.Module, layer: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(client, server): the embeddings and the first ``layer`` layers, and the rest with the
    head (``layer=0``: the client holds the embeddings only)."""
    whole = stages(model)
    n = len(whole) - 2
    if not 0 <= layer <= n:
        raise ValueError(f"layer={layer}: {model.config.model_type} has layers 0..{n}")
    client, server = whole[: layer + 1], whole[layer + 1 :]
    shared = {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}
    if shared:
        raise ValueError(f"layer={layer}: {len(shared)} parameter(s) are used on both sides")
    return client, server


def cut_at(model: nn.Module, cut: int | str) -> tuple[nn.Sequential, nn.Sequential]:
    """``cut_transformer`` by a layer count, ``"embeddings"``, ``"layer.K"`` (the client holds
    layers 0..K), or the name of a module of ``model`` that is a stage's whole: the embeddings
    or one layer (``"bert.encoder.layer.1"``, as in ``model.named_modules()``)."""
    if isinstance(cut, int):
        return cut_transformer(model, cut)
    whole = stages(model)
    if cut == "embeddings":
        return cut_transformer(model, 0)
    if cut.startswith(("layer.", "layer_")) and cut[6:].isdigit():
        return cut_transformer(model, int(cut[6:]) + 1)
    named = dict(model.named_modules())
    if cut not in named:
        raise ValueError(
            f"cut={cut!r}: not a module of {type(model).__name__}; give a layer count, "
            f"'embeddings', 'layer.K' (K of 0..{len(whole) - 3}) or a layer's module name"
        )
    target = named[cut]
    for k, stage in enumerate(whole):
        if any(m is target for m in stage.modules()):
            if k == len(whole) - 1:
                raise ValueError(f"cut={cut!r} is in the head: the server keeps the head")
            inner = getattr(stage, "layer", None)
            if k > 0 and target is not inner:
                raise ValueError(f"cut={cut!r} is inside a layer: cut at the whole layer")
            return cut_transformer(model, k)
    raise ValueError(f"cut={cut!r}: {cut} is not used by the model's forward")
