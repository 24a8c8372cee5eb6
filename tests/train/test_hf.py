"""Hugging Face import and export (eurocore.train.hf) against transformers itself: tiny
random Llama (tied and untied, llama3 RoPE scaling, GQA) and Mistral models built and saved
on the spot give the same logits and loss in eurocore at TP 1 and 2 and PP 2; each rank reads
only its slices of a sharded checkpoint; import -> checkpoint -> export is bit-identical and
loads in transformers with no missing or unexpected key; a model trained in eurocore and
exported gives transformers eurocore's logits; bad checkpoints are refused naming the field
or the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from eurocore.__main__ import main as eurocore_main
from eurocore.model.llama import LlamaModel
from eurocore.parallel import local_part
from eurocore.parallel.sharding import data_parallel_rows
from eurocore.train import hf
from eurocore.train.__main__ import main as train_main
from eurocore.train.distributed import Process
from eurocore.train.trainer import TrainConfig, Trainer
from tests.parallel.launch import run_on_ranks

CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SIZES = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
MODELS = {
    "llama-untied-llama3": (transformers.LlamaConfig, {"tie_word_embeddings": False,
                                                       "rope_theta": 5000.0,
                                                       "rope_scaling": LLAMA3}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True,
                                              "rope_scaling": {"rope_type": "linear",
                                                               "factor": 2.0}}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None,
                                             "tie_word_embeddings": False}),
}


def _save(directory: Path, name: str, shard: str | None = None, **changes) -> Path:
    config_class, fields = MODELS[name]
    torch.manual_seed(0)
    model_class = (transformers.MistralForCausalLM if name == "mistral"
                   else transformers.LlamaForCausalLM)
    model = model_class(config_class(**{**SIZES, **changes}, **fields)).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each model of MODELS saved with save_pretrained; "sharded": the untied Llama in
    several safetensors files with their index."""
    root = tmp_path_factory.mktemp("hf")
    paths = {name: _save(root / name, name) for name in MODELS}
    paths["sharded"] = _save(root / "sharded", "llama-untied-llama3", shard="20KB")
    assert (paths["sharded"] / hf.INDEX_FILE).exists()
    assert len(list(paths["sharded"].glob("*.safetensors"))) > 2
    return paths


TOKENS = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))


def _their_logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(TOKENS).logits  # (batch, seq, vocab)


def _our_logits(model: LlamaModel) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)[..., :SIZES["vocab_size"]].transpose(0, 1)  # (seq, batch) first


@pytest.mark.parametrize("name", MODELS)
def test_imported_logits_equal_transformers(saved, name):
    """fp32 on both sides; the differences are summation order only (about 1e-7 here)."""
    config = hf.model_config_from_hf(saved[name])
    fields = MODELS[name][1]
    assert config.tie_embeddings == fields["tie_word_embeddings"]
    if "rope_scaling" in fields:  # llama3, linear: the scaling reached the model
        assert config.rope_scaling["rope_type"] == fields["rope_scaling"]["rope_type"]
        assert config.rope_scaling["factor"] == fields["rope_scaling"]["factor"]
    model = LlamaModel(config)
    hf.load_hf_weights([model], saved[name])
    torch.testing.assert_close(_our_logits(model), _their_logits(saved[name]), rtol=1e-5,
                               atol=1e-5)


def _their_loss(directory: Path) -> float:
    logits = _their_logits(directory)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             TOKENS[:, 1:].reshape(-1)).item()


