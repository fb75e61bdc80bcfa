"""The pretrained tasks: real MiniLM and EfficientNet-Lite0 weights on real data; the paper's
OPT-125M and ResNet-18 tasks on tiny random models of the same architecture (no internet)."""

import io
import json
import tarfile

import numpy as np
import peft
import pytest
import torch
import transformers

import hosfl
from hosfl import adapt, tasks
from hosfl.config import Config, ConfigError
from hosfl.data import partition, sentences
from hosfl.data.fashion_mnist import DataError
from hosfl.packages import MissingPackage
from hosfl.runner import run
from hosfl.tasks.language import bert_stages, opt_stages
from hosfl.tasks.vision import Cifar10ResNet18, GreyToRGB, resnet18, torchvision_keys


def test_the_vendored_sentences_split_into_balanced_disjoint_train_and_test():
    train, y, src = sentences.load("train")
    test, y_test, src_test = sentences.load("test")
    assert (len(train), len(test)) == (2400, 600)
    assert y.sum() == 1200 and y_test.sum() == 300
    assert np.bincount(src).tolist() == [800] * 3 and np.bincount(src_test).tolist() == [200] * 3
    assert all(t and isinstance(t, str) for t in train)
    assert len(set(test) - set(train)) > 590  # a handful of sentences occur in two sources


def test_minilm_cut_into_stages_computes_what_the_whole_pretrained_model_does():
    task = tasks.get("sentiment-minilm")
    model = task.pretrained(seed=0).eval()
    ids, _ = task.load("test", 8)
    assert (ids == 0).any(), "some padding, so the mask matters"
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        staged = bert_stages(model)(ids)
    torch.testing.assert_close(staged, whole, rtol=0, atol=1e-5)


def test_opt_stages_compute_what_hf_opt_does_with_right_padding():
    config = transformers.OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=40, word_embed_proj_dim=32, num_labels=2, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.OPTForSequenceClassification(config).eval()
    ids = torch.randint(2, 100, (4, 12))
    ids[1, 7:] = 1  # right padding
    ids[3, 3:] = 1
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=(ids != 1).long()).logits
        staged = opt_stages(model)(ids)
    torch.testing.assert_close(staged, whole, rtol=0, atol=1e-5)
    names = [n for n, _ in opt_stages(model).named_children()]
    assert names == ["embeddings", "decoder_0", "decoder_1", "decoder_2", "head"]
    client = opt_stages(model)[:2]
    adapt.freeze(client, tasks.get("sst2-opt125m").defaults["freeze"])
    frozen = [n for n, p in client.named_parameters() if not p.requires_grad]
    assert frozen == ["embeddings.embed_tokens.weight"]


def test_the_server_sends_no_gradient_for_the_padding_mask():
    client, server = tasks.get("sentiment-minilm").split_model("encoder.0", 0)
    ids, y = tasks.get("sentiment-minilm").load("train", 4)
    with torch.no_grad():
        z = client(ids)
    assert set(z[..., -1].unique().tolist()) == {0.0, 1.0}
    z.requires_grad_(True)
    torch.nn.functional.cross_entropy(server(z), y).backward()
    assert (z.grad[..., -1] == 0).all() and z.grad[..., :-1].abs().sum() > 0


def test_effnet_stages_equal_the_library_model_and_cut_as_named():
    task = tasks.get("fmnist-effnet")
    x, _ = task.load("test", 4)
    net = task.pretrained(0).eval()
    with torch.no_grad():
        torch.testing.assert_close(task.build(0).eval()(x), net(GreyToRGB(64)(x)), rtol=0, atol=0)
    client, server = task.split_model("blocks.7", 0)
    assert list(dict(client.named_children()))[-1] == "blocks_7"
    assert list(dict(server.named_children()))[0] == "blocks_8"
    _, head = task.split_model("conv_head", 0)
    assert list(dict(head.named_children())) == ["head"]


def test_an_unknown_cut_lists_the_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"encoder\.9.*valid: embeddings, encoder\.0"):
        run(Config.load(None, ["task=sentiment-minilm", "cut=encoder.9", f"out={tmp_path}"]))


