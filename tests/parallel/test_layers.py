"""Tensor-parallel linear layers against one process: outputs, input and weight gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from eurocore.ops import linear_cross_entropy, linear_cross_entropy_reference
from eurocore.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    layout_independent_normal_,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from tests.parallel.launch import run_on_ranks

SEQ, BATCH, IN, OUT = 8, 3, 12, 20  # SEQ, IN and OUT divisible by 2 and 4
SEED, STD = 7, 0.5


def _full_weight() -> torch.Tensor:
    weight = torch.empty(OUT, IN, dtype=torch.float64)
    return layout_independent_normal_(weight, (OUT, IN), slice(0, OUT), slice(None), STD, SEED)


def _tensor(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_column(rank: int, world: int, sequence_parallel: bool, gather_output: bool) -> None:
    group = dist.group.WORLD
    layer = ColumnParallelLinear(IN, OUT, group, gather_output=gather_output,
                                 sequence_parallel=sequence_parallel, std=STD, seed=SEED,
                                 dtype=torch.float64)
    w = _full_weight().requires_grad_()
    x_full = _tensor(1, SEQ, BATCH, IN).requires_grad_()
    grad_full = _tensor(2, SEQ, BATCH, OUT)
    y_full = x_full @ w.t()
    y_full.backward(grad_full)

    out = slice(rank * OUT // world, (rank + 1) * OUT // world)
    seq = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    x = (x_full.detach()[seq] if sequence_parallel else x_full.detach()).clone()
    x.requires_grad_()
    y = layer(x)
    expected = y_full.detach() if gather_output else y_full.detach()[..., out]
    torch.testing.assert_close(y, expected)
    y.backward(grad_full if gather_output else grad_full[..., out])
    x_grad = x_full.grad[seq] if sequence_parallel else x_full.grad
    torch.testing.assert_close(x.grad, x_grad)
    torch.testing.assert_close(layer.weight.grad, w.grad[out])


def _check_row(rank: int, world: int, sequence_parallel: bool) -> None:
    group = dist.group.WORLD
    layer = RowParallelLinear(OUT, IN, group, sequence_parallel=sequence_parallel,
                              std=STD, seed=SEED, dtype=torch.float64)
    w = torch.empty(IN, OUT, dtype=torch.float64)
    layout_independent_normal_(w, (IN, OUT), slice(0, IN), slice(None), STD, SEED)
    w.requires_grad_()
    x_full = _tensor(3, SEQ, BATCH, OUT).requires_grad_()
    grad_full = _tensor(4, SEQ, BATCH, IN)
    y_full = x_full @ w.t()
    y_full.backward(grad_full)

    cols = slice(rank * OUT // world, (rank + 1) * OUT // world)
    seq = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    x = x_full.detach()[..., cols].clone().requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, y_full.detach()[seq] if sequence_parallel else y_full.detach())
    y.backward(grad_full[seq] if sequence_parallel else grad_full)
    torch.testing.assert_close(x.grad, x_full.grad[..., cols])
    torch.testing.assert_close(layer.weight.grad, w.grad[:, cols])


@pytest.mark.parametrize("world, sequence_parallel, gather_output", [
    (2, False, False), (2, True, False), (2, False, True), (2, True, True),
    (4, False, False), (4, True, False),
])
def test_column_parallel_equals_one_process(world, sequence_parallel, gather_output):
    run_on_ranks(_check_column, world, sequence_parallel, gather_output)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["", "sp"])
def test_row_parallel_equals_one_process(world, sequence_parallel):
    run_on_ranks(_check_row, world, sequence_parallel)


def test_initialisation_does_not_depend_on_the_slice():
    """Any row/column slice of the full matrix is what a rank holding it draws."""
    full = torch.empty(150, 9)
    layout_independent_normal_(full, (150, 9), slice(0, 150), slice(None), 1.0, 3)
    for rows, cols in ((slice(0, 75), slice(None)), (slice(75, 150), slice(None)),
                       (slice(50, 100), slice(3, 6)), (slice(130, 150), slice(0, 9))):
        height = rows.stop - rows.start
        width = len(range(9)[cols])
        part = layout_independent_normal_(torch.empty(height, width), (150, 9), rows, cols,
                                          1.0, 3)
        assert torch.equal(part, full[rows, cols])
    other = layout_independent_normal_(torch.empty(150, 9), (150, 9), slice(0, 150),
                                       slice(None), 1.0, 4)
    assert not torch.equal(other, full)


def test_sizes_not_divisible_by_tp_are_rejected(monkeypatch):
    # One process: the check is arithmetic on the group size, so fake a group of 3.
    import eurocore.parallel.layers as layers

    monkeypatch.setattr(layers, "_tp", lambda group: (3, 0))
    with pytest.raises(ValueError, match=r"^out_features: 20 is not divisible by tp = 3"):
        ColumnParallelLinear(IN, 20)
    with pytest.raises(ValueError, match=r"^in_features: 20 is not divisible by tp = 3"):
        RowParallelLinear(20, IN)


VOCAB, DIM, TOKENS = 13, 6, 10  # 13: divisible by neither 2 nor 4


def _check_embedding(rank: int, world: int, sequence_parallel: bool) -> None:
    group = dist.group.WORLD
    layer = VocabParallelEmbedding(VOCAB, DIM, group, sequence_parallel=sequence_parallel,
                                   std=STD, seed=SEED, dtype=torch.float64)
    full = torch.empty(VOCAB, DIM, dtype=torch.float64)
    layout_independent_normal_(full, (VOCAB, DIM), slice(0, VOCAB), slice(None), STD, SEED)
    full.requires_grad_()
    ids = torch.randint(0, VOCAB, (SEQ, BATCH), generator=torch.Generator().manual_seed(5))
    grad = _tensor(6, SEQ, BATCH, DIM)
    expected = torch.nn.functional.embedding(ids, full)
    expected.backward(grad)
    seq = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    out = layer(ids)
    torch.testing.assert_close(out, expected.detach()[seq] if sequence_parallel
                               else expected.detach())
    out.backward(grad[seq] if sequence_parallel else grad)
    rows = padded_vocab_size(VOCAB, world) // world
    real = max(0, min(VOCAB - rank * rows, rows))
    torch.testing.assert_close(layer.weight.grad[:real], full.grad[rank * rows:][:real])
    assert torch.equal(layer.weight.grad[real:], torch.zeros_like(layer.weight.grad[real:]))
    assert torch.equal(layer.weight.detach()[real:], torch.zeros_like(layer.weight[real:]))


def _check_cross_entropy(rank: int, world: int) -> None:
    group = dist.group.WORLD
    padded = padded_vocab_size(VOCAB, world)
    logits_full = _tensor(7, TOKENS, VOCAB).requires_grad_()
    target = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(8))
    target[[1, 4]] = -100
    expected = torch.nn.functional.cross_entropy(logits_full, target, ignore_index=-100)
    expected.backward()
    # This rank's columns of the padded logits; padding columns hold large garbage.
    padded_logits = torch.cat([logits_full.detach(), torch.full((TOKENS, padded - VOCAB), 50.0,
                                                                dtype=torch.float64)], dim=-1)
    cols = slice(rank * padded // world, (rank + 1) * padded // world)
    local = padded_logits[:, cols].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, VOCAB, group)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
    loss.backward()
    full_grad = torch.cat([logits_full.grad, torch.zeros(TOKENS, padded - VOCAB,
                                                         dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(local.grad, full_grad[:, cols], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["", "sp"])
def test_vocab_parallel_embedding_equals_one_process(world, sequence_parallel):
    run_on_ranks(_check_embedding, world, sequence_parallel)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(world):
    run_on_ranks(_check_cross_entropy, world)


def _check_head(rank: int, world: int) -> None:
    """The head's loss (fused linear-CE, and the logits + vocab_parallel_cross_entropy
    path) and its input and weight gradients, against F.cross_entropy on one process, with
    and without SP; then the op itself with a z-loss and small chunks."""
    group = dist.group.WORLD
    full = torch.empty(VOCAB, DIM, dtype=torch.float64)
    layout_independent_normal_(full, (VOCAB, DIM), slice(0, VOCAB), slice(None), STD, SEED)
    full.requires_grad_()
    x_full = _tensor(10, SEQ, BATCH, DIM).requires_grad_()
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=torch.Generator().manual_seed(11))
    labels[2, 1] = labels[5, 0] = -100
    expected = torch.nn.functional.cross_entropy((x_full @ full.t()).reshape(-1, VOCAB),
                                                 labels.reshape(-1))
    expected.backward()
    rows = padded_vocab_size(VOCAB, world) // world
    real = max(0, min(VOCAB - rank * rows, rows))
    seq = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    for sequence_parallel in (False, True):
        for fused in (True, False):
            head = VocabParallelHead(VOCAB, DIM, group, sequence_parallel=sequence_parallel,
                                     std=STD, seed=SEED, dtype=torch.float64)
            x = x_full.detach()[seq] if sequence_parallel else x_full.detach()
            x.requires_grad_()
            loss = head(x, labels, fused=fused)
            what = f"sp {sequence_parallel}, fused {fused}"
            # the unfused path computes its softmax in fp32: fp32's tolerances there
            close = {} if fused else {"rtol": 1e-5, "atol": 1e-6}
            torch.testing.assert_close(loss.double(), expected, msg=what, **close)
            loss.backward()
            expected_x = x_full.grad[seq] if sequence_parallel else x_full.grad
            torch.testing.assert_close(x.grad, expected_x, msg=what, **close)
            torch.testing.assert_close(head.weight.grad[:real], full.grad[rank * rows:][:real],
                                       msg=what, **close)
            assert not head.weight.grad[real:].any()
    # the op on its own: a z-loss, chunks of 3 tokens, this rank's rows of the padded table
    local = torch.cat([full.detach(), full.new_zeros(rows * world - VOCAB, DIM)])
    local = local[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    hidden = x_full.detach().reshape(-1, DIM).clone().requires_grad_()
    loss = linear_cross_entropy(hidden, local, labels.reshape(-1), group=group,
                                vocab_size=VOCAB, z_loss=0.1, chunk_size=3)
    loss.backward()
    dist.all_reduce(hidden.grad, group=group)  # the caller's sum of the partial gradients
    ref_w = full.detach().clone().requires_grad_()
    ref_h = hidden.detach().clone().requires_grad_()
    ref = linear_cross_entropy_reference(ref_h, ref_w, labels.reshape(-1), z_loss=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(local.grad[:real], ref_w.grad[rank * rows:][:real])


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_head_equals_one_process(world):
    run_on_ranks(_check_head, world)


def test_cross_entropy_on_one_process_and_all_ignored():
    logits = _tensor(9, 5, VOCAB).requires_grad_()
    target = torch.tensor([0, 12, -100, 3, 7])
    loss = vocab_parallel_cross_entropy(logits, target, VOCAB)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target).float())
    ignored = vocab_parallel_cross_entropy(logits, torch.full((5,), -100), VOCAB)
    assert ignored.item() == 0.0


def test_padded_vocab_size():
    assert padded_vocab_size(128000, 8) == 128000  # EuroLLM: 125 x 1024, no padding
    assert padded_vocab_size(128256, 8, multiple=128) == 129024  # Llama 3: 126 x 1024
    assert padded_vocab_size(128256, 3) == 128256 and padded_vocab_size(128257, 3) == 128259
    assert padded_vocab_size(13, 4) == 16 and padded_vocab_size(13, 1) == 13


def test_fused_column_parts_are_their_own_matrices():
    """One process: a fused (q, k) layer holds the two parts as initialised on their own,
    and split_output cuts its output back into them."""
    fused = ColumnParallelLinear(IN, 12 + 8, output_sizes=(12, 8), std=STD, seed=SEED,
                                 dtype=torch.float64)
    q = ColumnParallelLinear(IN, 12, std=STD, seed=SEED, dtype=torch.float64)
    k = ColumnParallelLinear(IN, 8, std=STD, seed=SEED + 1, dtype=torch.float64)  # 1 block
    torch.testing.assert_close(fused.weight, torch.cat([q.weight, k.weight]), rtol=0, atol=0)
    x = _tensor(4, 5, 2, IN)
    out_q, out_k = fused.split_output(fused(x))
    torch.testing.assert_close(out_q, q(x))
    torch.testing.assert_close(out_k, k(x))
    with pytest.raises(ValueError, match=r"^output_sizes\b"):
        ColumnParallelLinear(IN, 21, output_sizes=(12, 8))
