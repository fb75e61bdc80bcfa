"""The paper-scale workloads on one device (issue 13's GPU table), in one script.

Two shapes with random weights and random inputs in the real layout (speed and memory do not
depend on the values):
- ``resnet18``: ResNet-18 for CIFAR-10, client stem–layer2, 3×32×32, B=64, P=5;
- ``opt``: OPT-125M, client embeddings + 3 decoder layers (token table frozen), T=128, B=32,
  P=2.

For each shape, at M=100, K=10 (in-process, batched simulation where ``auto`` picks it):
steps per second of ``hosfl``, ``sfl-v1`` and ``frozen`` (and of ``hosfl`` simulated client by
client), and each method's client peak memory against an inference forward (the run's own
meter: CUDA allocator statistics on a GPU); then one HO-SFL client step against one
inference forward (``client_step.py``), 1,000 clients against 10 (ResNet shape), and the
CPU-against-device check of ``cross_device.py``. Results as JSON under ``--out``; the table
and the targets of issue 13 printed with the command.

    python benchmarks/gpu.py --device cuda --out DIR      # on a GPU (a few minutes)
    python benchmarks/gpu.py --device cpu --out DIR       # the dry run: small sizes, same code
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from simulate import steps_per_second

import hosfl

HERE = Path(__file__).parent


def resnet18_task(n: int, batch: int) -> hosfl.ModelTask:
    from hosfl.tasks.vision import resnet18

    torch.manual_seed(0)
    model = resnet18(10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n + 2 * batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n + 2 * batch,), generator=gen)
    return hosfl.ModelTask(client=model[:3], server=model[3:], train=(x[:n], y[:n]),
                           test=(x[n:], y[n:]), classes=10, name="resnet18-shaped")  # fmt: skip


def opt_config(small: bool):
    """OPT-125M's shape, or (the dry run) a small model of the same architecture."""
    import transformers

    size = dict(hidden_size=64, ffn_dim=256, num_attention_heads=4, num_hidden_layers=4,
                word_embed_proj_dim=64, vocab_size=2000) if small else {}  # fmt: skip
    return transformers.OPTConfig(num_labels=2, pad_token_id=1, **size)


def opt_task(n: int, batch: int, seq: int, small: bool) -> hosfl.ModelTask:
    import transformers

    from hosfl.tasks.language import _no_dropout, opt_stages

    config = opt_config(small)
    _no_dropout(config)
    torch.manual_seed(0)
    stages = opt_stages(transformers.OPTForSequenceClassification(config))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, config.vocab_size, (n + 2 * batch, seq), generator=gen)
    y = torch.randint(0, 2, (n + 2 * batch,), generator=gen)
    return hosfl.ModelTask(client=stages[:4], server=stages[4:], train=(ids[:n], y[:n]),
                           test=(ids[n:], y[n:]), classes=2, name="opt-shaped",
                           defaults={"freeze": "embed_tokens"})  # fmt: skip


