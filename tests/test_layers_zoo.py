"""Every weight-bearing layer users have: HF Conv1D, timm Linear, MultiheadAttention, ConvTranspose,
quantized/lazy layers, tied and parametrized weights, and inputs lrd_fx must refuse."""
import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import state_hash
from torch.nn.utils import parametrizations, parametrize, prune

import lrd_fx
from lrd_fx.errors import InputError
from lrd_fx.flops import count_flops
from lrd_fx.factorize import modules as fm


def _plan(gm):
    return gm.lrd.plan


def _accounted(model: nn.Module, plan: dict) -> list:
    """Names of Conv/Linear-like layers of `model` with no decision in `plan` (should be none)."""
    missing = []
    for name, m in model.named_modules():
        names = [name]
        if isinstance(m, nn.MultiheadAttention):
            # its q/k/v projection is a Parameter, not a module: reported as in_proj (compile's stand-in makes it
            # an nn.Linear of that name), or as q_proj/k_proj/v_proj where kdim/vdim differ
            split = [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            names = split if m.in_proj_weight is None else [f"{name}.in_proj"]
        if fm.is_layer_like(m):
            for n in names:
                rec = plan.get(n)
                if rec is None or rec["decision"] not in ("decomposed", "searched", "reverted", "skipped") \
                        or (rec["decision"] == "skipped" and not rec["reason"]):
                    missing.append(n)
    return missing


# --- HF Conv1D (GPT-2) and timm Linear -----------------------------------------------------------

def test_hf_conv1d_is_recognised_by_name_not_by_import():
    # any class named Conv1D from a transformers module (and its subclasses) is recognised; lrd_fx
    # never imports transformers to do so
    Fake = type("Conv1D", (nn.Module,), {"__module__": "transformers.pytorch_utils"})
    Sub = type("MyConv1D", (Fake,), {"__module__": "mymodels"})
    assert isinstance(Fake(), fm.HFConv1D) and isinstance(Sub(), fm.HFConv1D)
    assert not isinstance(nn.Linear(2, 2), fm.HFConv1D)
    assert not isinstance(type("Conv1D", (nn.Module,), {"__module__": "mymodels"})(), fm.HFConv1D)
    src = "\n".join(open(m.__file__).read() for m in (fm, sys.modules["lrd_fx.trace"]))
    assert "import transformers" not in src and "from transformers" not in src


def test_hf_conv1d_factorized_like_a_linear():
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(24, 16)                    # nf=out=24, nx=in=16: weight [16, 24], y = x @ W + b
    nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 16)
    assert isinstance(layer, fm.HFConv1D) and fm.unsupported_reason(layer) is None
    chain = fm.factorize(layer, 16)           # full rank: exact
    assert [type(c) for c in chain] == [nn.Linear, nn.Linear] and chain.source == "Conv1D"
    torch.testing.assert_close(chain(x), layer(x), rtol=1e-4, atol=1e-5)
    model = nn.Sequential(layer, nn.GELU(), Conv1D(16, 24))
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = _plan(gm)
    assert [plan[n]["kind"] for n in ("0", "2")] == ["Conv1D", "Conv1D"]
    assert all(plan[n]["decision"] == "decomposed" for n in ("0", "2"))
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_gets_smaller_and_its_tied_head_stays_tied():
    model = _tiny_gpt2()
    before = state_hash(model)
    ids = torch.randint(0, 128, (2, 8))
    gm = lrd_fx.compile(model, (ids,), ratio=0.5)
    plan = _plan(gm)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and all(plan[n]["decision"] == "decomposed" for n in conv1d)
    # lm_head shares the embedding's weight: left as is, never untied
    assert plan["lm_head"]["decision"] == "skipped"
    assert "weight shared with transformer.wte" in plan["lm_head"]["reason"]
    assert gm.lm_head.weight is gm.transformer.wte.weight
    # parameter totals count the shared tensor once, and the model got smaller
    assert gm.lrd.params_before == sum(p.numel() for p in model.parameters())
    assert gm.lrd.params_after == sum(p.numel() for p in gm.parameters()) < gm.lrd.params_before
    assert torch.isfinite(gm(ids).logits).all()
    assert _accounted(model, plan) == []
    full = lrd_fx.compile(model, (ids,), rank="full")
    torch.testing.assert_close(full(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert state_hash(model) == before


def test_timm_linear_factorizes():
    from timm.layers import Linear as TimmLinear
    model = nn.Sequential(TimmLinear(32, 32), nn.ReLU(), TimmLinear(32, 10))
    x = torch.randn(4, 32)
    assert fm.unsupported_reason(model[0]) is None
    gm = lrd_fx.compile(model, (x,), rank="full")
    assert all(_plan(gm)[n]["decision"] == "decomposed" for n in ("0", "2"))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


# --- every Conv/Linear-like layer appears in the report ------------------------------------------

class Blocky(nn.Module):
    """Kept as a leaf (leaf_modules=[Blocky]): its layers are never traced into."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.raw = nn.Conv2d(8, 16, 1)           # its weight is read with F.conv2d, never called
        self.blk = Blocky()
        self.lazy = nn.LazyLinear(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.q = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 16)), {nn.Linear})
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        y = self.up(self.conv(x))                               # [B, 8, 16, 16]
        y = F.conv2d(y, self.raw.weight, self.raw.bias)         # [B, 16, 16, 16]
        t = y.mean((2, 3)).unsqueeze(1).expand(-1, 4, -1)       # [B, 4, 16]
        t = self.blk(self.lazy(t))
        t = self.mha(t, t, t)[0]
        return self.q(t)


def test_every_layer_of_a_mixed_model_is_accounted_for():
    model = Zoo().eval()
    x = torch.randn(2, 8, 8, 8)
    model(x)                                   # materialise the lazy layer (it becomes an nn.Linear)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    gm = lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=[Blocky])
    plan = _plan(gm)
    assert _accounted(model, plan) == []
    why = {n: plan[n]["reason"] for n in plan}
    assert plan["conv"]["decision"] == "decomposed"
    assert plan["lazy"]["decision"] == "decomposed"
    assert "transposed conv" in why["up"] and plan["up"]["kind"] == "ConvTranspose2d"
    assert "read directly" in why["raw"]
    for n in ("blk.fc1", "blk.fc2"):
        assert "inside blk (Blocky), which is kept as a leaf" in why[n]
    for n in ("mha.in_proj", "mha.out_proj"):   # torch_modules' stand-in
        assert plan[n]["decision"] == "decomposed", (n, plan[n])
    assert "quantized" in why["q.0"]
    assert "not reached by the traced forward" in why["unused"]
    report = gm.lrd.report()
    assert all(n in report for n in ("up", "raw", "blk.fc1", "mha.in_proj", "q.0", "unused"))
    torch.testing.assert_close(lrd_fx.compile(model, (x,), rank="full", leaf_modules=[Blocky])(x), model(x),
                               rtol=1e-4, atol=1e-4)
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lazy_layer_without_example_inputs_is_refused():
    model = nn.Sequential(nn.Linear(16, 16), nn.LazyLinear(16))
    with pytest.raises(InputError, match="uninitialized.*example_inputs"):
        lrd_fx.compile(model)
    assert fm.unsupported_reason(model[1]).startswith("lazy module with uninitialized parameters")


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                             mlp_dim=64).eval(), torch.randn(1, 3, 32, 32)


def _timm(name, size, **kw):
    import timm
    return timm.create_model(name, pretrained=False, img_size=size, **kw).eval(), torch.randn(1, 3, size, size)


ZOO = {
    "torchvision_vit": _tv_vit,
    "timm_swin": lambda: _timm("swin_tiny_patch4_window7_224", 32, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                               window_size=4, patch_size=2),
    "timm_beit": lambda: _timm("beit_base_patch16_224", 32, embed_dim=32, depth=1, num_heads=2, patch_size=16),
    "timm_eva02": lambda: _timm("eva02_tiny_patch14_224", 28, embed_dim=32, depth=1, num_heads=2, patch_size=14),
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", 32, embed_dim=32, depth=1, num_heads=2, patch_size=16),
}


# what happens to each model's qkv projection: (decision, words of the reason)
QKV = {
    "torchvision_vit": ("decomposed", "ratio=0.5"),      # nn.MultiheadAttention: torch_modules' stand-in
    "timm_swin": ("decomposed", "ratio=0.5"),
    "timm_beit": ("decomposed", "ratio=0.5"),   # F.linear(x, qkv.weight, q/k/v biases): passes/layer_calls
    "timm_eva02": ("decomposed", "ratio=0.5"),
    "timm_vit": ("decomposed", "ratio=0.5"),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_attention_models_account_for_every_layer(name):
    model, x = ZOO[name]()
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = _plan(gm)
    assert _accounted(model, plan) == []
    assert any(r["decision"] == "decomposed" for r in plan.values())
    qkv = [n for n in plan if n.endswith(("qkv", "in_proj"))]
    assert qkv, "the attention's qkv projection is missing from the report"
    decision, words = QKV[name]
    for n in qkv:
        assert plan[n]["decision"] == decision and words in plan[n]["reason"], (n, plan[n])
    if name == "torchvision_vit":
        assert sorted(n.rpartition(".")[2] for n in plan if "self_attention" in n) == ["in_proj", "out_proj"]
    assert torch.isfinite(gm(x)).all()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_vit_is_one_graph(name):
    """timm's ViT and DeiT branch on `is_causal=False` in forward_features: the root stayed eager, with a
    TraceError in the report. Left out of the example inputs, it is traced at its default: one graph, the
    original's outputs at full rank, and is_causal=True is an InputError that names it."""
    model, x = _timm(name, 32, embed_dim=32, depth=2, num_heads=2, patch_size=16)
    gm = lrd_fx.compile(model, (x,), rank="full")
    assert isinstance(gm, torch.fx.GraphModule) and gm.lrd.fallback_parts == {}
    assert gm.lrd.traced_defaults == {"is_causal": False}
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(lrd_fx.InputError, match="'is_causal'"):
        gm(x, is_causal=True)


def test_timm_not_traceable_blocks_run_eagerly_and_their_layers_are_factorized(tmp_path):
    """timm registers MobileViT's blocks (and TinyViT's, NFNet's, VGG's ConvMlp, ...) as not traceable. They
    were kept whole and every layer inside them (most of a MobileViT) skipped. They run their own forward
    eagerly now, their children traced apart and their layers factorized; a caller's leaf_modules=[...] still
    keeps them whole."""
    import timm
    from timm.models.mobilevit import MobileVitBlock
    torch.manual_seed(0)
    model, x = timm.create_model("mobilevit_xxs", pretrained=False).eval(), torch.randn(1, 3, 64, 64)
    blocks = [n for n, m in model.named_modules() if isinstance(m, MobileVitBlock)]
    inside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(tuple(blocks))]
    assert blocks and inside
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = _plan(gm)
    assert _accounted(model, plan) == []
    for b in blocks:
        assert "register_notrace_module" in gm.lrd.fallback_parts[b]
    assert all(plan[n]["decision"] == "decomposed" for n in inside), [(n, plan[n]["reason"]) for n in inside]
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(timm.create_model("mobilevit_xxs", pretrained=False).eval(), tmp_path / "m.lrd", (x,))
    torch.testing.assert_close(back.eval()(x), gm(x), rtol=0, atol=0)

    whole = _plan(lrd_fx.compile(model, (x,), ratio=0.5, leaf_modules=[MobileVitBlock]))
    for n in inside:
        assert whole[n]["decision"] == "skipped" and "which is kept as a leaf" in whole[n]["reason"], whole[n]


def test_registered_leaf_keeps_a_timm_not_traceable_block_whole():
    from timm.models.vgg import ConvMlp

    from lrd_fx import trace
    net = nn.Sequential(nn.Conv2d(8, 16, 1), ConvMlp(16, 32, kernel_size=3, mlp_ratio=2.0)).eval()
    x = torch.randn(2, 8, 5, 5)
    lrd_fx.register_leaf_module(ConvMlp)
    try:
        plan = _plan(lrd_fx.compile(net, (x,), ratio=0.5))
    finally:
        for k in [k for k, v in trace.LEAF_MODULES.items() if v is ConvMlp]:
            del trace.LEAF_MODULES[k]
    assert plan["0"]["decision"] == "decomposed"
    assert all("which is kept as a leaf" in plan[n]["reason"] for n in ("1.fc1", "1.fc2")), plan
    assert _plan(lrd_fx.compile(net, (x,), ratio=0.5))["1.fc1"]["decision"] == "decomposed"


def test_timm_not_traceable_root_runs_eagerly():
    """A not-traceable timm module compiled on its own (VGG's ConvMlp, whose 7x7 fc1 is most of a timm VGG)
    is not traced either: its forward runs as written, its convolutions are factorized."""
    from timm.models.vgg import ConvMlp
    torch.manual_seed(0)
    mlp, x = ConvMlp(16, 32, kernel_size=3, mlp_ratio=2.0).eval(), torch.randn(2, 16, 5, 5)
    gm = lrd_fx.compile(mlp, (x,), ratio=0.5)
    assert "register_notrace_module" in gm.lrd.fallback_parts["<root>"]
    assert {n: r["decision"] for n, r in _plan(gm).items()} == {"fc1": "decomposed", "fc2": "decomposed"}
    torch.testing.assert_close(lrd_fx.compile(mlp, (x,), rank="full")(x), mlp(x), rtol=1e-4, atol=1e-5)


# --- tied weights --------------------------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.c = nn.Linear(32, 32)

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


def test_tied_linears_stay_tied_through_training():
    model = Tied()
    before = state_hash(model)
    x = torch.randn(8, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.25)
    plan = _plan(gm)
    assert plan["c"]["decision"] == "decomposed"
    assert plan["a"]["decision"] == plan["b"]["decision"] == "skipped"
    assert "weight shared with b" in plan["a"]["reason"] and "weight shared with a" in plan["b"]["reason"]
    assert gm.lrd.params_before == 2 * 32 * 32 + 3 * 32           # the shared tensor counted once
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm(x).square().mean().backward()
    opt.step()
    assert gm.a.weight is gm.b.weight
    torch.testing.assert_close(gm.a.weight, gm.b.weight)
    assert state_hash(model) == before


# --- parametrized and masked weights -------------------------------------------------------------

def _top_singular(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2).item()


def test_spectral_norm_survives_compile_and_training():
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(16, 16, 3, padding=1)), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(4, 16, 8, 8)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = _plan(gm)
    assert plan["0"]["decision"] == "skipped" and "remove_parametrizations" in plan["0"]["reason"]
    assert plan["2"]["decision"] == "decomposed"
    layer = gm.get_submodule("0")
    assert parametrize.is_parametrized(layer, "weight")
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (gm(x) * 100).square().mean().backward()
        opt.step()
    assert abs(_top_singular(layer.weight) - 1.0) < 0.05


