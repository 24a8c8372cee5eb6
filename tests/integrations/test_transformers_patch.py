"""eurocore.integrations.transformers: HF Llama and Mistral patched with eurocore kernels give
the unpatched model's logits and gradients, with and without padding, and revert exactly.

Tiny random models built on the spot (no downloads), float32, batch 2, 8 tokens. The patched
model runs on the backend named by ``EUROCORE_BACKEND``: "torch" (eurocore's reference ops,
which the CPU would pick by itself) and "triton" (the kernels; on the CPU, Triton's
interpreter, set by tests/conftest.py), where a spy checks that the kernels did run.

Tolerance: rtol 1e-4, atol 1e-5, for logits and gradients alike. Both models compute in
fp32 (eps 1.2e-7) and differ only in the order of sums and where they round (online softmax,
the fused rotation rounded once, RMSNorm's reductions): on the CPU the largest difference
seen is 1e-7 on logits and 6e-7 of the largest gradient; the margin leaves room for a GPU's
fp32 reductions. A semantic slip (a window one key off, a padded key attended, a wrong
position) moves the logits by more than 1e-3, which the sensitivity checks below confirm.
"""

from __future__ import annotations

import collections

import pytest
import torch

import eurocore.integrations.transformers as integration
import eurocore.kernels.flash_attention
import eurocore.kernels.rms_norm
import eurocore.kernels.rotary
from eurocore.integrations.transformers import (
    apply_eurocore_to_llama,
    apply_eurocore_to_mistral,
    revert_eurocore_patch,
)
from eurocore.nn import LlamaRMSNorm as EurocoreRMSNorm
from tests.conftest import DEVICE

transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
modeling_mistral = pytest.importorskip("transformers.models.mistral.modeling_mistral")

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
BATCH, SEQ, VOCAB = 2, 8, 101
FAMILIES = {
    "llama": (modeling_llama, "LlamaRMSNorm", "LlamaPreTrainedModel", apply_eurocore_to_llama),
    "mistral": (modeling_mistral, "MistralRMSNorm", "MistralPreTrainedModel",
                apply_eurocore_to_mistral),
}
KERNELS = [(eurocore.kernels.rms_norm, "rms_norm_fwd"), (eurocore.kernels.rms_norm, "rms_norm_bwd"),
           (eurocore.kernels.rotary, "rotary"),
           (eurocore.kernels.flash_attention, "flash_attn_fwd"),
           (eurocore.kernels.flash_attention, "flash_attn_bwd")]


def config(family: str = "llama", **overrides):
    """A fresh tiny config (models write their attention implementation into theirs)."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "mistral":
        fields["sliding_window"] = None
        return transformers.MistralConfig(**{**fields, **overrides})
    return transformers.LlamaConfig(**{**fields, **overrides})


def build(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cls = transformers.MistralForCausalLM if family == "mistral" else transformers.LlamaForCausalLM
    return cls(config(family, **overrides)).to(DEVICE).eval()


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)
                         ).to(DEVICE)


def padding(side: str) -> torch.Tensor:
    """(2, 8) long: row 0 has 5 real tokens, row 1 has 7, padded on the given side."""
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for row, real in enumerate((5, 7)):
        if side == "right":
            mask[row, :real] = 1
        else:
            mask[row, SEQ - real:] = 1
    return mask.to(DEVICE)


def run(model, ids, mask=None, position_ids=None):
    """Logits and the gradients of the LM loss (real tokens only) with respect to the inputs
    embeddings and every parameter; no KV cache, as in training."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                labels=labels, use_cache=False)
    out.loss.backward()
    grads = {"inputs_embeds": embeds.grad}
    grads.update((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
    return out.logits.detach(), grads


def assert_same(actual, expected, mask=None):
    (logits, grads), (ref_logits, ref_grads) = actual, expected
    real = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], **TOLERANCE, msg="logits")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOLERANCE, msg=name)


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with transformers as it ships."""
    revert_eurocore_patch()
    yield
    revert_eurocore_patch()


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("EUROCORE_BACKEND", request.param)
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch) -> collections.Counter:
    """Counts the Triton launchers' calls (the kernels, not the reference ops)."""
    calls: collections.Counter = collections.Counter()
    for module, name in KERNELS:
        monkeypatch.setattr(module, name, spy(getattr(module, name),
                                              lambda *a, _name=name, **k: calls.update([_name])))
    return calls


