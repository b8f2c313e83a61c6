"""Paged KV cache of the reference backend against its contiguous cache (the reference of the reference).

For every KV format, a batch of three right-padded prompts of different lengths is prefilled, then decoded
for a few steps with per-row positions, once with the contiguous cache and once with a paged cache whose
blocks are handed out in a scrambled order (plus a padded row on the dummy block 0). Logits must be equal.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_models):
    from qtool.runtime.backends.torch_ref import TorchRefBackend
    from qtool.runtime.loader import load_model_weights
    from qtool.runtime.model import Model
    return Model(load_model_weights(str(tiny_models("llama")), progress=False), TorchRefBackend())


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])
def test_paged_equals_contiguous(model, fmt):
    torch.manual_seed(0)
    bs, lens, steps = 4, [7, 13, 2], 5
    B, T = len(lens), max(lens)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T))
    positions = torch.arange(T).expand(B, T).contiguous()
    last = torch.tensor(lens) - 1
    total = T + steps + 1
    per_row = -(-total // bs)
    cont = model.new_cache(B, total, fmt)
    paged = model.backend.new_paged_cache(1 + B * per_row, bs, fmt, max_batch=8, max_blocks_per_seq=per_row)
    order = torch.randperm(B * per_row) + 1                  # blocks 1.. in scrambled order; 0 is the dummy
    tables = order.reshape(B, per_row).to(torch.int32)
    paged.block_tables[:B] = tables
    ref = model.forward(ids, positions, cont, last_index=last)
    got = model.forward(ids, positions, paged, last_index=last)
    assert torch.equal(ref, got)
    pos = last.clone()
    for _ in range(steps):
        tok = ref.argmax(-1)
        pos = pos + 1
        ref = model.forward(tok[:, None], pos[:, None], cont)
        got = model.forward(tok[:, None], pos[:, None], paged)
        assert torch.equal(ref, got)
    # a padded row (dummy block 0, position 0) changes nothing but the matmul's row count (float noise)
    tok, pos = ref.argmax(-1), pos + 1
    paged.block_tables[B] = 0
    got = model.forward(torch.cat([tok, torch.tensor([5])])[:, None], torch.cat([pos, torch.tensor([0])])[:, None],
                        paged)[:B]
    ref = model.forward(tok[:, None], pos[:, None], cont)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # rows really are stored where the table says: row 1's position 9 is block tables[1, 2], slot 1
    from qtool.formats import kv_decode
    k_cont = kv_decode(fmt, *(t[1, 9] for t in cont.k[0]), scale=model.backend.k_scales[0])
    k_paged = kv_decode(fmt, *(t[int(tables[1, 2]), 1] for t in paged.k[0]), scale=model.backend.k_scales[0])
    assert torch.equal(k_cont, k_paged) and k_cont.abs().sum() > 0