def test_weight_norm_parametrization_is_skipped():
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(32, 32)), nn.Linear(32, 32))
    plan = _plan(lrd_fx.compile(model, (torch.randn(2, 32),), ratio=0.5))
    assert plan["0"]["decision"] == "skipped" and "WeightNorm" in plan["0"]["reason"]


def test_old_weight_norm_and_prune_masks_compile_without_crash():
    wn = torch.nn.utils.weight_norm(nn.Conv2d(16, 16, 3))
    pruned = nn.Conv2d(16, 16, 3)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    model = nn.Sequential(wn, nn.ReLU(), pruned, nn.ReLU(), nn.Conv2d(16, 16, 1))
    before = state_hash(model)
    x = torch.randn(2, 16, 10, 10)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    plan = _plan(gm)
    assert "remove_weight_norm" in plan["0"]["reason"] and plan["0"]["decision"] == "skipped"
    assert "prune.remove" in plan["2"]["reason"] and plan["2"]["decision"] == "skipped"
    assert plan["4"]["decision"] == "decomposed"
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
    assert state_hash(model) == before
    assert (gm.get_submodule("2").weight == 0).float().mean().item() >= 0.5   # the mask still applies


class _KeepsLastPyramid(nn.Module):
    """Keeps tensors of its last forward in a list and a dict, as torchvision's RAFT keeps its correlation
    pyramid: after one forward with gradients the model holds non-leaf tensors that copy.deepcopy refuses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)
        self.pyramid, self.last = [], {}

    def forward(self, x):
        y = self.conv(x)
        self.pyramid = [y, nn.functional.avg_pool2d(y, 2)]
        self.last = {"pooled": (y.mean((2, 3)),)}
        return self.fc(self.last["pooled"][0])


def test_non_leaf_tensors_kept_from_the_last_forward_do_not_stop_the_copy():
    model = _KeepsLastPyramid()
    x = torch.randn(2, 16, 8, 8)
    model(x)                                     # with gradients: the kept tensors are non-leaf
    before = state_hash(model)
    gm = lrd_fx.compile(model, (x,), rank="full")
    assert state_hash(model) == before
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert {"conv", "fc"} <= {n for n, p in gm.lrd.plan.items() if p["decision"] == "decomposed"}


# --- inputs that cannot work ---------------------------------------------------------------------

def test_script_module_is_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(InputError, match="eager nn.Module"):
        lrd_fx.compile(scripted, (torch.randn(2, 16),))


def test_already_compiled_model_is_refused_unless_rank_full():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    with pytest.raises(InputError, match="already compiled by lrd_fx"):
        lrd_fx.compile(gm, (x,), ratio=0.5)
    again = lrd_fx.compile(gm, (x,), rank="full")
    torch.testing.assert_close(again(x), gm(x), rtol=1e-4, atol=1e-5)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(InputError, match="meta device"):
        lrd_fx.compile(model)


# --- reports with nothing to factorize; the FLOP counter failing ---------------------------------

@pytest.mark.parametrize("kind", ["nothing", "conv_transpose", "quantized"])
def test_report_without_factorizable_layers(kind):
    if kind == "nothing":
        model, x = nn.Sequential(nn.ReLU()), torch.randn(2, 4)
    elif kind == "conv_transpose":
        model, x = nn.Sequential(nn.ConvTranspose2d(16, 16, 3), nn.ConvTranspose1d(16, 16, 3)), None
    else:
        model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 16)), {nn.Linear})
        x = torch.randn(2, 16)
    gm = lrd_fx.compile(model, x)
    text = gm.lrd.report()
    plan = _plan(gm)
    assert _accounted(model, plan) == []
    assert not any(r["decision"] == "decomposed" for r in plan.values())
    if kind == "nothing":
        assert plan == {} and "nothing to factorize" in text
    elif kind == "conv_transpose":
        assert set(plan) == {"0", "1"} and all("transposed conv" in r["reason"] for r in plan.values())
        assert "ConvTranspose2d" in text and "ConvTranspose1d" in text
    else:
        assert set(plan) == {"0"} and "quantized" in plan["0"]["reason"] and "quantized" in text


def test_flop_counter_failure_does_not_sink_compile(monkeypatch):
    from torch.utils import flop_counter

    def broken(self):
        raise AssertionError("flop counter bug")      # what torch's counter raises on timm's cait
    monkeypatch.setattr(flop_counter.FlopCounterMode, "__enter__", broken)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    gm = lrd_fx.compile(model, (torch.randn(2, 32),), ratio=0.5)
    assert gm.lrd.flops_before is None
    assert all(r["decision"] == "decomposed" for r in _plan(gm).values())
    text = gm.lrd.report()
    assert "unknown" in text and "FLOPs unknown" in text and "AssertionError" in text


def test_timm_cait_whose_eager_flops_torch_cannot_count_compiles_with_them():
    # torch's FlopCounterMode raises "AssertionError: Expected gradient function to be set" on the eager cait;
    # compile counts them in shape_prop's forward of the traced model, where it does not
    model, x = _timm("cait_xxs24_224", 32, embed_dim=32, num_heads=2, depth=2, depth_token_only=2, patch_size=16)
    with pytest.raises(AssertionError):
        count_flops(model, (x,))
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert 0 < gm.lrd.flops_after == count_flops(gm, (x,)) < gm.lrd.flops_before
    assert "FLOPs unknown" not in gm.lrd.report()
    assert any(r["decision"] == "decomposed" for r in _plan(gm).values())
    assert _accounted(model, _plan(gm)) == []
    assert torch.isfinite(gm(x)).all()


class ReadsWeight(nn.Module):
    """Does not trace (data-dependent branch), so it stays eager; it reads proj's weight itself."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(F.linear(x, self.proj.weight, self.proj.bias))