def run_methods(task: str, sizes: dict, device: str, tmp: str) -> list[dict]:
    rows = []
    variants = [("hosfl", "auto"), ("hosfl", "per-client"), ("sfl-v1", "auto"), ("frozen", "auto")]
    for method, simulate in variants:
        cfg = hosfl.Config(task=task, method=method, simulate=simulate, device=device,
                           clients=sizes["M"], sampled=sizes["K"], batch_size=sizes["B"],
                           P=sizes["P"], steps=sizes["steps"], eval_every=0, progress=False,
                           client_lr=1e-4, server_lr=1e-3,
                           out=f"{tmp}/{task}-{method}-{simulate}")  # fmt: skip
        rate, summary = steps_per_second(cfg)
        rows.append({"task": task, "method": method, "simulate": simulate, "M": sizes["M"],
                     "K": sizes["K"], "steps_per_s": rate,
                     "client_peak_bytes": summary["client_peak_bytes"],
                     "inference_peak_bytes": summary["client_inference_peak_bytes"]})  # fmt: skip
        print(f"{task} {method} ({simulate}): {rate:.2f} steps/s, client peak "
              f"{summary['client_peak_bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--steps", type=int, default=0, help="steps a run (0: 30, 4 on the cpu)")
    args = ap.parse_args()
    dry = args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu.py: torch sees no CUDA device; --device cpu is the dry run")
    steps = args.steps or (4 if dry else 30)
    shapes = {  # the dry run keeps the code path and shrinks the sizes
        "resnet18-shaped": dict(M=10 if dry else 100, K=3 if dry else 10, B=8 if dry else 64,
                                P=5, steps=steps),
        "opt-shaped": dict(M=10 if dry else 100, K=3 if dry else 10, B=4 if dry else 32,
                           P=2, steps=steps, T=16 if dry else 128),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"device": args.device, "dry_run": dry,
                     "gpu": torch.cuda.get_device_name() if not dry else None}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        r = shapes["resnet18-shaped"]
        hosfl.register_task(resnet18_task(r["M"] * r["B"], r["B"]))
        o = shapes["opt-shaped"]
        hosfl.register_task(opt_task(o["M"] * o["B"], o["B"], o["T"], dry))
        results["methods"] = [row for task, sizes in shapes.items()
                              for row in run_methods(task, sizes, args.device, tmp)]  # fmt: skip
        rates = {}
        for clients in (r["K"], 100 if dry else 1000):  # as few clients as a step samples
            hosfl.register_task(resnet18_task(clients * r["B"], r["B"]))
            cfg = hosfl.Config(task="resnet18-shaped", device=args.device, clients=clients,
                               sampled=r["K"], batch_size=r["B"], P=r["P"], steps=steps,
                               eval_every=0, progress=False, client_lr=1e-4, server_lr=1e-3,
                               out=f"{tmp}/many-{clients}")  # fmt: skip
            rates[clients], _ = steps_per_second(cfg)
            print(f"resnet18-shaped hosfl M={clients}: {rates[clients]:.2f} steps/s", flush=True)
        (small, few), (large, many) = sorted(rates.items())
        results["many_clients"] = {"M": large, "steps_per_s": many, "M_small": small,
                                   "steps_per_s_small": few}  # fmt: skip
    sys.path.insert(0, str(HERE))
    import client_step

    parts = {"resnet18": (5, None), "opt": (2, None)}
    if dry:  # the shrunk sizes of the runs above
        vision, text = resnet18_task(r["B"], r["B"]), opt_task(o["B"], o["B"], o["T"], dry)
        parts = {name: (P, (t.split_model(t.cut, 0)[0], t.load("train")[0]))
                 for name, P, t in (("resnet18", 5, vision), ("opt", 2, text))}  # fmt: skip
    results["client_step"] = [client_step.measure(p, args.device, P, 3 if dry else 5, part)
                              for p, (P, part) in parts.items()]  # fmt: skip
    cross = subprocess.run([sys.executable, str(HERE / "cross_device.py"), "--device",
                            args.device, "--steps", "50" if dry else "1000", "--out", str(out)],
                           capture_output=True, text=True)  # fmt: skip
    results["cross_device"] = cross.stdout.strip().splitlines()[-12:] or [cross.stderr[-2000:]]
    results["wall_s"] = time.perf_counter() - started
    (out / f"gpu-{args.device}.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    print(f"\ncommand: python benchmarks/gpu.py --device {args.device} --out {args.out}")


def report(res: dict) -> None:
    rows = res["methods"]
    dry = "dry run on the CPU: sizes shrunk, the figures are not the targets"
    print("\n" + (dry if res["dry_run"] else res["gpu"]))
    print("\n| task | method | simulate | steps/s | × sfl-v1 time | client peak MiB "
          "| × inference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sfl = next(x["steps_per_s"] for x in rows if x["task"] == r["task"]
                   and x["method"] == "sfl-v1")  # fmt: skip
        print(f"| {r['task']} | {r['method']} | {r['simulate']} | {r['steps_per_s']:.2f} | "
              f"{sfl / r['steps_per_s']:.2f} | {r['client_peak_bytes'] / 2**20:.1f} | "
              f"{r['client_peak_bytes'] / r['inference_peak_bytes']:.2f} |")  # fmt: skip
    print("\n| part | P | HO-SFL client step ÷ inference forward | target ≤ 1.5·(P+1) |")
    print("|---|---|---|---|")
    for c in res["client_step"]:
        ratio = c["hosfl_rademacher_s"] / c["inference_s"]
        print(f"| {c['part']} | {c['P']} | {ratio:.2f} | {1.5 * (c['P'] + 1):.1f} |")
    m = res["many_clients"]
    print(f"\n{m['M']} clients: {m['steps_per_s']:.2f} steps/s, {m['M_small']} clients: "
          f"{m['steps_per_s_small']:.2f} ({m['steps_per_s'] / m['steps_per_s_small']:.2f}×; "
          "target ≥ 0.8×)")  # fmt: skip
    print("\ncross_device:\n" + "\n".join(res["cross_device"]))


if __name__ == "__main__":
    main()
