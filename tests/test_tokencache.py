import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffsparse import tokencache as tc
from diffsparse.runtime.backends.ort import session_options


def test_topk_chunks():
    assert tc.topk_chunks(4096, 3072) == 1
    assert tc.topk_chunks(4096, 4032) == 2           # K > 3840: split in two halves of 2016
    assert tc.topk_chunks(32760, 24570) == 7         # Wan 1.3B at 832x480x81, K = 0.75 N
    with pytest.raises(ValueError, match="cannot split"):
        tc.topk_chunks(7, 6, limit=2)


def test_top_tokens_splits_beyond_the_limit_and_exports(tmp_path):
    score = torch.randn(2, 48, generator=torch.Generator().manual_seed(0))
    idx = tc.top_tokens(score, 24, limit=10)          # 3 chunks of 16 tokens, 8 from each
    assert idx.shape == (2, 24) and idx.dtype == torch.int32
    for row, s in zip(idx, score):
        chosen = set(row.tolist())
        assert len(chosen) == 24
        for c in range(3):
            part = s[16 * c:16 * (c + 1)]
            assert chosen & set(range(16 * c, 16 * (c + 1))) == set((torch.topk(part, 8).indices + 16 * c).tolist())

    class Select(torch.nn.Module):
        def forward(self, s):
            return tc.top_tokens(s, 24, limit=10)

    path = tmp_path / "topk.onnx"
    torch.onnx.export(Select(), (score,), str(path), input_names=["s"], output_names=["i"], opset_version=18, dynamo=False)
    (onnx_idx,) = ort.InferenceSession(str(path), session_options()).run(None, {"s": score.numpy()})
    assert [sorted(r) for r in onnx_idx.tolist()] == [sorted(r) for r in idx.tolist()]


def test_value_norm_prefers_small_values():
    values = torch.ones(4, 5, 8)
    values[:, 2] *= 0.1   # token 2 has the smallest value vectors
    values[:, 4] *= 3.0
    s = tc.value_norm_score(tc.value_norms(values, halves=2))
    assert s.shape == (2, 5)
    assert int(s.argmax(1)[0]) == 2 and int(s.argmin(1)[0]) == 4
    assert torch.allclose(s.mean(1), torch.ones(2))


def _attention_map(logits: torch.Tensor) -> tc.AttentionMap:
    return tc.AttentionMap(torch.softmax(logits, -1), logits)


def test_attention_entropy():
    uniform = _attention_map(torch.full((2, 3, 4, 16), 0.7))
    peaked = torch.full((2, 3, 4, 16), -10000.0)   # PixArt's bias on a padded text token
    peaked[..., 0] = 3.0
    peaked = _attention_map(peaked)
    assert torch.allclose(tc.attention_entropy(uniform, 1), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(tc.attention_entropy(peaked, 1), torch.zeros(2, 4), atol=1e-6)
    both = tc.AttentionMap(*(torch.cat([u[:1], p[:1]]) for u, p in zip(uniform, peaked)))
    np.testing.assert_allclose(tc.attention_entropy(both, 2).numpy(), 0.5, atol=1e-6)
    # the same as -sum p log p on any map
    logits = torch.randn(2, 3, 4, 16, dtype=torch.float64) * 4
    p = torch.softmax(logits, -1)
    direct = -(p * torch.log(p)).sum(-1).mean(1) / math.log(16)
    torch.testing.assert_close(tc.attention_entropy(tc.AttentionMap(p, logits), 1), direct)


def test_bonus_margin_is_the_spatial_bonus_decision():
    """bonus_margin >= 0 exactly where spatial_bonus adds the bonus (one threshold rule)."""
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 64, generator=g, dtype=torch.float64)
    # tokens 0, 1, 8, 9 form the first tile; token 1 within the tie of token 0: both get the bonus
    score[0, 0] = 1.5
    score[0, 1] = 1.5 - 0.5 * tc.SPATIAL_TIE * 2.5
    got = tc.spatial_bonus(score, (8, 8), 2, 0.6) - score
    margin = tc.bonus_margin(score, (8, 8), 2)
    assert torch.equal(got > 0.3, margin >= 0)
    assert 0 <= float(margin[0, 1]) < tc.SPATIAL_TIE * 2.5 and float(margin[0, 0]) > 0
    assert int((margin >= 0).sum()) >= 3 * 16   # at least one per tile


