"""The Llama-style model: every TP / SP layout computes what one process computes (loss and
every gradient, fp32), packed documents stay apart, bad layouts fail at start-up."""

from __future__ import annotations

import math

import pytest
import torch

from eurocore.model import LlamaModel, ModelConfig, PackedBatch, preset
from eurocore.parallel import ParallelGroups
from tests.parallel.launch import run_on_ranks

SEQ, BATCH = 20, 3  # SEQ divisible by 2 and 4 (sequence parallelism)


def _config(**overrides) -> ModelConfig:
    return preset("tiny", max_seq_len=64, **overrides)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, labels and position_ids: rows of two or three packed documents; the label of
    each document's last token is ignored (-100)."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    lengths = [(7, 13), (SEQ,), (5, 9, 6)]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = torch.roll(tokens, -1, dims=1)
    ends = torch.roll(positions, -1, dims=1) == 0  # the next token starts a document
    labels[ends] = -100
    return tokens, labels, positions


def _shard(module: torch.nn.Module, full: torch.Tensor) -> torch.Tensor:
    return module.local_shard(full) if hasattr(module, "local_shard") else full


def _check_matches_one_process(rank: int, world: int, variants: list[dict]) -> None:
    groups = ParallelGroups.build(tp=world)
    for variant in variants:
        sp, tied = variant["sequence_parallel"], variant["tie_embeddings"]
        config = _config(tie_embeddings=tied)
        tokens, labels, positions = _batch(config.vocab_size)
        reference = LlamaModel(config)
        ref_loss = reference(tokens, labels, position_ids=positions)
        ref_loss.backward()
        model = LlamaModel(config, groups, sequence_parallel=sp)
        loss = model(tokens, labels, position_ids=positions)
        loss.backward()
        where = f"tp={world} sp={sp} tied={tied} rank {rank}"
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0,
                                   msg=lambda m, w=where: f"{w}: {m}")
        ref_params = dict(reference.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        assert names == list(ref_params), where
        for name, param in model.named_parameters():
            module = model.get_submodule(name.rpartition(".")[0])
            full = ref_params[name]
            # the same initial weights, whatever the layout
            torch.testing.assert_close(param.detach(), _shard(module, full.detach()), rtol=0,
                                       atol=0, msg=lambda m, n=name, w=where: f"{w} {n}: {m}")
            scale = full.grad.abs().max().item()
            torch.testing.assert_close(param.grad, _shard(module, full.grad), rtol=1e-5,
                                       atol=1e-6 * scale,
                                       msg=lambda m, n=name, w=where: f"{w} grad {n}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_model_matches_one_process(world):
    variants = [{"sequence_parallel": sp, "tie_embeddings": False} for sp in (False, True)]
    if world == 2:
        variants.append({"sequence_parallel": True, "tie_embeddings": True})
    run_on_ranks(_check_matches_one_process, world, variants)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_loss_equals_the_logits_path(tied):
    """The default loss (linear cross-entropy, no logits kept) against the head's logits and
    vocab_parallel_cross_entropy: the loss and every gradient."""
    config = _config(tie_embeddings=tied)
    tokens, labels, positions = _batch(config.vocab_size)
    results = []
    for fused in (True, False):
        model = LlamaModel(config, fused_loss=fused)
        loss = model(tokens, labels, position_ids=positions)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (loss, grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5,
                                   atol=1e-6 * grad.abs().max().item(), msg=name)


def test_packed_documents_do_not_see_each_other():
    """A row holding documents A and B gives B the logits B gets alone (positions restart,
    no attention across the boundary)."""
    config = _config()
    model = LlamaModel(config)
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, config.vocab_size, (1, 9), generator=gen)
    b = torch.randint(0, config.vocab_size, (1, 11), generator=gen)
    positions = torch.cat([torch.arange(9), torch.arange(11)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), position_ids=positions)
        alone_a = model(a)
        alone_b = model(b)
    torch.testing.assert_close(packed[:9], alone_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[9:], alone_b, rtol=1e-5, atol=1e-6)
    # and without position_ids the row is one document: B's logits change
    with torch.no_grad():
        one_document = model(torch.cat([a, b], dim=1))
    assert not torch.allclose(one_document[9:], alone_b, atol=1e-4)


def test_packed_batch_bounds():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    packed = PackedBatch.from_position_ids(positions, 2, 5, torch.device("cpu"))
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert packed.max_seqlen == 5
    assert packed.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^position_ids\b"):
        PackedBatch.from_position_ids(positions[:, 1:], 2, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^position_ids\b"):
        PackedBatch.from_position_ids(positions, 2, 4, torch.device("cpu"))


def test_loss_starts_near_uniform():
    """Small initial weights: the first loss is close to log(vocab)."""
    config = _config()
    tokens, labels, positions = _batch(config.vocab_size)
    loss = LlamaModel(config)(tokens, labels, position_ids=positions)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1


@pytest.mark.parametrize("tp, what", [(3, "num_heads"), (8, "num_kv_heads")])
def test_bad_tp_is_rejected_with_what_to_change(tp, what):
    with pytest.raises(ValueError, match=rf"^tp: {tp} does not divide {what} .* tp in \[1, 2, 4\]"):
        _config().check_layout(tp)


def test_sequence_parallel_needs_divisible_seq():
    with pytest.raises(ValueError, match=r"^seq_len: 10 is not divisible by tp = 4"):
        _config().check_layout(4, sequence_parallel=True, seq_len=10)


@pytest.mark.parametrize("field, value, exc", [("hidden_size", 65, ValueError),
                                               ("num_kv_heads", 3, ValueError),
                                               ("vocab_size", 0, ValueError),
                                               ("num_layers", True, TypeError)])
def test_bad_config_is_rejected(field, value, exc):
    with pytest.raises(exc, match=rf"^{field}\b"):
        _config(**{field: value})


def test_preset_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"^preset\b"):
        preset("gpt-5")
    with pytest.raises(ValueError, match=r"^hidden\b"):
        preset("tiny", hidden=3)


@pytest.mark.parametrize("name, billions", [("eurollm-9b", 9.15), ("llama3-8b", 8.03),
                                            ("llama-1b", 1.24)])
def test_presets_have_the_published_sizes(name, billions):
    config = preset(name)
    assert config.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)
    with torch.device("meta"):
        model = LlamaModel(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def _check_9b_shards_fit(rank: int, world: int) -> None:
    groups = ParallelGroups.build(tp=world)
    config = preset("eurollm-9b")
    model = LlamaModel(config, groups, sequence_parallel=True, device="meta")
    local = sum(p.numel() for p in model.parameters())
    # fp32 weights, gradients and two AdamW moments: 16 bytes per parameter
    assert local * 16 < 64 * 2**30 * 0.5, local
    assert local == pytest.approx(config.num_parameters() / world, rel=0.01)


@pytest.mark.slow
def test_9b_preset_shards_over_8_ranks_within_64_gb():
    """Each of 8 TP ranks holds 1/8 of EuroLLM-9B: with AdamW state under half of 64 GB."""
    run_on_ranks(_check_9b_shards_fit, 8)