def test_layer_of_an_eager_part_never_called_as_a_layer_is_kept():
    model = nn.Sequential(nn.Linear(32, 32), ReadsWeight())
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.25)
    plan = _plan(gm)
    assert plan["1.fc"]["decision"] == "decomposed"
    assert plan["1.proj"]["decision"] == "skipped" and "not called as a layer" in plan["1.proj"]["reason"]
    assert isinstance(gm.get_submodule("1.proj"), nn.Linear)
    full = lrd_fx.compile(model, (x,), rank="full")
    torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)


def test_tied_and_spectral_normed_layers_survive_save_and_load(tmp_path):
    model = nn.Sequential(Tied(), nn.ReLU(), nn.Unflatten(1, (2, 4, 4)),
                          parametrizations.spectral_norm(nn.Conv2d(2, 16, 3, padding=1)))
    x = torch.randn(4, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.25).eval()
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(model, tmp_path / "m.lrd", (x,)).eval()
    assert back.get_submodule("0.a").weight is back.get_submodule("0.b").weight
    assert parametrize.is_parametrized(back.get_submodule("3"), "weight")
    assert _plan(back)["0.c"]["decision"] == "decomposed"
    torch.testing.assert_close(back(x), gm(x))



def test_scripted_submodule_is_refused():
    # fx would trace into its C++ module, and a copy of it does not train: refused, not silently broken
    model = nn.Sequential(torch.jit.script(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 16))
    with pytest.raises(InputError, match="submodule '0' is a TorchScript module"):
        lrd_fx.compile(model, (torch.randn(4, 16),))


