"""What a HO-SFL client step costs against its floor of P+1 inference forwards.

For each client part (the default CNN, EfficientNet-Lite0's stem and first blocks, MiniLM's
embeddings and first layers, an OPT-125M-shaped client: embeddings plus 3 decoder layers, and
a ResNet-18 client through layer2, both with random weights), in one run: one inference
forward, one first-order forward+backward, and one HO-SFL client step (forward, λᵀz, P probes,
the update) done three ways:

- naive: MeZO-style, θ += μu in place, forward, θ −= μu (u regenerated), per parameter;
- hosfl: the library's verbs (``zo.perturbed`` swaps θ + μu in per module, never writing θ):
  P + P direction regenerations a step against the naive loop's 2P + P, so on a device where
  the forwards dominate naive ÷ hosfl stays below 1.5 whatever the generator costs;
- hosfl_rademacher: the same verbs with ``directions=rademacher``, ±1 directions computed on
  the parameters' own device from a counter hash (no CPU generator, no host-to-device copy);
- hosfl_jvp: ``estimator=jvp``, each probe scalar λᵀ(μ·J_c u) from one forward-mode pass
  (``zo.jvp``), Rademacher directions: P passes instead of P + 1 forwards.

Times are the median of ``--repeat`` runs after one warm-up; peaks from the live-tensor meter
(weights included). Prints a table with ratios to the inference forward and writes JSON.

    python benchmarks/client_step.py                     # CPU, all five parts
    python benchmarks/client_step.py --device cuda --parts opt,resnet18 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hosfl import tasks, zo
from hosfl.config import Config
from hosfl.metrics.memory import LiveTensorMeter, tensor_bytes


def _opt_client(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import transformers

    from hosfl.adapt import freeze
    from hosfl.tasks.language import _no_dropout, opt_stages

    config = transformers.OPTConfig(num_labels=2, pad_token_id=1)  # OPT-125M's shape
    _no_dropout(config)
    torch.manual_seed(0)
    client = opt_stages(transformers.OPTForSequenceClassification(config))[:4]
    freeze(client, "embed_tokens")  # as sst2-opt125m does
    return client, torch.randint(2, config.vocab_size, (32, 128))


def _resnet18_client(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from hosfl.tasks.vision import resnet18

    torch.manual_seed(0)
    client = resnet18(10)[:3]  # stem, layer1, layer2: cifar10-resnet18's default cut
    return client, torch.randn(64, 3, 32, 32)


def _task_client(task: str, batch: int, seq_len: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = Config.load(None, [f"task={task}", f"seq_len={seq_len}"])
    t, client, _ = tasks.prepare(cfg)
    x, _ = t.load("train", batch)
    return client, x


PARTS = {
    "cnn": lambda d: _task_client("fmnist-cnn", 64),
    "effnet": lambda d: _task_client("fmnist-effnet", 64),
    "minilm": lambda d: _task_client("sentiment-minilm", 32, 128),
    "opt": _opt_client,
    "resnet18": _resnet18_client,
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(fn, model: torch.nn.Module, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    meter = LiveTensorMeter()
    with meter:
        fn()
    return tensor_bytes(model) + meter.peak


def measure(name: str, device: str, P: int, repeat: int, part=None) -> dict:
    """``part``: a (client model, input batch) to measure instead of ``PARTS[name]``'s."""
    model, x = part or PARTS[name](device)
    model, x = model.to(device).eval(), x.to(device)
    params = zo.trainable(model)
    mu, lr = 1e-3, 1e-6
    with torch.no_grad():
        lam = torch.randn_like(model(x))
    seeds = list(range(1, P + 1))
    opt = torch.optim.SGD(params, lr=lr)

    @torch.no_grad()
    def inference() -> None:
        model(x)

    def first_order() -> None:
        model.zero_grad(set_to_none=True)
        (model(x) * lam).sum().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def naive() -> None:
        base = zo.project(lam, model(x))
        values = []
        for s in seeds:
            for i, p in enumerate(params):
                p.add_(zo.direction(s, i, p), alpha=mu)
            values.append(zo.project(lam, model(x)) - base)
            for i, p in enumerate(params):
                p.sub_(zo.direction(s, i, p), alpha=mu)
        for i, p in enumerate(params):
            for s, v in zip(seeds, values, strict=True):
                p.add_(zo.direction(s, i, p), alpha=-lr * v / (P * mu))

    def hosfl(kind: str):
        @torch.no_grad()
        def step() -> None:
            base = zo.project(lam, model(x))
            values = []
            for s in seeds:
                with zo.perturbed(model, s, mu, kind):
                    values.append(zo.estimate(lam, model(x), base))
            zo.apply_update_(params, seeds, values, mu, opt, kind)

        return step

    @torch.no_grad()
    def hosfl_jvp() -> None:  # estimator=jvp: P forward-mode passes, no base forward
        values = [zo.project(lam, zo.jvp(model, x, s, mu, "rademacher")) for s in seeds]
        zo.apply_update_(params, seeds, values, mu, opt, "rademacher")

    row = {"part": name, "device": device, "P": P, "d_c": sum(p.numel() for p in params),
           "input": list(x.shape)}  # fmt: skip
    variants = {"inference": inference, "first_order": first_order, "naive": naive,
                "hosfl": hosfl("gaussian"), "hosfl_rademacher": hosfl("rademacher"),
                "hosfl_jvp": hosfl_jvp}  # fmt: skip
    for key, fn in variants.items():
        row[f"{key}_s"] = _timed(fn, device, repeat)
        row[f"{key}_peak_bytes"] = _peak(fn, model, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--P", type=int, default=0, help="probes (0: 2 for text, 5 for vision)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for name in args.parts.split(","):
        P = args.P or (2 if name in ("minilm", "opt") else 5)
        rows.append(measure(name, args.device, P, args.repeat))
        r = rows[-1]
        times = [f"{k[:-2]} {v * 1e3:.0f} ms" for k, v in r.items() if k.endswith("_s")]
        print(f"{name}: " + ", ".join(times), flush=True)
    print("\n| part | d_c | P | input | F+B / F | naive / F | hosfl / F | floor (P+1) "
          "| naive / hosfl | hosfl rademacher / F | jvp / F | hosfl peak / inference peak "
          "| jvp peak / inference peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["inference_s"]
        print(f"| {r['part']} | {r['d_c']:,} | {r['P']} | {'×'.join(map(str, r['input']))} "
              f"| {r['first_order_s'] / f:.2f} | {r['naive_s'] / f:.2f} | {r['hosfl_s'] / f:.2f} "
              f"| {r['P'] + 1} | {r['naive_s'] / r['hosfl_s']:.2f} "
              f"| {r['hosfl_rademacher_s'] / f:.2f} | {r['hosfl_jvp_s'] / f:.2f} "
              f"| {r['hosfl_peak_bytes'] / r['inference_peak_bytes']:.2f} "
              f"| {r['hosfl_jvp_peak_bytes'] / r['inference_peak_bytes']:.2f} |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"client_step-{args.device}.json").write_text(json.dumps(rows, indent=1))
    print(f"\ncommand: python benchmarks/client_step.py --device {args.device} "
          f"--parts {args.parts} --repeat {args.repeat}")  # fmt: skip


if __name__ == "__main__":
    main()