def _import_in_layout(rank: int, world: int, directory: str, layout: dict, expected: dict,
                      checkpoints: str) -> None:
    """Through the trainer (the --init-from-hf path), counting the elements each read of
    the checkpoint returns: a rank reads exactly the weights it holds, less than the
    model. TP: this rank's vocabulary columns of the logits and the loss equal
    transformers'; PP and DP (FSDP2): every parameter (its rows) equals the one process's.
    Then each layout saves a checkpoint, for an export."""
    read: list[int] = []
    original = hf.HFWeights.read

    def counting(self, name, offsets, sizes):
        piece = original(self, name, offsets, sizes)
        read.append(piece.numel())
        return piece

    hf.HFWeights.read = counting
    config = TrainConfig(init_from_hf=directory, steps=2, batch_size=2, seq_len=8,
                         data_workers=0, eval_every=0, checkpoint_dir=checkpoints, **layout)
    trainer = Trainer(config, Process(rank, world, rank, torch.device("cpu")),
                      log=lambda _: None)
    trainer.init_from_hf()
    held = sum(local_part(p).numel() for p in trainer.model.parameters())
    padding = 0
    if layout.get("tp", 1) == 2:  # 101 tokens in 2 x 51 rows: rank 1's last row of the
        tables = 1 if expected["tied"] else 2  # embedding (and of the head) is padding
        padding = rank * tables * SIZES["hidden_size"]
    assert sum(read) == held - padding, (sum(read), held, padding)
    assert sum(read) < expected["parameters"]
    one = expected["one"]
    if layout.get("tp", 1) > 1:
        (chunk,) = trainer.model
        with torch.no_grad():
            logits = chunk(TOKENS).transpose(0, 1)  # (batch, seq, this rank's 51 columns)
            first = rank * logits.shape[-1]
            real = min(logits.shape[-1], SIZES["vocab_size"] - first)
            torch.testing.assert_close(logits[..., :real],
                                       expected["logits"][..., first:first + real],
                                       rtol=1e-5, atol=1e-5)
            loss = chunk(TOKENS[:, :-1], TOKENS[:, 1:])
        assert loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    else:
        for chunk in trainer.model:
            for name, param in chunk.named_parameters():  # the last stage's tied copy too
                full = one.get(name, one["embedding.weight"])
                rows = data_parallel_rows(param)
                assert torch.equal(local_part(param), full[rows.start:rows.stop]), name
    trainer.save_checkpoint()
    trainer.checkpointer.close()


@pytest.mark.parametrize("name", ["sharded", "llama-tied", "mistral"])
@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {}], ids=["tp2", "pp2", "dp2"])
def test_imports_in_parallel_layouts_reading_only_slices(saved, tmp_path, layout, name):
    """... and the checkpoint each layout saves exports bit-identical to the original."""
    directory = saved[name]
    one = LlamaModel(hf.model_config_from_hf(directory))
    hf.load_hf_weights([one], directory)
    expected = {"loss": _their_loss(directory), "logits": _their_logits(directory),
                "one": dict(one.named_parameters()),
                "parameters": sum(p.numel() for p in one.parameters()),
                "tied": one.config.tie_embeddings}
    run_on_ranks(_import_in_layout, 2, str(directory), layout, expected,
                 str(tmp_path / "ck"))
    hf.export_hf(tmp_path / "ck", tmp_path / "out", log=lambda _: None)
    original = {}
    for file in directory.glob("*.safetensors"):
        original.update(load_file(file))
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["llama-untied-llama3", "llama-tied"])
def test_import_checkpoint_export_is_bit_identical_and_loads_in_transformers(saved, tmp_path,
                                                                             name):
    config = TrainConfig(init_from_hf=str(saved[name]), steps=2, batch_size=2, seq_len=8,
                         data_workers=0, eval_every=0, checkpoint_dir=str(tmp_path / "ck"))
    trainer = Trainer(config, CPU, log=lambda _: None)
    trainer.init_from_hf()
    trainer.save_checkpoint()
    out = tmp_path / "out"
    assert eurocore_main(["export-hf", str(tmp_path / "ck"), str(out),
                          "--max-shard-size", "0.00003"]) == 0
    assert (out / hf.INDEX_FILE).exists() and (out / "generation_config.json").exists()
    original = load_file(saved[name] / "model.safetensors")
    exported = {}
    for file in out.glob("*.safetensors"):
        exported.update(load_file(file))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(_their_logits(out), _their_logits(saved[name]), rtol=0, atol=0)


def test_a_model_trained_in_eurocore_exports_with_its_logits(saved, tmp_path):
    config = TrainConfig(init_from_hf=str(saved["mistral"]), steps=3, batch_size=2, seq_len=8,
                         data_workers=0, eval_every=0, checkpoint_dir=str(tmp_path / "ck"),
                         markov_branching=4)
    trainer = Trainer(config, CPU, log=lambda _: None)
    trainer.init_from_hf()
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    trainer.checkpointer.close()
    before = _their_logits(saved["mistral"])
    hf.export_hf(tmp_path / "ck", tmp_path / "out", log=lambda _: None)
    theirs = _their_logits(tmp_path / "out")
    assert not torch.allclose(theirs, before)  # it trained
    torch.testing.assert_close(_our_logits(trainer.model[0]), theirs, rtol=1e-5, atol=1e-5)


