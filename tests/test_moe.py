"""Hugging Face mixture-of-experts blocks: the experts' 3-D weights are factorized, expert by expert, through
lrd_fx.moe.Experts (compile's copy only)."""
import pytest
import torch

import lrd_fx
from lrd_fx.factorize.chain import FactorChain
from lrd_fx.moe import Experts, experts_names

transformers = pytest.importorskip("transformers")

LLAMA_LIKE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _mixtral(experts=8):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**LLAMA_LIKE, num_local_experts=experts, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


def _gpt_oss():
    # weights stored [experts, in, out] (is_transposed), biases, a clamped gate on interleaved columns
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**LLAMA_LIKE, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=4)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)      # HF zero-initialises the biases: give them something to get right
    return model


def _ids(n=8):
    return torch.randint(3, 64, (2, n), generator=torch.Generator().manual_seed(1))


def _expert_records(gm):
    return {n: r for n, r in gm.lrd.records().items() if ".experts." in n}


@pytest.mark.parametrize("make", [_mixtral, _gpt_oss], ids=["mixtral", "gpt_oss"])
def test_experts_are_factorized_exactly_at_full_rank(make):
    """Before, the experts' 3-D weights (90% of a Mixtral) were outside every layer and left as they were.
    Each expert's projections are layers now: at full rank the model computes what the original does, every
    expert of every MoE block is factorized (also those the example tokens were not routed to), and the
    report no longer lists the experts among the parameters outside layers."""
    model, ids = make(), _ids(2)
    want = model(ids).logits
    gm = lrd_fx.compile(model, (ids,), rank="full", progress=False)
    torch.testing.assert_close(gm(ids).logits, want, rtol=1e-4, atol=1e-5)
    experts = [m for _, m in gm.named_modules() if isinstance(m, Experts)]
    assert len(experts) == 2 and len(gm.lrd.stand_ins) == 2
    n = len(experts[0].down_proj)
    recs = _expert_records(gm)
    assert len(recs) == 2 * 2 * n and all(r.decision == "decomposed" for r in recs.values())
    if n == 8:
        assert any(r.in_shape is None for r in recs.values())      # an expert no example token went to
    assert all(isinstance(layer, FactorChain) for e in experts for layer in e.down_proj)
    assert not any("Experts" in cls for cls, *_ in gm.lrd.outside[1])
    assert any("mixture-of-experts" in note for note in gm.lrd.notes)
    assert all(type(m).__name__ != "Experts" for m in model.modules())        # the caller's model is untouched


def test_experts_shrink_the_model_and_train_and_load(tmp_path):
    """At ratio=0.25 the model keeps well under half its parameters (attention alone could not get there);
    it trains with sequential freezing, and a file loads without example inputs to the same outputs."""
    model, ids = _mixtral(), _ids()
    before = sum(p.numel() for p in model.parameters())
    gm = lrd_fx.compile(model, (ids,), ratio=0.25, freeze="sequential", progress=False)
    assert sum(p.numel() for p in gm.parameters()) < 0.45 * before
    gm.train()
    out = gm(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for m in gm.modules() if isinstance(m, Experts) for p in m.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    gm.eval()
    path = tmp_path / "moe.lrd"
    lrd_fx.save(gm, path)
    loaded = lrd_fx.load(model, path)
    assert loaded.lrd.stand_ins == gm.lrd.stand_ins
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, gm(ids).logits, rtol=0, atol=0)


def test_experts_stand_in_takes_the_original_call_and_state_dict():
    """The stand-in is called as the original (GPT-OSS by keyword: router_indices, routing_weights), and the
    original's state dict (3-D keys, stored transposed) loads into it."""
    model = _gpt_oss()
    orig = model.model.layers[0].mlp.experts
    assert experts_names(orig) == ("gate_up_proj", "down_proj")
    stand_in = Experts(orig)
    h = torch.randn(6, 32)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    with torch.no_grad():
        want = orig(h, idx, w)
        torch.testing.assert_close(stand_in(h, router_indices=idx, routing_weights=w), want, rtol=1e-5, atol=1e-6)
        for layer in stand_in.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        stand_in.load_state_dict(orig.state_dict())
        torch.testing.assert_close(stand_in(h, idx, w), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="router_indices"):
        stand_in(h, idx, top_k_weights=w)