@pytest.mark.parametrize("lazy_at", [2, 0])
def test_uninitialised_lazy_layer_gets_its_shapes_from_an_eager_forward_before_tracing(monkeypatch, tmp_path, lazy_at):
    # compile's one whole-model forward is shape_prop's, after tracing; a lazy layer needs a forward before
    # tracing to get its weights, on compile's copy (the caller's model stays lazy)
    layers = [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)]
    layers[lazy_at] = nn.LazyLinear(layers[lazy_at].out_features)
    model = nn.Sequential(*layers)
    x = torch.randn(4, 16)
    eager = []
    real = lrd_fx.api._check_inputs
    monkeypatch.setattr(lrd_fx.api, "_check_inputs", lambda *a: eager.append(1) or real(*a))
    gm = lrd_fx.compile(model, (x,), ratio=0.5)
    assert eager == [1] and _plan(gm)[str(lazy_at)]["decision"] == "decomposed"
    assert model[lazy_at].has_uninitialized_params()
    assert gm(x).shape == (4, 16) and gm.lrd.flops_before > gm.lrd.flops_after > 0
    # save/load onto the (still lazy) original
    lrd_fx.save(gm, tmp_path / "m.lrd")
    back = lrd_fx.load(model, tmp_path / "m.lrd", (x,))
    assert torch.equal(back(x), gm(x)) and model[lazy_at].has_uninitialized_params()


