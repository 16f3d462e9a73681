"""Sharded token files: the writer's shards, index and joining state; the reader as one array."""

import numpy as np

from llmctl.corpus import Cursor
from llmctl.shards import Index, ShardWriter, Tokens


def test_writer_joins_documents_with_one_eos_and_cuts_shards_only_when_full(tmp_path):
    w = ShardWriter(tmp_path, np.uint16, 4, eos_id=0)
    w.add([5, 6], doc_end=False)
    w.add([7], doc_end=True)  # document 1: 5 6 7
    assert not w.flush_if_full(Cursor(0, 1), 10)  # 3 < 4 ids: no shard yet
    w.add([], doc_end=True)  # an empty document leaves nothing
    w.add([8, 9], doc_end=True)  # document 2, after one <eos>
    assert w.flush_if_full(Cursor(0, 3), 20)
    w.add([3], doc_end=True)
    index = w.close(Cursor(1, 0), 30)
    assert [s.tokens for s in index.shards] == [6, 2] and index.docs == 3
    assert index.shards[0].need_eos and not index.shards[0].doc_open  # the <eos> of document 2 goes in shard 1
    tokens = Tokens.open(tmp_path, [s.name for s in index.shards], index.dtype)
    assert tokens[:].tolist() == [5, 6, 7, 0, 8, 9, 0, 3]
    again = Index.load(tmp_path)
    assert again.tokens == 8 and again.shards[1].cursor == {"file": 1, "pos": 0}
    # documents start at the first token and at each separating <eos> (the one opening shard 1 included)
    assert tokens.doc_starts().tolist() == [0, 3, 6]
    assert tokens.range(2, 8).doc_starts().tolist() == [0, 1, 4] and tokens.range(4, 6).doc_starts().tolist() == [0]
    (tmp_path / "shard-00001.bin.starts").unlink()  # a cache prepared before starts were recorded
    assert Tokens.open(tmp_path, [s.name for s in index.shards], index.dtype).doc_starts() is None


def test_a_piece_larger_than_the_buffer_goes_into_one_shard(tmp_path):
    w = ShardWriter(tmp_path, np.uint16, 1024, eos_id=0)
    big = [1 + i % 60000 for i in range(200_000)]
    w.add(big[:500], doc_end=False)
    w.add(big[500:], doc_end=True)  # past the buffer of shard_tokens + 64k
    w.flush_if_full(Cursor(1, 0), 0)
    w.add([7], doc_end=True)
    index = w.close(Cursor(2, 0), 0)
    t = Tokens.open(tmp_path, [s.name for s in index.shards], index.dtype)
    assert t[:].tolist() == big + [0, 7] and [s.tokens for s in index.shards] == [len(big), 2]


def test_tokens_read_across_shards_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 60000, size=1000).astype(np.uint16)
    names = []
    for i, (a, b) in enumerate([(0, 100), (100, 101), (101, 600), (600, 1000)]):
        names.append(f"shard-{i:05d}.bin")
        whole[a:b].astype("<u2").tofile(tmp_path / names[-1])
    t = Tokens.open(tmp_path, names, "uint16")
    assert len(t) == 1000 and t.dtype == np.uint16
    for a, b in [(0, 1000), (95, 105), (100, 101), (99, 700), (600, 600), (999, 1000), (0, 5)]:
        assert np.array_equal(t[a:b], whole[a:b]), (a, b)
    assert t[-1] == whole[-1] and t[100] == whole[100]
    part = t.range(90, 610)  # a split: a view of a range
    assert len(part) == 520 and np.array_equal(part[5:515], whole[95:605]) and np.array_equal(np.asarray(part),
                                                                                               whole[90:610])