def test_experts_with_hooks_or_kept_as_leaves_stay_as_they_are():
    model, ids = _mixtral(4), _ids()
    hooked = _mixtral(4)
    hooked.model.layers[1].mlp.experts.register_forward_hook(lambda *a: None)
    gm = lrd_fx.compile(hooked, (ids,), ratio=0.5, progress=False)
    assert gm.lrd.stand_ins == ["model.layers.0.mlp.experts"]
    leaf = lrd_fx.compile(model, (ids,), ratio=0.5, leaf_modules=[type(model.model.layers[0].mlp.experts)],
                          progress=False)
    assert leaf.lrd.stand_ins == [] and not _expert_records(leaf)
    assert "3-D weights" in leaf.lrd.report()


def test_bf16_moe_model_keeps_its_dtype():
    model, ids = _mixtral(4).to(torch.bfloat16), _ids()
    gm = lrd_fx.compile(model, (ids,), rank="full", progress=False)
    out, want = gm(ids).logits, model(ids).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()


def _experts_module(cls_path, **cfg):
    """A transformers experts module built on its own (its config as a namespace), weights drawn at random."""
    import importlib
    import types
    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(f"transformers.models.{module}"), name)
    torch.manual_seed(0)
    experts = cls(types.SimpleNamespace(_experts_implementation="eager", **cfg))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


LAYOUTS = {   # each layout use_experts_implementation knows, as a model family has it
    "gated": ("mixtral.modeling_mixtral.MixtralExperts",
              dict(num_local_experts=4, hidden_size=16, intermediate_size=24, hidden_act="silu")),
    "ungated": ("nemotron_h.modeling_nemotron_h.NemotronHExperts",
                dict(n_routed_experts=4, hidden_size=16, moe_intermediate_size=24, moe_latent_size=None,
                     mlp_hidden_act="relu2")),
    "post_norm": ("muse_spark.modeling_muse_spark.MuseSparkExperts",
                  dict(num_local_experts=4, moe_hidden_size=16, moe_intermediate_size=24, hidden_act="silu",
                       post_norm_eps=1e-6)),
    "transposed": ("aria.modeling_aria.AriaExperts",
                   dict(moe_num_experts=4, hidden_size=16, intermediate_size=24)),
    "transposed_bias_gate": ("gpt_oss.modeling_gpt_oss.GptOssExperts",
                             dict(num_local_experts=4, hidden_size=16, intermediate_size=24, swiglu_alpha=1.702,
                                  swiglu_limit=7.0)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stand_in_computes_what_each_experts_layout_computes(layout):
    """Every layout transformers' use_experts_implementation describes (gated or not, a post-expert norm,
    weights stored transposed, biases, a model's own gate), against the module's own eager forward."""
    path, cfg = LAYOUTS[layout]
    try:
        orig = _experts_module(path, **cfg)
    except (ImportError, AttributeError) as e:      # a transformers without this family
        pytest.skip(f"{path}: {e}")
    stand_in = Experts(orig)
    assert isinstance(stand_in.down_proj[0], torch.nn.Linear)
    h = torch.randn(10, 16)
    idx = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(2))
    w = torch.rand(10, 2)
    with torch.no_grad():
        torch.testing.assert_close(stand_in(h, idx, w), orig(h, idx, w).to(h.dtype), rtol=1e-5, atol=1e-6)
        back = stand_in.original()        # what restore_unfactorized_ puts back
        assert type(back) is type(orig) and back.state_dict().keys() == orig.state_dict().keys()
        for k, v in orig.state_dict().items():
            torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(back(h, idx, w), orig(h, idx, w), rtol=0, atol=0)


def test_experts_with_no_layer_factorized_are_put_back(tmp_path):
    """An experts module whose layers all stay as they are (skip=, or reverted by a search) would only run
    transformers' experts as the stand-in's loop: it is put back as the original module, with its 3-D
    weights, and the report lists them outside the layers again. The other block's experts keep the
    stand-in; save/load rebuilds the same."""
    model, ids = _mixtral(4), _ids()
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, skip=["model.layers.1.mlp.experts.*"], progress=False)
    kept = gm.model.layers[1].mlp.experts
    assert type(kept) is type(model.model.layers[1].mlp.experts) and kept.gate_up_proj.dim() == 3
    assert isinstance(gm.model.layers[0].mlp.experts, Experts)
    assert gm.lrd.stand_ins == ["model.layers.0.mlp.experts"]
    assert not any(n.startswith("model.layers.1.mlp.experts.") for n in gm.lrd.records())
    assert any("put back as the original module" in note for note in gm.lrd.notes)
    assert any("Experts" in cls for cls, *_ in gm.lrd.outside[1])
    torch.testing.assert_close(kept.down_proj, model.model.layers[1].mlp.experts.down_proj, rtol=0, atol=0)
    with torch.no_grad():
        want = gm(ids).logits
        path = tmp_path / "m.lrd"
        lrd_fx.save(gm, path)
        loaded = lrd_fx.load(model, path)
        assert type(loaded.model.layers[1].mlp.experts) is type(kept)
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    none = lrd_fx.compile(model, (ids,), ratio=0.5, skip=["*.experts.*"], progress=False)
    assert none.lrd.stand_ins == [] and not any(isinstance(m, Experts) for m in none.modules())
    with torch.no_grad():
        torch.testing.assert_close(none(ids).logits, lrd_fx.compile(model, (ids,), ratio=0.5,
                                   leaf_modules=[type(kept)], progress=False)(ids).logits, rtol=1e-5, atol=1e-6)


