"""The per-layer accounting benchmark on a tiny layer: the saved-tensor counter itself, the
measured activation bytes against the exact Llama-adjusted count (no, selective and full
recomputation), how they split over two ranks with sequence parallelism, the goals, the
output layer + loss, and the collectives of one forward + backward (two gloo processes)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eurocore.benchmarks import parallel_accounting as pa
from eurocore.model.config import preset

SEQ, BATCH = 16, 1
# hidden 64, 8 heads (head_dim 8), 4 kv heads, ffn 176: every term of the count is distinct.
CONFIG = preset("tiny", max_seq_len=SEQ)
SETTINGS = [pa.Setting(1, False), pa.Setting(2, False), pa.Setting(2, True),
            *(pa.Setting(tp, sp, recompute) for recompute in ("selective", "full")
              for tp, sp in ((1, False), (2, True)))]


@pytest.fixture(scope="module")
def all_rows() -> dict[tuple[int, bool, str], dict]:
    """One measurement per setting (t = 2 in two spawned gloo processes), by (tp, sp,
    recompute)."""
    measured = pa.measure(CONFIG, SEQ, BATCH, SETTINGS)
    return {(r["tp"], r["sequence_parallel"], r["recompute"]): r for r in measured}


@pytest.fixture(scope="module")
def rows(all_rows) -> dict[tuple[int, bool], dict]:
    """The settings without recomputation, by (tp, sp)."""
    return {(tp, sp): r for (tp, sp, recompute), r in all_rows.items() if recompute == "none"}


def test_counter_counts_each_storage_once_and_skips_parameters():
    """A saved view costs its whole storage, a storage saved twice counts once, and the
    weight (a parameter) is not an activation."""
    linear = nn.Linear(8, 6, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    counter = pa.SavedTensorCounter({"linear": linear}, list(linear.parameters()))
    with counter.active():
        y = linear(x)                    # saves x (128 bytes) and the weight (skipped)
        z = y[:, :3].sin().sum() + y.cos().sum()  # both save (views of) y: 96 bytes, once
    assert z.dim() == 0
    assert counter.by_module == {"linear": 4 * 8 * 4, "<outside>": 4 * 6 * 4}
    assert counter.total == 224


@pytest.mark.parametrize("setting", SETTINGS,
                         ids=lambda s: f"tp{s.tp}-sp{int(s.sequence_parallel)}-{s.recompute}")
def test_measured_bytes_equal_the_llama_analytic_count(all_rows, setting):
    """Exactly, module by module (each term charged to the module that first saves it)."""
    row = all_rows[(setting.tp, setting.sequence_parallel, setting.recompute)]
    analytic = pa.llama_analytic_bytes(CONFIG, SEQ, BATCH, setting.tp,
                                       setting.sequence_parallel, setting.recompute)
    assert row["activation_bytes_measured"] == sum(analytic.values())
    assert row["activation_by_module_measured"] == {k: v for k, v in analytic.items() if v}
    if setting.recompute == "full":  # checkpoint keeps the input only: nothing shared
        return
    # The rotary tables and packed positions are counted apart, never as activations.
    assert row["shared_bytes_excluded"] > 0
    if setting.recompute == "none":
        # The torch reference keeps the seq x seq scores and fp32 intermediates: more.
        assert row["activation_bytes_torch_reference"] > row["activation_bytes_measured"]


@pytest.mark.parametrize("tp, sp", [(1, False), (2, True)])
def test_recomputation_goals(all_rows, tp, sp):
    """selective keeps neither norm output nor the SwiGLU product, and with TP + SP at most
    0.75 x Megatron's 34·s·b·h/t; full keeps exactly the layer's input, 2·s·b·h(/t)."""
    sbh = SEQ * BATCH * CONFIG.hidden_size
    none, selective, full = (all_rows[(tp, sp, r)] for r in ("none", "selective", "full"))
    freed = 2 * (2 * sbh // tp) + 2 * SEQ * BATCH * CONFIG.ffn_hidden_size // tp
    assert selective["activation_bytes_measured"] == none["activation_bytes_measured"] - freed
    assert full["activation_bytes_measured"] == 2 * sbh // tp
    assert full["recompute_peak_bytes"] == none["activation_bytes_measured"]
    if sp:
        goal = 0.75 * 34 * sbh / tp
        assert selective["goal_bytes"] == goal
        assert selective["activation_bytes_measured"] <= goal and selective["meets_goal"]


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True)])
def test_the_output_layer_keeps_no_vocabulary_term(rows, tp, sp):
    """With the fused linear cross-entropy the final norm, head and loss keep exactly the
    analytic O(s·b·h) bytes, the same at twice the vocabulary; the logits path keeps
    more, growing with the vocabulary like Megatron's 4·s·b·h·(1 + v/h)."""
    out = rows[(tp, sp)]["output_layer"]
    assert out["fused"]["bytes"] == out["analytic_bytes"] == \
        sum(pa.output_layer_analytic_bytes(CONFIG, SEQ, BATCH, tp, sp).values())
    assert out["fused_double_vocab"]["bytes"] == out["fused"]["bytes"]
    logits = SEQ * BATCH * (-(-CONFIG.vocab_size // tp))  # this rank's logits, elements
    assert out["logits"]["bytes"] > out["fused"]["bytes"] + 4 * logits
    assert out["megatron_bytes"] == 4 * SEQ * BATCH * CONFIG.hidden_size * (
        1 + CONFIG.vocab_size / CONFIG.hidden_size)


def test_batch_two_saves_each_tensor_once():
    """At batch 2 the packing to batch-major tokens copies: v is its own copy, and the output
    projection takes the core's output batch-major, so nothing is saved twice: each module
    saves exactly twice what it saves at batch 1."""
    batch = 2
    row = pa.measure_setting(CONFIG, SEQ, batch, None, False)
    analytic = pa.llama_analytic_bytes(CONFIG, SEQ, batch, 1, False)
    assert row["activation_bytes_measured"] == sum(analytic.values())
    single = pa.llama_analytic_bytes(CONFIG, SEQ, 1, 1, False)
    assert {k: v for k, v in analytic.items() if v} == {k: 2 * v for k, v in single.items()
                                                        if v}
    assert "attention.out" not in row["activation_by_module_measured"]


def test_sequence_parallel_halves_every_saved_tensor(rows):
    """With SP over two ranks each rank saves exactly half of what one process saves: the
    column-parallel layers keep their input's sequence shard and gather it again in the
    backward (Megatron-LM's choice), so nothing is kept whole."""
    one, two = (rows[(1, False)]["activation_bytes_measured"],
                rows[(2, True)]["activation_bytes_measured"])
    assert rows[(2, True)]["activation_by_module_measured"]["attention.qkv"] == \
        SEQ * BATCH * CONFIG.hidden_size  # bf16 shard of seq / 2 tokens
    assert 2 * two == one
    assert two < rows[(2, False)]["activation_bytes_measured"] < one


def test_megatron_formula():
    sbh = SEQ * BATCH * CONFIG.hidden_size
    assert pa.megatron_formula_bytes(SEQ, BATCH, CONFIG.hidden_size, 1, False) == 34 * sbh
    assert pa.megatron_formula_bytes(SEQ, BATCH, CONFIG.hidden_size, 1, True) == 34 * sbh
    assert pa.megatron_formula_bytes(SEQ, BATCH, CONFIG.hidden_size, 2, False) == 22 * sbh
    assert pa.megatron_formula_bytes(SEQ, BATCH, CONFIG.hidden_size, 2, True) == 17 * sbh


def _without_norm_weights(calls: dict) -> dict:
    return {name: {"count": c["count"], "bytes": c["bytes"]} for name, c in calls.items()
            if name != pa.NORM_WEIGHT_ALL_REDUCE}


def test_collectives_with_sequence_parallelism(rows):
    """Forward: 2 all-gathers + 2 reduce-scatters of s·b·h elements, no all-reduce, as the
    paper states. Backward: their conjugates plus 2 all-gathers re-gathering the saved input
    shards of the column-parallel layers (as Megatron-LM's code does), and one all-reduce of
    h elements per RMSNorm weight."""
    row = rows[(2, True)]
    full = 2 * SEQ * BATCH * CONFIG.hidden_size  # bytes of one s·b·h bf16 tensor
    expected = {"all_gather_into_tensor": {"count": 2, "bytes": 2 * full},
                "reduce_scatter_tensor": {"count": 2, "bytes": 2 * full}}
    forward, backward = row["collectives"]["forward"], row["collectives"]["backward"]
    assert _without_norm_weights(forward) == expected == row["megatron_collectives"]["forward"]
    assert pa.NORM_WEIGHT_ALL_REDUCE not in forward
    assert _without_norm_weights(backward) == {
        "all_gather_into_tensor": {"count": 4, "bytes": 4 * full},
        "reduce_scatter_tensor": {"count": 2, "bytes": 2 * full}}
    norm = backward[pa.NORM_WEIGHT_ALL_REDUCE]
    assert (norm["count"], norm["bytes"]) == (2, 2 * 2 * CONFIG.hidden_size)
    # A ring all-gather or reduce-scatter sends (t - 1)/t of the full tensor: half at t = 2.
    assert forward["all_gather_into_tensor"]["ring_bytes"] == full


def test_collectives_without_sequence_parallelism(rows):
    """Two all-reduces of s·b·h elements forward (after the row-parallel layers) and two
    backward (before the column-parallel ones); t = 1 makes no call at all."""
    row = rows[(2, False)]
    expected = {"all_reduce": {"count": 2, "bytes": 2 * 2 * SEQ * BATCH * CONFIG.hidden_size}}
    for phase in ("forward", "backward"):
        assert _without_norm_weights(row["collectives"][phase]) == expected
        assert row["collectives"][phase].keys() == expected.keys()
        assert rows[(1, False)]["collectives"][phase] == {}


def test_cli_writes_the_json_atomically(tmp_path, capsys):
    assert pa.main(["--preset", "tiny", "--seq", str(SEQ), "--tp", "1", "--no-pipeline",
                    "--out", str(tmp_path)]) == 0
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("parallel-accounting-")
    data = json.loads(files[0].read_text())
    assert data["config"]["hidden_size"] == CONFIG.hidden_size
    assert [row["recompute"] for row in data["rows"]] == ["none", "selective", "full"]
    for row in data["rows"]:
        assert row["activation_bytes_measured"] == row["llama_analytic_bytes"]
    assert "NO" not in capsys.readouterr().out
