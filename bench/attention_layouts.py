"""nn.MultiheadAttention stand-in layouts: the packed input projection (torch_modules.MultiheadAttention,
one `in_proj` layer, what compile uses) against three separate q/k/v projections, at the same ranks rule
and parameter count, against the original; torchvision ViT-B/16, random weights, batch 2, 224 px.

    python bench/attention_layouts.py infer     # or: train (forward + backward)

Prints each variant's median time per batch over 9 interleaved rounds (lrd_fx.cost.timer) and its speed-up
over the original in the same run.
"""
import sys
import warnings

import torch
import torchvision

import lrd_fx
from lrd_fx import torch_modules as tm
from lrd_fx.cost.timer import measure_interleaved


class SplitProjections(tm.MultiheadAttentionKV):
    """The stand-in with q_proj, k_proj and v_proj cut from the packed weight (factorized one by one)."""

    def _projections(self, mha):
        weights, biases = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
        self.q_proj, self.k_proj, self.v_proj = (tm._linear(w, b, mha, True) for w, b in zip(weights, biases))


def main(mode: str = "infer") -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(2, 3, 224, 224)
    packed = lrd_fx.compile(model, (x,), ratio=0.25, progress=False)
    packed_cls, tm.MultiheadAttention = tm.MultiheadAttention, SplitProjections
    try:
        split = lrd_fx.compile(model, (x,), ratio=0.25, progress=False)
    finally:
        tm.MultiheadAttention = packed_cls
    for name, m in (("packed", packed), ("split", split)):
        print(name, f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters")

    def step(m):
        if mode == "infer":
            def run():
                with torch.no_grad():
                    m(x)
        else:
            m.train()

            def run():
                m.zero_grad(set_to_none=True)
                m(x).sum().backward()
        return run

    if mode != "infer":
        model.train()
    res = measure_interleaved({"original": step(model), "packed": step(packed), "split": step(split)}, rounds=9)
    base = res["original"].median_s
    for name, r in res.items():
        print(mode, name, f"{r.median_s * 1e3:.1f} ms", f"{base / r.median_s:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "infer")