def test_the_command_line_starts_from_hf_weights(saved, tmp_path, capsys):
    argv = ["--init-from-hf", str(saved["llama-tied"]), "--steps", "2", "--global-batch-size",
            "2", "--seq-len", "8", "--data-workers", "0", "--eval-every", "0",
            "--output-dir", str(tmp_path / "run")]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert f"initialised from the Hugging Face checkpoint {saved['llama-tied']}" in out
    assert "eurocore train: llama-tied (Hugging Face) (" in out
    assert train_main([*argv, "--layers", "2"]) == 2
    assert "error: --layers: the model of init_from_hf is its config.json's" in \
        capsys.readouterr().err


def _edit_config(directory: Path, **changes) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _replace_tensor(directory: Path, name: str, tensor: torch.Tensor | None) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, file, metadata={"format": "pt"})


BAD = {
    "architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
                     r"^architectures: \['GPT2LMHeadModel'\] is not one of"),
    "rope-type": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn",
                                                             "factor": 4.0,
                                                             "rope_theta": 1e4}),
                  r"^rope_scaling: rope_type 'yarn' is not supported.*rope_parameters"),
    "bias": (lambda d: _edit_config(d, attention_bias=True), r"^attention_bias: True is not"),
    "window": (lambda d: _edit_config(d, sliding_window=16), r"^sliding_window: 16 is set"),
    "experts": (lambda d: _edit_config(d, num_local_experts=8), r"^num_local_experts: a mixture"),
    "shape": (lambda d: _replace_tensor(d, "model.layers.1.self_attn.k_proj.weight",
                                        torch.zeros(8, 32)),
              r"^model.layers.1.self_attn.k_proj.weight: shape \[8, 32\] in the HF checkpoint, "
              r"\[16, 32\] by its config.json"),
    "missing": (lambda d: _replace_tensor(d, "model.layers.2.mlp.up_proj.weight", None),
                r"^model.layers.2.mlp.up_proj.weight: missing from the checkpoint"),
    "unexpected": (lambda d: _replace_tensor(d, "model.layers.0.self_attn.q_proj.bias",
                                             torch.zeros(32)),
                   r"^model.layers.0.self_attn.q_proj.bias: the HF checkpoint holds tensors"),
}


@pytest.mark.parametrize("damage", BAD)
def test_a_bad_checkpoint_is_refused_naming_the_field_or_tensor(saved, tmp_path, damage):
    directory = tmp_path / "model"
    shutil.copytree(saved["llama-untied-llama3"], directory)
    harm, message = BAD[damage]
    harm(directory)
    with pytest.raises(ValueError, match=message):
        model = LlamaModel(hf.model_config_from_hf(directory))
        hf.load_hf_weights([model], directory)


def test_export_refuses_a_non_empty_out_dir_and_a_bad_shard_size(saved, tmp_path, capsys):
    config = TrainConfig(init_from_hf=str(saved["llama-tied"]), steps=2, batch_size=2,
                         seq_len=8, data_workers=0, eval_every=0,
                         checkpoint_dir=str(tmp_path / "ck"))
    Trainer(config, CPU, log=lambda _: None).save_checkpoint()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert eurocore_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "full")]) == 1
    assert "out_dir: " in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_info:
        eurocore_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "o"),
                       "--max-shard-size", "0"])
    assert exit_info.value.code == 2 and "--max-shard-size" in capsys.readouterr().err