def spy(function, record):
    """function, calling record(*args, **kwargs) first."""
    def spied(*args, **kwargs):
        record(*args, **kwargs)
        return function(*args, **kwargs)

    return spied


def assert_kernels_ran(backend: str, calls: collections.Counter) -> None:
    if backend == "triton":
        assert all(calls[name] > 0 for _, name in KERNELS), calls
    else:
        assert not calls, calls


# -------------------------------------------------------------------------------------------
# Parity: logits and gradients
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_instance_patch_matches_hf(family, backend, kernel_calls):
    model = build(family)
    ids = token_ids()
    expected = run(model, ids)
    assert FAMILIES[family][3](model) is model
    assert isinstance(model.model.layers[0].input_layernorm, EurocoreRMSNorm)
    assert isinstance(model.model.norm, EurocoreRMSNorm)
    assert model.config._attn_implementation == "eurocore"
    assert_same(run(model, ids), expected)
    assert_kernels_ran(backend, kernel_calls)


def test_llama_patch_takes_a_mistral_instance_by_its_model_type():
    model = build("mistral")
    ids = token_ids()
    expected = logits(model, ids)
    originals = _hf_objects()
    apply_eurocore_to_llama(model)
    after = _hf_objects()
    # Mistral's own module is patched (its attention looks the function up there), not Llama's.
    assert after["mistral.rope"] is not originals["mistral.rope"]
    assert after["llama.rope"] is originals["llama.rope"]
    assert model.config._attn_implementation == "eurocore"
    torch.testing.assert_close(logits(model, ids), expected, **TOLERANCE)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_class_patch_matches_hf(family, backend, kernel_calls):
    modeling, norm_name, _, apply = FAMILIES[family]
    reference = build(family)
    ids = token_ids()
    expected = run(reference, ids)
    assert apply() is None
    assert getattr(modeling, norm_name) is EurocoreRMSNorm
    model = build(family, seed=1)
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "eurocore"
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert len(norms) == 5 and all(isinstance(m, EurocoreRMSNorm) for m in norms)
    assert_same(run(model, ids), expected)
    assert_kernels_ran(backend, kernel_calls)


def test_class_patch_leaves_an_explicit_attention_choice():
    apply_eurocore_to_llama()
    cfg = config()
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "sdpa"
    assert isinstance(model.model.norm, EurocoreRMSNorm)
    assert transformers.LlamaForCausalLM(config()).config._attn_implementation == "eurocore"


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_hf_at_real_tokens(side, backend, kernel_calls):
    model = build()
    ids, mask = token_ids(), padding(side)
    expected = run(model, ids, mask)
    apply_eurocore_to_llama(model)
    assert_same(run(model, ids, mask), expected, mask)
    assert_kernels_ran(backend, kernel_calls)
    if side == "left":  # sensitivity: attending the padded keys would change the logits
        unmasked = logits(model, ids)
        assert (unmasked - expected[0])[mask.bool()].abs().max() > 1e-3


def test_packed_position_ids_match_hf_sdpa():
    """Sequences packed along rows (position ids restarting, no mask), as HF's
    DataCollatorWithFlattening makes them: attention stays within each sequence, as with HF's
    sdpa without a KV cache (run() passes use_cache=False; with a cache, sdpa ignores it)."""
    model = build()
    ids = token_ids()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]],
                                device=DEVICE)
    expected = run(model, ids, position_ids=position_ids)
    apply_eurocore_to_llama(model)
    assert_same(run(model, ids, position_ids=position_ids), expected)
    whole_rows = logits(model, ids, position_ids=position_ids.new_tensor(
        [[0, 1, 2, 3, 4, 5, 6, 7]] * BATCH))
    assert (whole_rows - expected[0]).abs().max() > 1e-3


