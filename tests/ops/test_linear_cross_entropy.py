"""eurocore.ops.linear_cross_entropy against its float64 reference in one process (the
vocabulary-parallel cases run on gloo in tests/parallel/test_vocab_parallel_head.py)."""

from __future__ import annotations

import pytest
import torch

from eurocore.ops import linear_cross_entropy, linear_cross_entropy_reference
from tests.conftest import DEVICE
from tests.helpers import assert_close_to_reference

# (tokens, hidden, vocab rows, real vocabulary, chunk): chunks with a remainder, one chunk,
# one token per chunk, padding rows.
CASES = [(37, 19, 101, 101, 8), (5, 7, 13, 13, None), (6, 3, 11, 11, 1), (29, 16, 40, 33, 7)]


def _inputs(tokens, hidden, rows, vocab, dtype, seed=0, ignored=3):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(rows, hidden, generator=gen) / hidden**0.5).to(DEVICE, dtype)
    w.requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.randperm(tokens, generator=gen)[:ignored]] = -100
    return h, w, labels.to(DEVICE)


def _loss_and_grads(fn, h, w, labels, **options):
    loss = fn(h, w, labels, **options)
    return [loss, *torch.autograd.grad(loss * 1.5, (h, w))]


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case, dtype, z_loss):
    """Loss, dhidden and dweight (padding rows: zero) against float64, with ignored tokens and
    an upstream gradient other than 1."""
    tokens, hidden, rows, vocab, chunk = case
    h, w, labels = _inputs(tokens, hidden, rows, vocab, dtype)
    options = {"vocab_size": vocab, "z_loss": z_loss}
    actual = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=chunk, **options)
    same = _loss_and_grads(linear_cross_entropy_reference, h, w, labels, **options)

    def to64(t):
        return t.detach().double().requires_grad_()

    ref = _loss_and_grads(linear_cross_entropy_reference, to64(h), to64(w), labels, **options)
    assert actual[0].dtype == torch.float32
    for name, a, s, r in zip(("loss", "dhidden", "dweight"), actual, same, ref, strict=True):
        assert_close_to_reference(a, r, s, name=f"{name} {case} {dtype}")
    assert torch.all(actual[2][vocab:] == 0)


def test_float64_equals_the_reference():
    h, w, labels = _inputs(23, 9, 31, 31, torch.float64)
    actual = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=5, z_loss=0.1)
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, labels, z_loss=0.1)
    for a, r in zip(actual, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_every_token_ignored_gives_zero_loss_and_gradients():
    h, w, labels = _inputs(4, 5, 7, 7, torch.float32)
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, torch.full_like(labels, -7),
                                   ignore_index=-7)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


def test_deterministic_and_independent_of_the_chunk_size():
    """The same bits run after run; another chunk size changes only the blocking of the
    matmuls and the order of the weight gradient's sum: equal to rounding."""
    h, w, labels = _inputs(33, 8, 21, 21, torch.float32)
    first = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=4)
    again = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=4)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    whole = _loss_and_grads(linear_cross_entropy, h, w, labels)
    for a, b in zip(first, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    """fp32 hidden and weight under bf16 autocast: the same loss as the reference on the
    bf16 casts; gradients come back in the inputs' dtypes."""
    h, w, labels = _inputs(9, 8, 12, 12, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, dh, dw = _loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=4)
    expected = linear_cross_entropy_reference(h.bfloat16(), w.bfloat16(), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert dh.dtype == dw.dtype == torch.float32


@pytest.mark.parametrize("change, error, match", [
    ({"hidden": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, "hidden: expected a float"),
    ({"hidden": torch.zeros(2, 3, 4)}, ValueError, "hidden: expected 2-D"),
    ({"weight": torch.zeros(5, 3)}, ValueError, "weight: expected 4 columns"),
    ({"labels": torch.zeros(3)}, TypeError, "labels: expected int64 or int32"),
    ({"labels": torch.zeros(2, dtype=torch.int64)}, ValueError, r"labels: expected shape \(3,\)"),
    ({"vocab_size": 6}, ValueError, "vocab_size: expected an int in"),
    ({"z_loss": -1.0}, ValueError, "z_loss: expected a finite number"),
    ({"chunk_size": 0}, ValueError, "chunk_size: expected an int >= 1"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index: expected an int"),
])
def test_bad_inputs_name_the_argument(change, error, match):
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 4),
            "labels": torch.zeros(3, dtype=torch.int64)}
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **options)
