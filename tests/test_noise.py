"""The stream bank draws exactly what one plain ``Stream`` per key draws, however the rows are batched."""
import random

import pytest
import torch

from noisesearch.noise import CandidateNoise, NoiseSource, Stream, StreamBank, block_size, stream_seed


def reference(seeds, shape, kind, owners):
    """Plain per-stream draws: row r of each call gets the next draw of ``Stream(seeds[owner[r]])``."""
    streams = [Stream(s, shape, kind) for s in seeds]
    out = []
    for owner in owners:
        out.append(torch.stack([streams[o].take(1)[0] for o in owner]))
    return out


def random_owners(rng, n_streams, calls):
    """Calls of every layout strategies use: every stream k times (grouped), sorted subsets,
    shuffled rows, distinct streams in any order, one stream many times (past a block, more than one
    block)."""
    owners = []
    for _ in range(calls):
        mode = rng.random()
        if mode < 0.3:
            owner = [o for o in range(n_streams) for _ in range(rng.randint(1, 9))]
        elif mode < 0.55:
            owner = sorted(rng.randrange(n_streams) for _ in range(rng.randint(1, 3 * n_streams + 2)))
        elif mode < 0.65:
            owner = [rng.randrange(n_streams) for _ in range(rng.randint(1, 3 * n_streams + 2))]
        elif mode < 0.8:  # distinct streams in any order (a tree search's rows, ordered by depth)
            owner = rng.sample(range(n_streams), rng.randint(1, n_streams))
        else:
            owner = [rng.randrange(n_streams)] * rng.randint(1, 150)
        owners.append(owner)
    return owners


@pytest.mark.parametrize("shape,kind", [((1, 8, 8), "normal"), ((3,), "normal"), ((), "uniform"), ((5,), "uniform"),
                                        ((20000,), "normal")])
def test_bank_draws_what_plain_streams_draw(shape, kind):
    rng = random.Random(hash((shape, kind)) % 1000)
    for n_streams in (1, 4, 23):
        seeds = [stream_seed(3, i, 0) for i in range(n_streams)]
        owners = random_owners(rng, n_streams, 30)
        bank = StreamBank(seeds, shape, kind)
        got = [bank.take(torch.tensor(o).numpy()) for o in owners]
        for g, want, o in zip(got, reference(seeds, shape, kind, owners), owners):
            assert g.shape == (len(o), *shape)
            assert g.dtype == (torch.float32 if kind == "normal" else torch.float64)
            assert torch.equal(g, want)


def test_bank_takes_larger_than_a_block_and_copies():
    shape = (1 << 15,)  # 32 draws per block
    assert block_size(shape) == 32
    seeds = [11, 12]
    bank, plain = StreamBank(seeds, shape), [Stream(s, shape) for s in seeds]
    first = bank.take([0] * 70 + [1] * 5)  # stream 0 runs through three blocks in one call
    kept = first.clone()
    assert torch.equal(first, torch.cat([plain[0].take(70), plain[1].take(5)]))
    later = bank.take([1] * 40 + [0] * 30)  # refills in place: what was returned before is unchanged
    assert torch.equal(first, kept)
    assert torch.equal(later[:40], plain[1].take(40)) and torch.equal(later[40:], plain[0].take(30))


def test_bank_refuses_bad_rows():
    bank = StreamBank([1, 2], (2,))
    with pytest.raises(ValueError):
        bank.take([])
    with pytest.raises(IndexError):
        bank.take([0, 2])
    with pytest.raises(IndexError):
        bank.take([-1])


def test_noise_source_streams_match_plain_streams():
    keys = [(p, k) for p in range(3) for k in range(2)]
    src = NoiseSource(9, (1, 4, 4), keys)
    normals = [Stream(stream_seed(9, *k), (1, 4, 4)) for k in keys]
    uniforms = [Stream(stream_seed(9, *k, -1), (), "uniform") for k in keys]
    rng = random.Random(1)
    for owner in random_owners(rng, len(keys), 40):
        t = torch.tensor(owner)
        assert torch.equal(src.normal(t), torch.stack([normals[o].take(1)[0] for o in owner]))
        u = src.uniform(t, torch.float64)
        assert u.dtype == torch.float64
        assert torch.equal(u, torch.stack([uniforms[o].take(1)[0] for o in owner]))


def test_candidate_noise_matches_plain_streams():
    keys = [(0, 0, j) for j in range(5)] + [(1, 0, j) for j in range(5)]
    cn = CandidateNoise(4, (2, 3), keys)
    plain = [Stream(stream_seed(4, *k), (2, 3)) for k in keys]
    assert torch.equal(cn.draw(), torch.stack([p.take(1)[0] for p in plain]))
    rows = [7, 2, 2, 9, 0]  # a pruned set, one row twice, out of order
    assert torch.equal(cn.draw(rows), torch.stack([plain[r].take(1)[0] for r in rows]))
    assert torch.equal(cn.draw(torch.tensor(rows)), torch.stack([plain[r].take(1)[0] for r in rows]))


def test_bank_one_draw_per_stream_across_blocks():
    # the common call (each stream once, in order) keeps to the plain streams' draws when a stream's
    # block runs out in the middle of it, also when the streams' blocks run out at different calls
    shape = (1 << 15,)  # 32 draws per block
    seeds = [21, 22, 23]
    bank, plain = StreamBank(seeds, shape), [Stream(s, shape) for s in seeds]
    assert torch.equal(bank.take([1] * 5), plain[1].take(5))  # stream 1 is 5 draws ahead
    for _ in range(70):
        assert torch.equal(bank.take([0, 1, 2]), torch.cat([p.take(1) for p in plain]))
    assert torch.equal(bank.take([2, 0]), torch.cat([plain[2].take(1), plain[0].take(1)]))
