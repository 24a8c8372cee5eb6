"""Pipeline parallelism against one process: loss and every gradient after one step
(gloo, 2 and 4 ranks), layer splits, and the schedule runner's bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from eurocore.model import LlamaModel, preset, stage_chunks, sum_tied_embedding_grads
from eurocore.parallel import ParallelGroups
from eurocore.parallel.pipeline import run_schedule, stage_layers
from eurocore.parallel.schedules import schedule
from tests.parallel.launch import run_on_ranks

SEQ, MICRO, MICROBATCHES, LAYERS = 16, 2, 4, 4


def _microbatches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, vocab, (MICRO, SEQ), generator=gen)
        labels = torch.randint(0, vocab, (MICRO, SEQ), generator=gen)
        labels[:, -1] = -100
        positions = torch.cat([torch.arange(9), torch.arange(SEQ - 9)]).repeat(MICRO, 1)
        out.append((tokens, labels, positions))
    return out


def _check_pipeline(rank: int, world: int, variants: list[dict]) -> None:
    for variant in variants:
        tp, pp, vpp = variant["tp"], variant["pp"], variant["vpp"]
        sp, tied, name = variant["sp"], variant["tied"], variant["schedule"]
        groups = ParallelGroups.build(tp=tp, pp=pp)
        config = preset("tiny", num_layers=LAYERS, max_seq_len=SEQ, tie_embeddings=tied)
        data = _microbatches(config.vocab_size)
        reference = LlamaModel(config)
        ref_loss = sum(reference(t, lab, position_ids=pos) for t, lab, pos in data) / len(data)
        ref_loss.backward()

        chunks = stage_chunks(config, groups, num_chunks=vpp, sequence_parallel=sp)

        def forward_step(chunk, mb, x, chunks=chunks, data=data):
            tokens, labels, positions = data[mb]
            return chunks[chunk](tokens, labels, position_ids=positions, hidden_states=x)

        steps = schedule(name, groups.pp_rank, pp, MICROBATCHES, vpp)
        shape = (SEQ // tp if sp else SEQ, MICRO, config.hidden_size)
        loss = run_schedule(steps, forward_step, groups, num_chunks=vpp,
                            num_microbatches=MICROBATCHES, activation_shape=shape,
                            dtype=torch.float32, device=torch.device("cpu"))
        sum_tied_embedding_grads(chunks, groups)

        where = f"{variant} rank {rank}"
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0,
                                   msg=lambda m, w=where: f"{w}: {m}")
        ref_params = dict(reference.named_parameters(remove_duplicate=False))
        seen = set()
        for model in chunks:
            for pname, param in model.named_parameters():
                seen.add(pname)
                module = model.get_submodule(pname.rpartition(".")[0])
                full = ref_params[pname]
                expected = module.local_shard(full.grad) if hasattr(module, "local_shard") \
                    else full.grad
                torch.testing.assert_close(
                    param.grad, expected, rtol=1e-5, atol=1e-6 * full.grad.abs().max().item(),
                    msg=lambda m, n=pname, w=where: f"{w} grad {n}: {m}")
        # together the stages hold every layer exactly once
        layers = [n.split(".")[1] for n in seen if n.startswith("layers.")]
        gathered = [None] * world
        dist.all_gather_object(gathered, sorted(set(layers)))
        held = [i for ranks in gathered for i in ranks]
        assert sorted(set(held)) == [str(i) for i in range(LAYERS)], held


def _variant(tp=1, pp=2, vpp=1, sp=False, tied=False, schedule="1f1b"):
    return {"tp": tp, "pp": pp, "vpp": vpp, "sp": sp, "tied": tied, "schedule": schedule}


def test_two_stages_match_one_process():
    run_on_ranks(_check_pipeline, 2, [
        _variant(),
        _variant(schedule="all-forward-all-backward"),
        _variant(vpp=2, schedule="interleaved-1f1b"),
        _variant(tied=True),
    ])


def test_tp2_pp2_with_sequence_parallelism_matches_one_process():
    run_on_ranks(_check_pipeline, 4, [_variant(tp=2, sp=True), _variant(tp=2, tied=True)])


@pytest.mark.slow
def test_four_stages_match_one_process():
    run_on_ranks(_check_pipeline, 4, [_variant(pp=4), _variant(pp=2, vpp=2, tp=1,
                                                               schedule="interleaved-1f1b")])


def test_even_split_gives_first_and_last_stages_fewer_layers():
    assert [len(r) for r in stage_layers(30, 4)] == [7, 8, 8, 7]
    assert [len(r) for r in stage_layers(31, 4)] == [7, 8, 8, 8]
    assert [len(r) for r in stage_layers(42, 8)] == [5, 6, 6, 5, 5, 5, 5, 5]
    splits = stage_layers(42, 8)
    assert sum(len(r) for r in splits) == 42 and splits[0].start == 0 and splits[-1].stop == 42
    assert len(splits[0]) <= min(len(r) for r in splits[1:-1])
    assert [list(r) for r in stage_layers(4, 2)] == [[0, 1], [2, 3]]


def test_explicit_split_and_bad_splits():
    assert [list(r) for r in stage_layers(6, 3, [1, 3, 2])] == [[0], [1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match=r"^layers_per_stage\b"):
        stage_layers(6, 3, [1, 2, 2])
    with pytest.raises(ValueError, match=r"^num_layers\b"):
        stage_layers(2, 4)