def test_one_index_row_gathers_the_same_tokens_from_every_row(tmp_path):
    """Batch 1: a (1, K) index gathers along the token axis what the per-row (R, K) index gathers
    from the rows-flattened tensor; both export to ONNX and agree with PyTorch."""
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[3, 0, 15, 7]], dtype=torch.int32)
    rows = tc.rows_index(idx, 2)
    one_row = tc.gather_tokens(x, idx)
    assert torch.equal(one_row, tc.gather_tokens(x, rows))
    assert torch.equal(one_row, x[:, idx[0].long()])

    class Gather(torch.nn.Module):
        def forward(self, x, i):
            return tc.gather_tokens(x, i)

    for k, index in enumerate((idx, rows)):
        path = str(tmp_path / f"gather{k}.onnx")
        torch.onnx.export(Gather(), (x, index), path, input_names=["x", "i"], output_names=["y"], opset_version=18,
                          dynamo=False)
        (got,) = ort.InferenceSession(path, session_options()).run(None, {"x": x.numpy(), "i": index.numpy()})
        np.testing.assert_array_equal(got, one_row.numpy())


def test_one_scatter_index_serves_every_scatter_of_a_layer(tmp_path):
    """The (row, token) index built once per layer writes each row's fresh tokens where they
    belong, into caches of any trailing shape, in PyTorch and in ONNX Runtime (one ScatterND)."""
    g = torch.Generator().manual_seed(0)
    ridx = tc.rows_index(torch.tensor([[3, 0, 5]], dtype=torch.int32), 2)
    index = tc.scatter_index(ridx)
    keys, fresh = torch.randn(2, 6, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    expected = keys.clone()
    for r in range(2):
        expected[r, ridx[r].long()] = fresh[r]
    assert torch.equal(tc.scatter_tokens(keys, index, fresh), expected)
    counts, ones = torch.zeros(2, 6, 1), torch.ones(2, 3, 1)
    assert tc.scatter_tokens(counts, index, ones).squeeze(-1).tolist() == [[1, 0, 0, 1, 0, 1]] * 2

    class Scatter(torch.nn.Module):
        def forward(self, cache, i, x):
            return tc.scatter_tokens(cache, tc.scatter_index(i), x)

    path = str(tmp_path / "scatter.onnx")
    torch.onnx.export(Scatter(), (keys, ridx, fresh), path, input_names=["cache", "i", "x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    feeds = {"cache": keys.numpy(), "i": ridx.numpy(), "x": fresh.numpy()}
    (got,) = ort.InferenceSession(path, session_options()).run(None, feeds)
    np.testing.assert_array_equal(got, expected.numpy())


def test_reuse_counts_reset_where_recomputed_and_count_up_elsewhere():
    reuse = torch.tensor([[0.0, 2.0, 5.0, 1.0]])
    assert tc.next_reuse(reuse, torch.tensor([[2, 0]], dtype=torch.int32)).tolist() == [[0.0, 3.0, 0.0, 2.0]]
    assert tc.next_reuse(reuse, None).tolist() == [[1.0, 3.0, 6.0, 2.0]]


def test_spatial_bonus_goes_to_each_tile_maximum():
    score = torch.tensor([[1.0, 2.0, 0.5, 0.5,
                           0.0, 1.5, 0.5, 0.5]])  # a 2x4 grid: two 2x2 tiles, the second all tied
    got = tc.spatial_bonus(score, (2, 4), 2, 0.6)
    assert torch.allclose(got - score, torch.tensor([[0.0, 0.6, 0.6, 0.6, 0.0, 0.0, 0.6, 0.6]]))