# --- timm's Conv2dSame (TensorFlow 'SAME' padding, the tf_* models) ---------------------------------

@pytest.mark.parametrize("scheme", ["tucker2", "conv_svd"])
def test_timm_same_padding_conv_is_factorized_exactly(scheme, tmp_path):
    from timm.layers.conv2d_same import Conv2dSame
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(16, 32, 3, stride=2), nn.ReLU(), Conv2dSame(32, 32, 5, dilation=2),
                          Conv2dSame(32, 64, 1, stride=2)).eval()
    x = torch.randn(2, 16, 17, 17)
    gm = lrd_fx.compile(model, (x,), rank="full", conv_scheme=scheme)
    assert [r["decision"] for r in gm.lrd.plan.values()] == ["decomposed"] * 3
    spatial = gm.get_submodule("0")[1 if scheme == "tucker2" else 0]
    assert type(spatial) is Conv2dSame                  # it pads as the layer does, from each input's size
    with torch.no_grad():
        for shape in ((2, 16, 17, 17), (1, 16, 20, 23)):     # the padding differs with the input size
            y = torch.randn(*shape)
            torch.testing.assert_close(gm(y), model(y), rtol=1e-4, atol=1e-5)
    small = lrd_fx.compile(model, (x,), ratio=0.5, conv_scheme=scheme)
    lrd_fx.save(small, tmp_path / "same.lrd")
    loaded = lrd_fx.load(model, tmp_path / "same.lrd")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
        torch.testing.assert_close(lrd_fx.fuse(small)(x), small(x), rtol=1e-4, atol=1e-5)


