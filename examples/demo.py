"""Demo: compile a randomly initialised torchvision ResNet-50 at ratio 0.25 and print the report."""
import torch
import torchvision

import lrd_fx

model = torchvision.models.resnet50(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
gm = lrd_fx.compile(model, (x,), ratio=0.25)
print(gm.lrd.report())

with torch.no_grad():
    y0, y1 = model(x), gm(x)
print(f"\noutput shape {tuple(y1.shape)} (original {tuple(y0.shape)})")
