"""Compress a Hugging Face mixture-of-experts LM: every expert's projections are factorized.

Uses a small random-config MixtralForCausalLM (no download). To start from pretrained weights, replace
`model = ...` with e.g. transformers.AutoModelForCausalLM.from_pretrained(name). Other MoE families whose
experts transformers keeps as 3-D weights (Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...) work the same.
"""
import tempfile
from pathlib import Path

import torch
import transformers

import lrd_fx

torch.manual_seed(0)
config = transformers.MixtralConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                    num_experts_per_tok=2, max_position_embeddings=128)
model = transformers.MixtralForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (4, 32))

# Enough example tokens that the router sends some to every expert (an expert none reach is still
# factorized, at the rule's rank).
gm = lrd_fx.compile(model, (input_ids,), ratio=0.3, freeze="sequential", progress=False)
report = gm.lrd.report().splitlines()
print("\n".join(line for line in report if ".experts.down_proj.0 " in line or ".experts.gate_up_proj.0 " in line))
print("...")
print("\n".join(line for line in report if line.startswith(("params", "Conv/Linear"))))
print("\n".join(note for note in gm.lrd.notes if "mixture-of-experts" in note))

# Fine-tune with sequential freezing: one epoch per phase (here a few steps each).
gm.train()
opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
for epoch in gm.lrd.freezer.epochs(2):
    for step in range(3):
        loss = gm(input_ids, labels=input_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
gm.eval()
print("generated:", gm.generate(input_ids[:1, :8], max_new_tokens=8, do_sample=False)[0, 8:].tolist())

# Save (safetensors + JSON plan) and rebuild from the original model: no factorization.
with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "mixtral_lrd.safetensors"
    lrd_fx.save(gm, path)
    gm2 = lrd_fx.load(model, path)
    with torch.no_grad():
        same = torch.equal(gm(input_ids).logits, gm2(input_ids).logits)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in gm2.parameters())
    print(f"saved {path.stat().st_size / 1e6:.2f} MB; loaded model's logits equal: {same}; "
          f"parameters: {n0:,} -> {n1:,} ({n1 / n0:.2f}x)")