def test_flash_attention_varlen_kwargs_are_used(monkeypatch):
    """HF's flash-attention kwargs (cu_seq_lens_q/k, max_length_q/k) for rows already
    flattened: the documents they bound, without reading position_ids."""
    model = build()
    ids = token_ids().reshape(1, BATCH * SEQ)
    position_ids = torch.cat((torch.arange(5), torch.arange(11))).to(DEVICE)[None]
    expected = run(model, ids, position_ids=position_ids)
    apply_eurocore_to_llama(model)
    monkeypatch.setattr(integration, "_packed_plan", None)  # would fail if called
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device=DEVICE)
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, position_ids=position_ids, labels=ids, use_cache=False,
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
    out.loss.backward()
    grads = {"inputs_embeds": embeds.grad}
    grads.update((name, p.grad) for name, p in model.named_parameters() if p.grad is not None)
    assert_same((out.logits.detach(), grads), expected)


@pytest.mark.parametrize("mask_side", [None, "left"])
def test_decoding_with_a_cache_matches_hf(mask_side):
    """Prefill 8 tokens, then one step through the cache: the query is bottom-right aligned
    (and, with left padding, the mask's last tokens are the queries)."""
    model = build()
    ids = token_ids()
    mask = padding(mask_side) if mask_side else torch.ones_like(ids)
    step = torch.tensor([[7], [11]], device=DEVICE)
    longer = torch.cat((mask, torch.ones_like(step)), 1)

    def decode():
        with torch.no_grad():
            prefill = model(ids, attention_mask=mask, use_cache=True)
            cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
            position_ids = (longer.cumsum(-1) - 1)[:, -1:]
            return model(step, attention_mask=longer, position_ids=position_ids, cache=cache,
                         use_cache=True).logits

    expected = decode()
    apply_eurocore_to_llama(model)
    torch.testing.assert_close(decode(), expected, **TOLERANCE)


def test_mistral_sliding_window_is_the_query_and_w_minus_1_keys_before_it(monkeypatch):
    """HF's mask keeps key j for query i when i - w < j <= i: eurocore window (w - 1, 0)."""
    window = 3
    model = build("mistral", sliding_window=window)
    ids, mask = token_ids(), padding("left")
    expected = {side: run(model, ids, m) for side, m in (("none", None), ("left", mask))}
    wider = build("mistral", sliding_window=window + 1)
    assert (logits(wider, ids) - expected["none"][0]).abs().max() > 1e-3  # w matters here

    windows = []
    for name in ("flash_attention", "flash_attention_varlen"):
        monkeypatch.setattr(integration, name, spy(
            getattr(integration, name),
            lambda *a, **k: windows.append((k["window_size"], k["causal"]))))
    apply_eurocore_to_mistral(model)
    assert_same(run(model, ids), expected["none"])
    assert_same(run(model, ids, mask), expected["left"], mask)
    assert set(windows) == {((window - 1, 0), True)}


@pytest.mark.parametrize("sliding_window, expected", [(None, (-1, -1)), (1, (0, 0)),
                                                      (4096, (4095, 0))])
def test_window_size_of_a_sliding_window(sliding_window, expected):
    assert integration._window_size(sliding_window, causal=True) == expected


@pytest.mark.parametrize("sliding_window", [0, -1, 2.5, True])
def test_a_bad_sliding_window_is_rejected(sliding_window):
    with pytest.raises(ValueError, match=r"^sliding_window\b"):
        integration._window_size(sliding_window, causal=True)


# -------------------------------------------------------------------------------------------
# Idempotence, revert, switches
# -------------------------------------------------------------------------------------------


def _hf_objects() -> dict[str, object]:
    objects = {}
    for family, (modeling, norm_name, pretrained_name, _) in FAMILIES.items():
        objects[f"{family}.norm"] = getattr(modeling, norm_name)
        objects[f"{family}.rope"] = modeling.apply_rotary_pos_emb
        pretrained = getattr(modeling, pretrained_name)
        objects[f"{family}.attn"] = pretrained.get_correct_attn_implementation
        objects[f"{family}.attn own"] = "get_correct_attn_implementation" in vars(pretrained)
    return objects