def test_export_in_bf16_with_the_tokenizer(saved, tmp_path, capsys):
    """--dtype bfloat16 stores every weight in bf16 (config.json says so) and --tokenizer
    copies the tokenizer's files, its end-of-sequence id in both configs; transformers
    loads model and tokenizer. A tokenizer larger than the model's vocabulary is refused."""
    from eurocore.data.example import train_tokenizer

    tokenizer = train_tokenizer(["ein kleiner Text", "un petit texte", "pieni teksti"] * 20,
                                tmp_path / "tokenizer", vocab_size=300)
    model_dir = _save(tmp_path / "model", "llama-tied", vocab_size=320)
    config = TrainConfig(init_from_hf=str(model_dir), steps=2, batch_size=2, seq_len=8,
                         data_workers=0, eval_every=0, checkpoint_dir=str(tmp_path / "ck"))
    trainer = Trainer(config, CPU, log=lambda _: None)
    trainer.init_from_hf()
    trainer.save_checkpoint()
    out = tmp_path / "out"
    assert eurocore_main(["export-hf", str(tmp_path / "ck"), str(out), "--dtype", "bfloat16",
                          "--tokenizer", str(tokenizer)]) == 0
    tensors = load_file(out / "model.safetensors")
    original = load_file(model_dir / "model.safetensors")
    for key, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor,
                                                              original[key].bfloat16()), key
    written = json.loads((out / "config.json").read_text())
    eos = transformers.AutoTokenizer.from_pretrained(out).eos_token_id
    assert written["torch_dtype"] == "bfloat16" and written["eos_token_id"] == eos
    assert written["bos_token_id"] == 1  # the HF model's, carried through the checkpoint
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eos
    assert (out / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16

    small = TrainConfig(init_from_hf=str(saved["llama-tied"]), steps=2, batch_size=2,
                        seq_len=8, data_workers=0, eval_every=0,
                        checkpoint_dir=str(tmp_path / "small"))
    Trainer(small, CPU, log=lambda _: None).save_checkpoint()
    assert eurocore_main(["export-hf", str(tmp_path / "small"), str(tmp_path / "o"),
                          "--tokenizer", str(tokenizer)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer: " in err and "more than the model's vocab_size 101" in err
    with pytest.raises(ValueError, match=r"^tokenizer: .* has \d+ tokens, more than the "
                                         r"vocab_size 101 of init_from_hf's model"):
        TrainConfig(**{**small.__dict__, "tokenizer": str(tokenizer)})


LLAMA2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 176, "num_attention_heads": 8, "num_hidden_layers": 2,
          "num_key_value_heads": 8, "vocab_size": 250, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False,
          "hidden_act": "silu", "pretraining_tp": 1, "torch_dtype": "float16"}


@pytest.mark.parametrize("changes, want", [
    ({}, {"rope_theta": 10000.0, "rope_scaling": None, "num_kv_heads": 8}),  # Llama 2's form
    ({"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 5e5},
     {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
     {"rope_theta": 1e6, "rope_scaling": None}),
    ({"num_key_value_heads": None}, {"num_kv_heads": 8}),  # absent: as many as heads
])
def test_configs_in_every_form_transformers_writes(tmp_path, changes, want):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2, **changes}))
    config = hf.model_config_from_hf(tmp_path)
    for field, value in want.items():
        assert getattr(config, field) == value, field


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     r"^sliding_window: 4096 is set \(or MistralConfig's default\)"),
    ({"partial_rotary_factor": 0.5}, r"^partial_rotary_factor: 0.5 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
     r"^partial_rotary_factor: 0.25"),
    ({"attention_dropout": 0.1}, r"^attention_dropout: 0.1 is not supported"),
    ({"hidden_size": None}, r"^config.json: a size is not an integer"),
    ({"num_hidden_layers": "two"}, r"^config.json: a size is not an integer"),
    ({"head_dim": 16}, r"^head_dim: 16 is not hidden_size / num_attention_heads = 8"),
    ({"hidden_act": "gelu"}, r"^hidden_act: 'gelu' is not supported"),
])
def test_configs_eurocore_does_not_build_are_refused(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2, **changes}))
    with pytest.raises(ValueError, match=message):
        hf.model_config_from_hf(tmp_path)


def test_a_truncated_safetensors_file_is_named(saved, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(saved["sharded"], directory)
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-50])
    model = LlamaModel(hf.model_config_from_hf(directory))
    with pytest.raises(ValueError, match=rf"'.*{victim.name}' is not a readable safetensors"):
        hf.load_hf_weights([model], directory)