def test_rank_search_times_unreached_experts_like_their_siblings():
    """A rank search could not time an expert the example inputs routed no token to (no input shape): it
    kept the estimate while its siblings were reverted, so the module kept the stand-in's loop for a few
    factorized experts. Such an expert is timed at a sibling's input shape now, and decided like it: here
    every expert is reverted (the original layers cost less), and both modules are put back whole."""
    from lrd_fx.cost.timer import use_cost_fn

    def cost(module, shape, mode):
        return 2.0 if isinstance(module, FactorChain) else 1.0     # factor chains never pay
    model, ids = _mixtral(8), _ids(2)
    with use_cost_fn(cost):
        gm = lrd_fx.compile(model, (ids,), ratio=0.5, rank_search="infer", progress=False)
    assert gm.lrd.stand_ins == [] and not any(isinstance(m, Experts) for m in gm.modules())
    assert type(gm.model.layers[0].mlp.experts) is type(model.model.layers[0].mlp.experts)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    with use_cost_fn(lambda module, shape, mode: 1.0 if isinstance(module, FactorChain) else 2.0):
        gm = lrd_fx.compile(model, (ids,), ratio=0.5, rank_search="infer", progress=False)
    recs = _expert_records(gm)
    unreached = [r for r in recs.values() if r.in_shape is None]
    assert unreached and all(r.decision == "searched" and "timed at the input shape of expert" in r.reason
                             for r in unreached)


def test_wrap_ddp_looks_for_unused_experts(monkeypatch):
    """An expert the router sends no token in a batch gets no gradient (transformers' 3-D weight got zeros
    for it), so DDP must look for unused parameters: wrap_ddp asks for it, and refuses what breaks it."""
    import torch.nn.parallel

    from lrd_fx import wrap_ddp
    from lrd_fx.errors import ConfigError
    got = {}
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, **kw: got.update(kw) or m)
    gm = lrd_fx.compile(_mixtral(4), (_ids(),), ratio=0.5, progress=False)
    assert wrap_ddp(gm) is gm and got == {"find_unused_parameters": True}
    for bad in ({"find_unused_parameters": False}, {"static_graph": True}):
        with pytest.raises(ConfigError, match="find_unused_parameters=True"):
            wrap_ddp(gm, **bad)
    got.clear()     # Llama-4's experts all run on every call: DDP needs nothing more
    assert wrap_ddp(lrd_fx.compile(_llama4(), (_ids(),), ratio=0.5, progress=False)) is not None and got == {}