def test_patching_twice_equals_once_and_revert_restores_everything():
    originals = _hf_objects()
    model = build()
    hf_norms = {name: m for name, m in model.named_modules() if "RMSNorm" in type(m).__name__}
    ids, mask = token_ids(), padding("left")
    expected = logits(model, ids, attention_mask=mask)

    apply_eurocore_to_llama()
    apply_eurocore_to_llama(model)
    once = {name: m for name, m in model.named_modules() if name in hf_norms}
    rope = modeling_llama.apply_rotary_pos_emb
    once_logits = logits(model, ids, attention_mask=mask)
    apply_eurocore_to_llama()
    apply_eurocore_to_llama(model)
    assert modeling_llama.apply_rotary_pos_emb is rope
    assert rope.__wrapped__ is originals["llama.rope"]
    assert modeling_llama.LlamaRMSNorm is EurocoreRMSNorm
    for name, module in model.named_modules():
        if name in hf_norms:
            assert module is once[name]
            assert vars(module)[integration._NORM_ORIGINAL] is hf_norms[name]
            assert module.weight is hf_norms[name].weight
    assert torch.equal(logits(model, ids, attention_mask=mask), once_logits)
    torch.testing.assert_close(once_logits[mask.bool()], expected[mask.bool()], **TOLERANCE)

    assert revert_eurocore_patch(model) is model
    for key, original in _hf_objects().items():
        assert original is originals[key], key
    for name, module in model.named_modules():
        if name in hf_norms:
            assert module is hf_norms[name]
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, integration._ATTN_ORIGINAL)
    assert torch.equal(logits(model, ids, attention_mask=mask), expected)
    revert_eurocore_patch(model)  # twice is harmless too
    assert torch.equal(logits(model, ids, attention_mask=mask), expected)


def test_revert_turns_a_model_built_under_the_class_patch_into_hf():
    reference = build()
    ids = token_ids()
    expected = logits(reference, ids)
    apply_eurocore_to_llama()
    model = build(seed=1)
    model.load_state_dict(reference.state_dict())
    weight = model.model.norm.weight
    revert_eurocore_patch(model)
    assert type(model.model.norm) is modeling_llama.LlamaRMSNorm
    assert model.model.norm.weight is weight
    assert model.model.norm.variance_epsilon == reference.model.norm.variance_epsilon
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("off", ["rms_norm", "rope", "attention"])
def test_each_part_can_be_switched_off_alone(off):
    model = build()
    ids, mask = token_ids(), padding("right")
    expected = logits(model, ids, attention_mask=mask)
    hf_rope = modeling_llama.apply_rotary_pos_emb
    apply_eurocore_to_llama(model, **{off: False})
    patched = {
        "rms_norm": isinstance(model.model.layers[1].post_attention_layernorm, EurocoreRMSNorm),
        "rope": modeling_llama.apply_rotary_pos_emb is not hf_rope,
        "attention": model.config._attn_implementation == "eurocore",
    }
    assert patched == {part: part != off for part in patched}
    real = mask.bool()
    torch.testing.assert_close(logits(model, ids, attention_mask=mask)[real], expected[real],
                               **TOLERANCE)


@pytest.mark.parametrize("off", ["rms_norm", "rope", "attention"])
def test_each_part_can_be_switched_off_alone_in_the_class_patch(off):
    originals = _hf_objects()
    apply_eurocore_to_llama(**{off: False})
    changed = {"rms_norm": "llama.norm", "rope": "llama.rope", "attention": "llama.attn"}
    after = _hf_objects()
    assert {part: after[key] is not originals[key] for part, key in changed.items()} == {
        part: part != off for part in changed}
    assert all(after[key] is originals[key] for key in originals if key.startswith("mistral"))


# -------------------------------------------------------------------------------------------
# Refusals
# -------------------------------------------------------------------------------------------


def test_a_4d_mask_is_refused():
    model = apply_eurocore_to_llama(build())
    mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"^attention_mask: .*2-D padding mask"):
        logits(model, token_ids(), attention_mask=mask.expand(BATCH, 1, SEQ, SEQ))


def test_attention_dropout_in_training_is_refused():
    model = apply_eurocore_to_llama(build(attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match=r"^dropout\b"):
        logits(model, token_ids())
    logits(model.eval(), token_ids())  # evaluation passes no dropout


def test_other_models_and_bad_switches_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=16))
    with pytest.raises(ValueError, match=r"^model: .*'gpt2'"):
        apply_eurocore_to_llama(gpt2)
    with pytest.raises(TypeError, match=r"^rope\b"):
        apply_eurocore_to_llama(rope=1)
    assert _hf_objects()["llama.rope"] is modeling_llama.apply_rotary_pos_emb