def test_bfloat16_client_forwards_are_for_hosfl_only():
    from hosfl.methods import METHODS

    with pytest.raises(ConfigError, match="sfl-v1 does not use client_dtype"):
        METHODS["sfl-v1"].check(Config.load(None, ["method=sfl-v1", "client_dtype=bfloat16"]))


def test_task_defaults_apply_under_the_users_settings():
    assert Config.load(None, ["task=sentiment-minilm"]).cut == "encoder.3"
    assert Config.load(None, ["task=sentiment-minilm", "cut=encoder.4"]).cut == "encoder.4"
    assert Config.load(None, []).cut == "conv2"


def test_by_source_gives_each_client_one_source():
    _, _, src = sentences.load("train")
    parts = partition.split("by-source", np.zeros(len(src), int), 7, 0, 0.5, 2, src)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(src)))
    assert [set(src[p].tolist()) for p in parts] == [{k % 3} for k in range(7)]
    with pytest.raises(ValueError, match="clients >= 3"):
        partition.split("by-source", np.zeros(len(src), int), 2, 0, 0.5, 2, src)
    with pytest.raises(ValueError, match="no sources"):
        partition.split("by-source", np.zeros(10, int), 2, 0, 0.5, 2)


def test_resnet18_takes_torchvisions_checkpoint_keys():
    ours = resnet18(10).state_dict()
    # torchvision's names for a few of its 122 ResNet-18 tensors
    names = ["conv1.weight", "bn1.running_var", "layer1.0.conv2.weight",
             "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "fc.weight"]  # fmt: skip
    mapped = torchvision_keys({n: torch.zeros(1) for n in names})
    assert set(mapped) <= set(ours) and len(mapped) == len(names) - 1  # fc is replaced
    model = resnet18(10).eval()
    client, server = model[:3], model[3:]  # the paper's cut, after layer2
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        z = client(x)
        assert z.shape == (2, 128, 4, 4)
        torch.testing.assert_close(server(z), model(x), rtol=0, atol=0)


def test_offline_paper_tasks_fail_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSFL_DATA", str(tmp_path))
    task = Cifar10ResNet18()
    monkeypatch.setattr(task, "weights_url", (tmp_path / "none.pth").as_uri())
    monkeypatch.setattr(task, "data_url", (tmp_path / "none.tar.gz").as_uri())
    with pytest.raises(DataError, match="cannot download .*none.pth"):
        task.build(0)
    with pytest.raises(DataError, match="cannot download .*none.tar.gz"):
        task.load("train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="sst2-opt125m: cannot load facebook/opt-125m"):
        tasks.get("sst2-opt125m").build(0)
    with pytest.raises((DataError, MissingPackage), match="rte-opt125m|datasets"):
        tasks.get("rte-opt125m").load("train")


def test_cifar10_reads_the_binary_archive_without_unpickling(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSFL_DATA", str(tmp_path))
    rows = np.random.default_rng(0).integers(0, 256, (3, 3073), dtype=np.uint8)
    rows[:, 0] = [3, 0, 9]
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name in ["test_batch.bin", *(f"data_batch_{i}.bin" for i in range(1, 6))]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = rows.nbytes
            tar.addfile(info, io.BytesIO(rows.tobytes()))
    x, y = Cifar10ResNet18().load("test")
    assert y.tolist() == [3, 0, 9] and x.shape == (3, 3, 32, 32)
    pixel = (rows[1, 1 + 32 * 32 * 2 + 5] / 255 - 0.4465) / 0.2616  # blue, row 0, column 5
    assert x[1, 2, 0, 5].item() == pytest.approx(pixel, rel=1e-5)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="not the CIFAR-10 binary archive"):
        Cifar10ResNet18().load("test")


def _minilm(tmp_path, *extra):
    return Config.load(None, ["task=sentiment-minilm", "clients=3", "sampled=2", "steps=2",
                              "train_subset=300", "test_subset=32", "eval_every=0", "cut=encoder.1",
                              "progress=false", f"out={tmp_path}", *extra])  # fmt: skip


def test_lora_on_the_client_trains_only_the_adapters_and_d_c_counts_them(tmp_path):
    cfg = _minilm(tmp_path / "lora", "lora=client", "lora_rank=4", "client_lr=0.5")
    result = run(cfg, log=lambda *a: None)
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    client = result.client_model
    adapters = {n: p for n, p in client.named_parameters() if "lora_" in n}
    # rank 4 on query and value of 2 layers (384 -> 384): 2 · 2 · (4·384 + 384·4)
    assert summary["d_c"] == sum(p.numel() for p in adapters.values()) == 2 * 2 * 2 * 4 * 384
    fresh, _ = tasks.get("sentiment-minilm").split_model("encoder.1", cfg.seed)
    base = dict(fresh.named_parameters())
    for name, p in client.named_parameters():
        if "lora_" not in name:  # peft keeps the base weight under base_layer
            torch.testing.assert_close(p, base[name.replace(".base_layer", "")], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    # exported with the adapters kept apart: the merged model's outputs, from the saved folders
    kept = hosfl.export(result.out, tmp_path / "kept", merge=False)
    again = peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(kept), kept / "lora")
    ids = tasks.get("sentiment-minilm").load("test", 4)[0]
    mask = (ids != 0).long()
    with torch.no_grad():
        want = hosfl.load(result.out)(input_ids=ids, attention_mask=mask).logits
        got = again.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_frozen_word_embeddings_are_not_in_d_c_and_do_not_move(tmp_path):
    result = run(_minilm(tmp_path / "full", "client_lr=0.01"), log=lambda *a: None)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    fresh, _ = tasks.get("sentiment-minilm").split_model("encoder.1", 0)
    word = "embeddings.embeddings.word_embeddings.weight"
    torch.testing.assert_close(
        dict(result.client_model.named_parameters())[word], dict(fresh.named_parameters())[word],
        rtol=0, atol=0,
    )  # fmt: skip
    total = sum(p.numel() for p in fresh.parameters())
    assert summary["d_c"] == total - 30522 * 384
    assert summary["client_lr"] == pytest.approx(50 * 2 / summary["d_c"])  # zo_lr_rule
    assert summary["client_peak_bytes"] <= 1.2 * summary["client_inference_peak_bytes"]


def test_the_zeroth_order_rate_is_c_p_over_d_under_both_caps():
    from hosfl.methods.replica import zo_lr

    cfg = Config.from_dict({"zo_lr_rule": "dimension", "P": 5})  # c = 50, no zo_lr_max
    assert zo_lr(cfg, 10_000, 0.05) == pytest.approx(50 * 5 / 10_000)
    assert zo_lr(cfg, 100, 0.05) == 0.05  # never above the first-order rate
    capped = Config.from_dict({"zo_lr_rule": "dimension", "P": 5, "zo_lr_max": 3e-4})
    assert zo_lr(capped, 10_000, 0.05) == 3e-4
    assert zo_lr(capped, 10_000_000, 0.05) == pytest.approx(50 * 5 / 10_000_000)
    assert zo_lr(Config.from_dict({"P": 5, "zo_lr_max": 3e-4}), 10_000, 0.05) == 0.05  # fixed
    with pytest.raises(ConfigError, match="zo_lr_max"):
        Config.from_dict({"zo_lr_max": -1.0}).validate()


def test_a_hosfl_client_with_a_large_cut_layer_stays_near_inference_memory(tmp_path):
    """EfficientNet's stem: 928 weights but a 32×32×32 output per image. The probe scalars
    λᵀf are taken slice by slice; float64 copies of whole tensors made this 2.5×."""
    cfg = Config.load(None, ["task=fmnist-effnet", "cut=stem", "steps=2", "eval_every=0",
                             "train_subset=640", "test_subset=64", "progress=false",
                             f"out={tmp_path}"])  # fmt: skip
    run(cfg, log=lambda *a: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["client_peak_bytes"] <= 1.2 * summary["client_inference_peak_bytes"]
