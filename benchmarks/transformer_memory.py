"""Client memory of a transformer cut by layer, per family: the client's peak over one step
against the inference-only peak of the same client part, for HO-SFL (forward passes only)
and SplitFed V1 (backprop), on small models built from configs (random weights, no download:
hidden 128, 4 layers, the client holding the embeddings and 2 layers; batch 16, 64 tokens).

    OMP_NUM_THREADS=1 python benchmarks/transformer_memory.py
"""

from __future__ import annotations

import tempfile

import torch
import transformers as tf

import hosfl

H = dict(vocab_size=1000, num_labels=2)
BERTISH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
LLAMA = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)  # fmt: skip
MODELS = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**H, **BERTISH)),
    "roberta": lambda: tf.RobertaForSequenceClassification(
        tf.RobertaConfig(**H, **BERTISH, pad_token_id=1, max_position_embeddings=80)),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        **H, dim=128, n_layers=4, n_heads=4, hidden_dim=512, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2ForSequenceClassification(
        tf.GPT2Config(**H, n_embd=128, n_layer=4, n_head=4, pad_token_id=0)),
    "opt": lambda: tf.OPTForSequenceClassification(tf.OPTConfig(
        **H, hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
        pad_token_id=1, word_embed_proj_dim=128)),
    "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(**H, **LLAMA)),
}  # fmt: skip


def data(n: int, seed: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids, 48 real and 16 of padding each, with random labels (memory only)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1000, (n, 64), generator=g)
    ids[:, 48:] = pad
    return ids, torch.randint(0, 2, (n,), generator=g)


def main() -> None:
    torch.set_num_threads(1)
    print("command: OMP_NUM_THREADS=1 python benchmarks/transformer_memory.py\n")
    print("| family | client parameters | HO-SFL peak ÷ inference | SplitFed V1 peak ÷ inference "
          "| SplitFed V1 peak ÷ HO-SFL's |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family, make in MODELS.items():
            torch.manual_seed(0)
            model = make()
            pad = model.config.pad_token_id or 0
            train, test = data(256, 0, pad), data(64, 1, pad)
            hosfl.register_task(hosfl.ModelTask(model, cut=2, train=train, test=test,
                                                name=f"mem-{family}"))  # fmt: skip
            peaks = {}
            for method in ("hosfl", "sfl-v1"):
                cfg = hosfl.Config(task=f"mem-{family}", method=method, clients=2, sampled=1,
                                   batch_size=16, steps=3, eval_every=0, progress=False,
                                   out=f"{tmp}/{family}-{method}")  # fmt: skip
                s = hosfl.run(cfg, log=lambda *a: None).summary
                peaks[method] = (s["client_peak_bytes"], s["client_inference_peak_bytes"], s["d_c"])
            (h, inf, d_c), (f, _, _) = peaks["hosfl"], peaks["sfl-v1"]
            print(f"| {family} | {d_c:,} | {h / inf:.2f} | {f / inf:.2f} | {f / h:.2f} |")


if __name__ == "__main__":
    main()
