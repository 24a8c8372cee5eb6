"""Corpora as a token source: exact blending, epochs of shuffled documents, packing into
rows (positions, labels, no attention across documents), batches independent of the
layout, the index cache, and the start-up checks."""

from __future__ import annotations

import itertools
import os
import shutil

import numpy as np
import pytest
import torch

from eurocore.data import indexed
from eurocore.data.blend import blend, parse_data_path
from eurocore.data.corpus import CorpusSource, IndexCache, SourceSamples, pack
from eurocore.data.indexed import IndexedDataset, IndexedDatasetWriter
from eurocore.model import LlamaModel, preset
from tests.data.corpora import make_corpus, make_tokenizer


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A tokenizer and three prepared corpora of different sizes."""
    root = tmp_path_factory.mktemp("corpora")
    tokenizer = make_tokenizer(root)
    prefixes = [make_corpus(root, tokenizer, name, count, seed)
                for name, count, seed in (("big", 300, 0), ("mid", 120, 1), ("small", 20, 2))]
    return tokenizer, prefixes, root


def _source(prefixes, tmp_path, **kwargs):
    weights = kwargs.pop("weights", (0.6, 0.3, 0.1))
    data_path = [str(x) for pair in zip(weights, prefixes, strict=True) for x in pair]
    options = dict(seq_len=32, batch_size=8, seed=3, cache_dir=tmp_path / "cache")
    return CorpusSource(data_path, **{**options, **kwargs})


# --- blending -------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(0.7, 0.2, 0.1), (1, 1), (5, 3, 1, 1, 0.5), (0.999, 0.001)])
def test_every_window_of_1000_is_within_one_point_of_the_weights(weights):
    source, _ = blend(weights, 0, 40_000)
    shares = np.asarray(weights) / sum(weights)
    for start in range(0, 39_000, 487):
        counts = np.bincount(source[start:start + 1000], minlength=len(weights)) / 1000
        assert np.abs(counts - shares).max() <= 0.01, (start, counts, shares)


def test_blend_is_a_pure_function_of_the_index():
    """Any slice of the order equals the same slice computed alone, far into a run too;
    each source's samples come in order 0, 1, 2, ..."""
    weights = (0.5, 0.3, 0.2)
    source, index = blend(weights, 0, 20_000)
    for first in (0, 1, 777, 19_000):
        s, i = blend(weights, first, 1000)
        assert np.array_equal(s, source[first:first + 1000])
        assert np.array_equal(i, index[first:first + 1000])
    for d in range(3):
        assert np.array_equal(index[source == d], np.arange((source == d).sum()))
    far = blend(weights, 10**12, 64)[0]
    assert np.abs(np.bincount(far, minlength=3) / 64 - np.array(weights)).max() < 0.05


@pytest.mark.parametrize("items, message", [
    (["0.5", "a", "b"], "pairs"),
    (["a", "0.5", "b"], "a weight before every prefix"),
    (["0", "a"], "finite and > 0"),
    (["nan", "a"], "finite and > 0"),
    (["0.5", "1.0"], "W PREFIX pairs"),
    ([], "expected W1 PREFIX1"),
])
def test_data_path_syntax_errors_name_the_option(items, message):
    with pytest.raises(ValueError, match=rf"^data_path: .*{message}"):
        parse_data_path(items)


# --- the samples of one source ----------------------------------------------------------

def test_consecutive_samples_continue_the_stream_across_epochs(corpora, tmp_path):
    """Sample a ends where sample a + 1 begins (one token shared: the last label); an
    epoch reads every document once; the next epoch reads them in another order."""
    _, prefixes, _ = corpora
    dataset = IndexedDataset(prefixes[2])
    samples = SourceSamples(dataset, range(dataset.num_documents), 16, seed=5, source_id=0,
                            cache_dir=None)
    stream = []
    per_epoch = samples.tokens_per_epoch
    count = 3 * per_epoch // 16
    windows = [_window_of_sample(samples, a) for a in range(count)]
    for a in range(count - 1):
        assert windows[a][0][-1] == windows[a + 1][0][0]
        stream.extend(windows[a][0][:-1])
    first, second = samples.epoch(0)[0], samples.epoch(1)[0]
    assert sorted(first.tolist()) == list(range(dataset.num_documents))
    assert not np.array_equal(first, second)
    expected = np.concatenate([dataset.document(int(d)) for d in first])
    assert np.array_equal(np.asarray(stream[:per_epoch]), expected)


def _window_of_sample(samples: SourceSamples, sample: int):
    """The window of sample ``sample`` itself (not of a slot): bypass the slot shuffle."""
    real = samples.slot_sample
    samples.slot_sample = lambda slot: slot
    try:
        return samples.window(sample)
    finally:
        samples.slot_sample = real