def test_report_gives_each_projection_of_the_experts_one_row():
    """A MoE model has a record per expert and projection (a Qwen3-30B-like model: 12,288); the report's
    table gives each projection's experts one row, their parameters summed and what they share, with the
    count of each decision where they differ; each_expert=True lists them one by one."""
    model, ids = _mixtral(8), _ids(2)
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, skip=["model.layers.1.mlp.experts.down_proj.3"], progress=False)
    recs = _expert_records(gm)
    table = gm.lrd.report().split("\n\n")[0].splitlines()
    grouped = [line for line in table if ".experts." in line]
    assert len(grouped) == 4 and all("(8 experts)" in line for line in grouped)
    row = next(line for line in grouped if line.startswith("model.layers.1.mlp.experts.down_proj.<0-7>"))
    assert "7 decomposed; 1 skipped" in row
    total = sum(r.params_after for n, r in recs.items() if n.startswith("model.layers.1.mlp.experts.down_proj."))
    assert f"{total:,}" in row
    each = [line for line in gm.lrd.report(each_expert=True).splitlines() if ".experts." in line]
    assert len(each) == len(recs) == 32
    assert len([line for line in gm.lrd.report(all_layers=False).splitlines() if ".experts." in line]) == 4


def _llama4():
    # Llama-4's experts are not decorated by use_experts_implementation: each expert takes an equal slice of
    # the router-scaled token copies, through torch.bmm on [experts, in, out] weights
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                        max_position_embeddings=32, attention_chunk_size=16)
    return transformers.Llama4ForCausalLM(cfg).eval()


def test_llama4_experts_are_factorized_trained_saved_and_put_back(tmp_path):
    """Llama-4's experts (two thirds of this model) kept their 3-D weights, outside every layer. They run as
    lrd_fx.moe.BatchedExperts now: exact at full rank, every expert factorized, trained, saved and loaded;
    put back as transformers' module when none of their layers is factorized."""
    from lrd_fx.moe import BatchedExperts
    model, ids = _llama4(), _ids()
    want = model(ids).logits
    full = lrd_fx.compile(model, (ids,), rank="full", progress=False)
    torch.testing.assert_close(full(ids).logits, want, rtol=1e-4, atol=1e-5)
    gm = lrd_fx.compile(model, (ids,), ratio=0.5, progress=False)
    experts = [m for _, m in gm.named_modules() if isinstance(m, BatchedExperts)]
    assert len(experts) == 2 and len(gm.lrd.stand_ins) == 2
    recs = _expert_records(gm)
    assert len(recs) == 2 * 2 * 4 and all(r.decision == "decomposed" for r in recs.values())
    assert not any("Experts" in cls for cls, *_ in gm.lrd.outside[1])
    assert gm.lrd.params_after < 0.6 * gm.lrd.params_before
    assert any("BatchedExperts" in note and "slice" in note for note in gm.lrd.notes)
    gm.train()
    gm(ids, labels=ids).loss.backward()
    assert all(layer.first.weight.grad is not None for e in experts for layer in e.down_proj)
    gm.eval()
    path = tmp_path / "m.lrd"
    lrd_fx.save(gm, path)
    torch.manual_seed(1)
    loaded = lrd_fx.load(_llama4(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, gm(ids).logits, rtol=0, atol=0)
    none = lrd_fx.compile(model, (ids,), rank="full", skip=["*.experts.*"], progress=False)
    back = none.get_submodule("model.layers.0.feed_forward.experts")
    assert type(back) is type(model.get_submodule("model.layers.0.feed_forward.experts"))
    torch.testing.assert_close(back.gate_up_proj, model.get_submodule("model.layers.0.feed_forward.experts").gate_up_proj,
                               rtol=0, atol=0)
    torch.testing.assert_close(none(ids).logits, want, rtol=1e-4, atol=1e-5)
