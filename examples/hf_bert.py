"""Compress a Hugging Face BERT: compile at ratio 0.5, read the report, fine-tune a few steps, save and load.

Uses a small random-config BertForSequenceClassification (no download). To start from pretrained weights,
replace `model = ...` with e.g. transformers.AutoModelForSequenceClassification.from_pretrained(name).
"""
import tempfile
from pathlib import Path

import torch
import transformers

import lrd_fx

torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=512, max_position_embeddings=64, num_labels=2)
model = transformers.BertForSequenceClassification(config).eval()

# Example inputs are given positionally, in the order of model.forward's parameters
# (input_ids, attention_mask, ...); use None for one you skip.
batch, seq = 8, 32
input_ids = torch.randint(0, config.vocab_size, (batch, seq))
attention_mask = torch.ones(batch, seq, dtype=torch.long)
attention_mask[:, 24:] = 0     # padded sequences
labels = torch.randint(0, 2, (batch,))

# BertModel's own forward does not trace: its root stays eager and its parts are traced one by one.
# The report lists them under "Parts traced separately"; every Linear layer is still accounted for.
gm = lrd_fx.compile(model, (input_ids, attention_mask), ratio=0.5, progress=False)
print(gm.lrd.report())
print(f"\ncompiled model: {type(gm).__name__} (a transformers model: generate(), config, ... still work)")

# Fine-tune: dropout follows train()/eval() as in the original.
gm.train()
opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
for step in range(5):
    loss = gm(input_ids, attention_mask=attention_mask, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
gm.eval()

# Save (safetensors + JSON plan) and rebuild from the original model: no search, no factorization.
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "bert_lrd.safetensors"
    lrd_fx.save(gm, path)
    gm2 = lrd_fx.load(model, path)
    with torch.no_grad():
        a = gm(input_ids, attention_mask=attention_mask).logits
        b = gm2(input_ids, attention_mask=attention_mask).logits
    print(f"\nsaved {path.stat().st_size / 1e6:.2f} MB; loaded model's logits equal: {torch.allclose(a, b, atol=1e-6)}")
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in gm2.parameters())
    print(f"parameters: {n0:,} -> {n1:,} ({n1 / n0:.2f}x)")