def test_slots_are_a_shuffle_of_samples_in_blocks(corpora):
    _, prefixes, _ = corpora
    dataset = IndexedDataset(prefixes[1])
    samples = SourceSamples(dataset, range(dataset.num_documents), 16, seed=1, source_id=2,
                            cache_dir=None)
    block = samples.block
    served = [samples.slot_sample(k) for k in range(3 * block)]
    for b in range(3):
        assert sorted(served[b * block:(b + 1) * block]) == list(range(b * block,
                                                                      (b + 1) * block))
    assert served[:block] != list(range(block))


def test_document_starts_in_a_window(corpora):
    _, prefixes, _ = corpora
    dataset = IndexedDataset(prefixes[0])
    samples = SourceSamples(dataset, range(dataset.num_documents), 64, seed=0, source_id=0,
                            cache_dir=None)
    _order, ends = samples.epoch(0)
    _tokens, starts = _window_of_sample(samples, 0)
    boundaries = [int(e) for e in ends if int(e) < 65]
    assert starts[0] and [i for i in range(1, 65) if starts[i]] == [b for b in boundaries
                                                                   if b > 0]


# --- packing ----------------------------------------------------------------------------

def _windows():
    """Two windows of 8 + 1 tokens: documents [0..2], [3..6], [7..8]; and one document
    piece [0..4] then a document from 5."""
    first = (np.arange(9), np.array([1, 0, 0, 1, 0, 0, 0, 1, 0], bool))
    second = (np.arange(100, 109), np.array([0, 0, 0, 0, 0, 1, 0, 0, 0], bool))
    return [first, second]


