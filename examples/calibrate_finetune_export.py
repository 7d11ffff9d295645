"""Compile with calibration data -> fine-tune with sequential freezing -> save -> load -> export (torch.export, ONNX).

    .venv/bin/python examples/calibrate_finetune_export.py

Uses scikit-learn's digits (bench extra) when installed, random images otherwise. The "pretrained" model is
trained here for a few epochs, standing in for yours.
"""
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import lrd_fx


def data():
    try:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = F.interpolate(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=(16, 16),
                          mode="bilinear", align_corners=False)
        x = (x - x.mean()) / x.std()
        return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target)
    except ImportError:
        return torch.randn(512, 3, 16, 16), torch.randint(0, 10, (512,))


def train(model, x, y, epochs, lr, freezer=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in (freezer.epochs(epochs) if freezer is not None else range(epochs)):
        for i in range(0, len(y), 64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


torch.manual_seed(0)
x, y = data()
x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
model = torchvision.models.resnet18(num_classes=10)
train(model, x_tr, y_tr, epochs=3, lr=0.05)
model.eval()
print(f"original: {accuracy(model, x_te, y_te):.1f}% test accuracy")

# 1. compile with calibration data: factors fitted to each layer's outputs on these batches, BatchNorm
#    statistics re-estimated from them; gates for sequential freezing inserted for the fine-tune.
calibration = [x_tr[i:i + 64] for i in range(0, 256, 64)]
gm = lrd_fx.compile(model, (x_tr[:2],), ratio=0.3, skip=("fc",), freeze="sequential", calibration=calibration)
print(f"compiled, data-aware: {accuracy(gm, x_te, y_te):.1f}%  "
      f"({sum(p.numel() for p in model.parameters()):,} -> {sum(p.numel() for p in gm.parameters()):,} params)")

# 2. short fine-tune: each epoch one group of factor layers is frozen, the groups alternate
train(gm, x_tr, y_tr, epochs=2, lr=0.01, freezer=gm.lrd.freezer)
print(f"fine-tuned with sequential freezing: {accuracy(gm, x_te, y_te):.1f}%")

with tempfile.TemporaryDirectory() as d:
    # 3. save (safetensors + JSON plan: loading runs no code) and load onto the original architecture
    path = os.path.join(d, "resnet18_lrd.safetensors")
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(model, path)
    print(f"loaded: {accuracy(loaded, x_te, y_te):.1f}%")

    # 4. export for inference: strip the freezing gates, then torch.export / ONNX
    infer = lrd_fx.strip_gates(loaded).eval()
    ep = torch.export.export(infer, (x_te[:2],))     # static shapes: the exported program takes batches of 2
    with torch.no_grad():
        diff = float((ep.module()(x_te[2:4]) - infer(x_te[2:4])).abs().max())
    print(f"torch.export: {len(ep.graph.nodes)} nodes, max |difference| to eager {diff:.2e}")
    try:
        onnx_path = os.path.join(d, "resnet18_lrd.onnx")
        torch.onnx.export(infer, (x_te[:2],), onnx_path, dynamo=True)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("resnet18_lrd.onnx"))
        print(f"ONNX: wrote {size / 1e6:.1f} MB (graph + weights)")
    except ImportError as e:
        print(f"ONNX export skipped: {e} (pip install onnx onnxscript)")