def test_timm_optimizer_metadata_methods_are_kept_and_structural_ones_refused():
    """A timm model traced whole became a GraphModule without its class's methods: create_optimizer_v2 then
    found no no_weight_decay()/group_matcher(), silently decayed pos_embed/cls_token and grouped layers for
    layer decay differently. The metadata methods are kept (on copies and unpickled models too); those
    that need the model's own structure (reset_classifier, forward_features, ...) raise UnsupportedError."""
    import timm
    from timm.optim import create_optimizer_v2

    from conftest import unpickled
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = lrd_fx.compile(model, (x,), ratio=0.5, progress=False)

    def groups(m):
        names = {id(p): n for n, p in m.named_parameters()}
        opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return {names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in opt.param_groups for p in g["params"]}

    want = groups(model)
    for m in (gm, copy.deepcopy(gm), unpickled(gm)):
        got = groups(m)
        assert got["pos_embed"] == want["pos_embed"] and got["pos_embed"][0] == 0.0
        assert all(got[k] == v for k, v in want.items() if k in got)
        assert got["blocks.0.mlp.fc1.first.weight"] == want["blocks.0.mlp.fc1.weight"]
        assert m.get_classifier() is m.head
        with pytest.raises(lrd_fx.UnsupportedError, match="reset_classifier.* before lrd_fx.compile"):
            m.reset_classifier(5)
        with pytest.raises(lrd_fx.UnsupportedError, match="forward_features"):
            m.forward_features(x)
