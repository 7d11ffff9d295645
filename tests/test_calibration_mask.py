"""Calibration token mask: padding positions of tokenizer batches stay out of the layer input statistics."""
import pytest
import torch
import torch.nn as nn

import lrd_fx
from lrd_fx.factorize.whiten import LINEAR, InputStats, features
from lrd_fx.passes.calibrate import record_input_stats

tf = pytest.importorskip("transformers")

V = 96
LENGTHS = [[9, 4, 6, 2], [3, 7, 5, 8]]   # two batches of four sentences, padded to their longest


def tiny_bert():
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32)).eval()


def sentences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(1, V, (n,), generator=g) for n in batch] for batch in LENGTHS]


def padded(sents, pad="zero", seed=1):
    """Dict batches (input_ids, attention_mask); padding holds token 0 or random token ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in sents:
        t = max(len(s) for s in batch)
        if pad == "zero":
            ids = torch.zeros(len(batch), t, dtype=torch.long)
        else:
            ids = torch.randint(1, V, (len(batch), t), generator=g)
        mask = torch.zeros(len(batch), t, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def linears(model):
    return {n: (m, LINEAR) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def example(batches):
    b = batches[0]
    return (b["input_ids"][:2], b["attention_mask"][:2])


# --- the statistics ------------------------------------------------------------------------------

def test_masked_stats_equal_the_unpadded_sentences_one_by_one():
    model = tiny_bert()
    sents = sentences()
    masked, tm = record_input_stats(model, linears(model), padded(sents, "random"))
    single = [{"input_ids": s[None]} for batch in sents for s in batch]    # no padding, no mask
    ref, _ = record_input_stats(model, linears(model), single)
    tokens = sum(map(sum, LENGTHS))
    assert tm.tokens == tokens and tm.padding == sum(len(b) * max(b) for b in LENGTHS) - tokens
    assert tm.batches == 2 and "pooler.dense" not in tm.layers and len(tm.layers) == len(masked) - 1
    for name, st in masked.items():
        want = ref[name]
        # the pooler sees one [CLS] vector per sentence ([B, hidden], not [B, T, ...]): not masked, and
        # the same rows either way
        assert st.n == want.n == (8 if name == "pooler.dense" else tokens), name
        torch.testing.assert_close(st.second_moment, want.second_moment, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.mean, want.mean, rtol=1e-5, atol=1e-6)


def test_token_mask_none_records_every_position():
    model = tiny_bert()
    batches = padded(sentences(), "random")
    whole, tm = record_input_stats(model, linears(model), batches, token_mask=None)
    assert tm.tokens == tm.padding == 0 and not tm.layers and tm.note() is None
    # reference: every row of every Linear input, recorded by hand
    ref = {n: InputStats(m.in_features, LINEAR) for n, (m, _) in linears(model).items()}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: ref[n].update(features(a[0], LINEAR)))
             for n, (m, _) in linears(model).items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    masked, _ = record_input_stats(model, linears(model), batches)
    for name, st in whole.items():
        assert st.n == ref[name].n
        torch.testing.assert_close(st.second_moment, ref[name].second_moment)
    q = "encoder.layer.0.attention.self.query"
    assert whole[q].n == sum(len(b) * max(b) for b in LENGTHS) > masked[q].n
    assert not torch.allclose(whole[q].second_moment, masked[q].second_moment, rtol=1e-3)


def test_batches_without_the_mask_and_other_shapes_are_recorded_whole():
    model = tiny_bert()
    b = padded(sentences())
    no_mask = {"input_ids": b[0]["input_ids"]}                  # a dict without the key: every position
    stats, tm = record_input_stats(model, linears(model), [no_mask, b[1]])
    q = "encoder.layer.0.attention.self.query"
    assert stats[q].n == 4 * 9 + sum(LENGTHS[1])
    assert tm.batches == 1 and tm.unmasked == 1 and "without it recorded whole" in tm.note()
    # a conv and a pooled input next to a [B, T] mask: untouched
    conv = nn.Sequential(nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 6, 4))
    x = {"input": torch.randn(4, 8, 8), "attention_mask": torch.ones(4, 8)}
    x["attention_mask"][:, 5:] = 0

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv

        def forward(self, input, attention_mask):
            return self.body(input)
    m = Kw()
    stats, tm = record_input_stats(m, {"body.2": (conv[2], LINEAR)}, [x])
    assert stats["body.2"].n == 4 and not tm.layers and "no Linear input has its" in tm.note()


def test_bad_masks_raise_input_errors_naming_the_option():
    model = tiny_bert()
    b = padded(sentences())[0]
    for bad, what in [(b["attention_mask"][:, None], "shape"), (b["attention_mask"] * 2, "0 and 1"),
                      (b["attention_mask"].tolist(), "list")]:
        with pytest.raises(lrd_fx.InputError, match="calibration_token_mask='attention_mask'.*" + what):
            record_input_stats(model, linears(model), [dict(b, attention_mask=bad)])
    with pytest.raises(lrd_fx.InputError, match="calibration_token_mask"):
        lrd_fx.compile(model, example([b]), ratio=0.5, progress=False,
                       calibration=[dict(b, attention_mask=b["attention_mask"][:, None])])
    # bool and float 0/1 masks are fine
    for ok in (b["attention_mask"].bool(), b["attention_mask"].float()):
        _, tm = record_input_stats(model, linears(model), [dict(b, attention_mask=ok)])
        assert tm.tokens == sum(LENGTHS[0])


def test_config_validation():
    assert lrd_fx.Config().calibrate.token_mask == "attention_mask"
    assert lrd_fx.Config(calibration_token_mask=None).calibrate.token_mask is None
    assert lrd_fx.Config(calibration_token_mask="mask") == lrd_fx.Config(calibrate=lrd_fx.Calibration(token_mask="mask"))
    for bad in (5, "", True, ["attention_mask"]):
        with pytest.raises(lrd_fx.ConfigError, match="calibration_token_mask"):
            lrd_fx.Config(calibration_token_mask=bad)
        with pytest.raises(lrd_fx.ConfigError, match="calibration_token_mask"):
            lrd_fx.Calibration(token_mask=bad)


# --- the fitted model ------------------------------------------------------------------------------

def _fit(model, batches, mode, **kw):
    return lrd_fx.compile(model, example(batches), ratio=0.5, progress=False, calibration=batches,
                          calibration_mode=mode, **kw)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6) for k in sa)


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_fitted_model_does_not_depend_on_what_the_padding_holds(mode):
    model = tiny_bert()
    sents = sentences()
    zero, rand = padded(sents, "zero"), padded(sents, "random")
    a, b = _fit(model, zero, mode), _fit(model, rand, mode)
    assert _same(a, b)
    rep = a.lrd.report()
    tokens = sum(map(sum, LENGTHS))
    assert f"{tokens} token(s) used, {4 * 9 + 4 * 8 - tokens} padding position(s) left out" in rep
    assert all("data-aware" in r["reason"] for r in a.lrd.plan.values() if r["decision"] == "decomposed")
    # without the mask the padding enters the statistics and the fit
    c, d = _fit(model, zero, mode, calibration_token_mask=None), _fit(model, rand, mode, calibration_token_mask=None)
    assert not _same(c, d) and not _same(a, c)
    assert "padding position" not in c.lrd.report()


def test_tokenizer_batch_encodings_are_taken_like_dicts():
    """A tokenizer returns a BatchEncoding (a Mapping, not a dict): batches of them, and a single one, are
    used as keyword inputs with their mask, exactly like plain dicts."""
    model = tiny_bert()
    batches = padded(sentences(), "random")
    encodings = [tf.BatchEncoding(dict(b)) for b in batches]
    assert not isinstance(encodings[0], dict)
    assert _same(_fit(model, batches, "oneshot"), _fit(model, encodings, "oneshot"))
    one = lrd_fx.compile(model, example(batches), ratio=0.5, progress=False, calibration=encodings[0],
                         calibration_mode="oneshot")         # one batch, not iterated as its keys
    assert _same(one, _fit(model, [batches[0]], "oneshot"))
    assert "padding position(s) left out" in one.lrd.report()


@pytest.mark.parametrize("mode", ["oneshot", "sequential"])
def test_gpt2_conv1d_layers_are_fitted_to_the_data(mode):
    """HF Conv1D (GPT-2: weight stored [in, out]) records statistics and gets the data-aware fit like a
    Linear; before, it 'saw no calibration data' and kept the plain factorization."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=32)
    model = tf.GPT2Model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, V, (4, 12), generator=g)} for _ in range(6)]
    x = calib[0]["input_ids"][:2]
    kw = dict(ratio=0.3, progress=False, skip=("wte", "wpe"))
    fitted = lrd_fx.compile(model, (x,), calibration=calib, calibration_mode=mode, **kw)
    plain = lrd_fx.compile(model, (x,), **kw)
    conv1d = [n for n, r in fitted.lrd.plan.items() if r["kind"] == "Conv1D"]
    assert len(conv1d) == 8
    assert all("data-aware" in fitted.lrd.plan[n]["reason"] for n in conv1d)
    assert "saw no calibration data" not in fitted.lrd.report()

    def err(gm):
        with torch.no_grad():
            return sum(float((gm(**b).last_hidden_state - model(**b).last_hidden_state).norm()) for b in calib)
    assert err(fitted) < err(plain)