def test_packing_restarts_positions_and_stops_labels_at_documents():
    batch = pack(_windows(), 8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch.tokens.tolist() == [list(range(8)), list(range(100, 108))]
    assert batch.labels.tolist() == [[1, 2, -100, 4, 5, 6, -100, 8],
                                     [101, 102, 103, 104, -100, 106, 107, 108]]


def test_packing_without_document_masking_is_one_causal_sequence():
    batch = pack(_windows(), 8, document_masking=False)
    assert batch.position_ids.tolist() == [list(range(8))] * 2
    assert batch.labels.tolist() == [list(range(1, 9)), list(range(101, 109))]


def test_a_model_on_packed_rows_equals_one_forward_per_document(corpora, tmp_path):
    """The loss of packed rows equals the token-weighted mean of each document piece run
    alone: no token attends across a document boundary, no label crosses it."""
    _tokenizer, prefixes, _ = corpora
    source = _source(prefixes, tmp_path)
    batch = source.global_batch(0)
    model = LlamaModel(preset("tiny", vocab_size=600, max_seq_len=64))
    packed = model(batch.tokens, batch.labels, position_ids=batch.position_ids)
    total, count = 0.0, 0
    for row in range(batch.tokens.shape[0]):
        starts = [*(batch.position_ids[row] == 0).nonzero().flatten().tolist(), source.seq_len]
        for begin, end in itertools.pairwise(starts):
            labels = batch.labels[row, begin:end]
            kept = int((labels != -100).sum())
            if kept:
                loss = model(batch.tokens[row:row + 1, begin:end], labels[None])
                total += loss.item() * kept
                count += kept
    assert count == int((batch.labels != -100).sum())
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


# --- the source --------------------------------------------------------------------------

def test_batches_do_not_depend_on_the_layout(corpora, tmp_path):
    """A replica's rows are its slice of the global batch: DP 2's two halves (and DP 4's
    quarters) put together are DP 1's batch, for the training and validation data."""
    _, prefixes, _ = corpora
    source = _source(prefixes, tmp_path, split="90,10")
    for step in (0, 5):
        whole = source.global_batch(step)
        for replicas in (2, 4):
            size = source.batch_size // replicas
            parts = [source.global_batch(step, slice(r * size, (r + 1) * size))
                     for r in range(replicas)]
            for name in ("tokens", "labels", "position_ids"):
                assert torch.equal(torch.cat([getattr(p, name) for p in parts]),
                                   getattr(whole, name))
    valid = source.validation_batch(1)
    assert torch.equal(torch.cat([source.validation_batch(1, slice(0, 4)).tokens,
                                  source.validation_batch(1, slice(4, 8)).tokens]), valid.tokens)


def test_the_order_is_a_pure_function_of_the_seed(corpora, tmp_path):
    _, prefixes, _ = corpora
    a, b = _source(prefixes, tmp_path), _source(prefixes, tmp_path / "other")
    c = _source(prefixes, tmp_path, seed=4)
    assert torch.equal(a.global_batch(3).tokens, b.global_batch(3).tokens)
    assert not torch.equal(a.global_batch(3).tokens, c.global_batch(3).tokens)


def test_split_keeps_validation_documents_out_of_training(corpora, tmp_path):
    _, prefixes, _ = corpora
    source = _source(prefixes[:1], tmp_path, weights=(1,), split="80,20")
    (train,), (valid,) = source.train.sources, source.valid.sources
    assert train.documents.stop == valid.documents.start
    assert valid.documents.stop == IndexedDataset(prefixes[0]).num_documents
    assert len(valid.documents) == round(0.2 * IndexedDataset(prefixes[0]).num_documents)


def test_small_sources_are_reread_in_fresh_epochs(corpora, tmp_path):
    """The smallest corpus serves 10% of a long run: several epochs, said in the log."""
    _, prefixes, _ = corpora
    source = _source(prefixes, tmp_path, planned_steps=200)
    line = source.describe()
    small = source.train.sources[2]
    epochs = small.epochs_for(int(source.train.samples_of(200 * 8)[2]))
    assert epochs > 2 and f"{epochs:.2f} epochs" in line


def test_the_cache_is_used_and_never_stale(corpora, tmp_path):
    """A second source reads the first's cached permutations; a dataset rewritten in place
    gets another cache key (never the stale arrays); a damaged cache file is recomputed."""
    tokenizer, prefixes, _ = corpora
    first = _source(prefixes, tmp_path)
    first.global_batch(0)
    IndexCache.wait()
    second = _source(prefixes, tmp_path)
    before = second.global_batch(0)
    assert all(s.cache.hits > 0 and s.cache.misses == 0 for s in second.train.sources)
    assert "indices read from the cache" in second.describe()
    # the same prefix rewritten with other documents
    prefix = make_corpus(tmp_path / "rewritten", tokenizer, "c", 50, seed=1)
    old = CorpusSource([prefix], seq_len=32, batch_size=8, seed=3, cache_dir=tmp_path / "cache")
    IndexCache.wait()
    make_corpus(tmp_path / "rewritten", tokenizer, "c", 50, seed=9)
    new = CorpusSource([prefix], seq_len=32, batch_size=8, seed=3, cache_dir=tmp_path / "cache")
    assert new.train.sources[0].cache.dir != old.train.sources[0].cache.dir
    assert new.train.sources[0].cache.misses > 0
    # a damaged cache file is recomputed
    IndexCache.wait()
    directory = second.train.sources[0].cache.dir
    for path in directory.glob("*.npy"):
        path.write_bytes(b"not an array")
    third = _source(prefixes, tmp_path)
    assert torch.equal(third.global_batch(0).tokens, before.tokens)


def test_a_read_only_cache_directory_costs_recomputation_only(corpora, tmp_path):
    _, _prefixes, _ = corpora
    cache = IndexCache(tmp_path / "file-not-dir" / "x", {"k": 1})
    (tmp_path / "file-not-dir").write_text("")
    assert cache.get("a", lambda: np.arange(3)).tolist() == [0, 1, 2]


# --- start-up checks ---------------------------------------------------------------------

def test_a_missing_prefix_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^data_path: '.*nope.idx' does not exist"):
        CorpusSource([str(tmp_path / "nope")], seq_len=8, batch_size=2, cache_dir=None)


def test_a_corpus_of_one_token_documents_is_refused(tmp_path):
    prefix = str(tmp_path / "ones")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for token in range(20):
            writer.add_document(np.array([token]))
    with pytest.raises(ValueError, match=r"^data_path: .* no document of 2 tokens or more"):
        CorpusSource([prefix], seq_len=8, batch_size=2, cache_dir=None)


def test_token_ids_beyond_the_vocabulary_are_refused(corpora, tmp_path):
    from eurocore.train.config import TrainConfig
    from eurocore.train.trainer import build_source

    _, prefixes, _ = corpora
    config = TrainConfig(data_path=(prefixes[0],), seq_len=32, data_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^data_path: the corpora hold token id \d+, beyond "
                                         r"the model's vocab_size 250"):
        build_source(config, config.model_config())  # tiny's 250 < the tokenizer's 500


def test_thousands_of_prefixes_stay_within_the_map_budget(corpora):
    """Opening and reading 2,000 datasets keeps at most MAX_OPEN_MAPS token files mapped,
    so file descriptors (a map holds one) stay within that budget instead of 2,000."""
    _, prefixes, _ = corpora
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    opened = [IndexedDataset(prefixes[2]) for _ in range(2000)]
    for dataset in opened:
        assert dataset.document(0).size > 0
    mapped = sum(d._tokens is not None for d in opened)
    assert mapped <= indexed.MAX_OPEN_MAPS
    if fds_before:
        assert len(os.listdir("/proc/self/fd")) <= fds_before + indexed.MAX_OPEN_MAPS + 4


# --- after review ------------------------------------------------------------------------

def test_a_warm_cache_stays_within_the_descriptor_budget(corpora, tmp_path):
    """400 prefixes, twice (the second run reads every permutation from the cache): the
    process's file descriptors stay within the map budget (cached arrays are read, not
    mapped, when small)."""
    _, prefixes, _ = corpora
    copies = []
    for i in range(400):
        prefix = tmp_path / "shards" / f"s{i}"
        prefix.parent.mkdir(exist_ok=True)
        for suffix in (".bin", ".idx"):
            os.link(prefixes[2] + suffix, str(prefix) + suffix)
        copies.append(str(prefix))
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        source = CorpusSource(copies, seq_len=16, batch_size=64, cache_dir=tmp_path / "cache")
        for step in range(3):
            source.global_batch(step)
        IndexCache.wait()
        assert len(os.listdir("/proc/self/fd")) <= fds + indexed.MAX_OPEN_MAPS + 8
    assert all(s.cache.hits and not s.cache.misses for s in source.train.sources)


def test_a_dataset_rewritten_in_place_with_its_old_size_and_mtime_is_not_stale(corpora,
                                                                               tmp_path):
    """rsync --inplace / cp -p keep size and mtime; ctime still moves: another cache key,
    and the new tokens are read."""
    tokenizer, _, _ = corpora
    prefix = make_corpus(tmp_path / "inplace", tokenizer, "c", 40, seed=1)
    before = CorpusSource([prefix], seq_len=16, batch_size=4, cache_dir=tmp_path / "cache")
    first = before.global_batch(0).tokens
    IndexCache.wait()
    stat = os.stat(prefix + ".bin")
    with open(prefix + ".bin", "rb") as f:
        data = bytearray(f.read())
    data[:] = bytes((b + 1) % 256 if i % 2 == 0 else b for i, b in enumerate(data))
    with open(prefix + ".bin", "r+b") as f:  # same size, in place
        f.write(data)
    os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    after = CorpusSource([prefix], seq_len=16, batch_size=4, cache_dir=tmp_path / "cache")
    assert after.train.sources[0].cache.dir != before.train.sources[0].cache.dir
    assert not torch.equal(after.global_batch(0).tokens, first)


def test_each_new_epoch_is_logged_once(corpora, tmp_path):
    _, prefixes, _ = corpora
    source = _source(prefixes, tmp_path)
    small = source.train.sources[2]
    per_epoch_steps = small.tokens_per_epoch / small.seq_len / (0.1 * source.batch_size)
    assert source.progress(1) == []
    lines = source.progress(int(per_epoch_steps) + 2)
    assert lines and all("begins epoch" in line for line in lines)
    assert any(small.name in line and "epoch 2" in line for line in lines)
    assert source.progress(int(per_epoch_steps) + 3) == []


def test_a_small_validation_set_is_said_to_repeat(corpora, tmp_path):
    _, prefixes, _ = corpora
    source = _source(prefixes, tmp_path, split="90,10", eval_samples=10_000)
    assert "read them" in source.describe() and "times" in source.describe()


def test_the_tokenizer_must_be_the_one_that_made_the_corpora(corpora, tmp_path):
    from eurocore.data.example import train_tokenizer
    from eurocore.train.config import TrainConfig
    from eurocore.train.trainer import build_source

    _, prefixes, _ = corpora
    other = train_tokenizer(["completely different text"] * 50, tmp_path / "other", 300)
    config = TrainConfig(data_path=(prefixes[0],), tokenizer=str(other), seq_len=32,
                         data_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^tokenizer: '.*other' is not the tokenizer that "
                                         r"made"):
        build_source(config, config.model_config())


def test_the_largest_token_is_read_once_per_version_of_the_files(corpora, tmp_path,
                                                               monkeypatch):
    """A Megatron-made dataset (no PREFIX.json): its tokens are read at the first start,
    then the cache's record answers."""
    _, prefixes, _ = corpora
    bare = tmp_path / "bare" / "d"
    bare.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(prefixes[1] + suffix, str(bare) + suffix)
    first = CorpusSource([str(bare)], seq_len=16, batch_size=4, cache_dir=tmp_path / "cache")
    largest = first.max_token_id()
    monkeypatch.setattr(IndexedDataset, "max_token", lambda self: pytest.fail("read again"))
    again = CorpusSource([str(bare)], seq_len=16, batch_size=4, cache_dir=tmp_path / "cache")
    assert again.max_token_id() == largest
