"""The shared Mosaic GPU pieces (`pallas_kernels/gpu/mosaic/common.py`) in one small kernel:
per chunk, ((q k^T) * decay) @ v with the decay matrix formed in-kernel from `token_vectors`.
Run on CPU in the Mosaic GPU interpreter and lowered for CUDA (layout inference runs there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import prepare
from pallas_kernels.gpu.mosaic import common as mc

C = mc.CHUNK


def _decayed_products(q, k, v, tv, interpret):
    B, Tp, H, K = q.shape
    V = v.shape[-1]

    def body(q_ref, k_ref, v_ref, g_ref, r_ref, o_ref, q_s, k_s, v_s, g_s, r_s, a_s, o_s, bar):
        b, n, h = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("h")
        rows = pl.ds(n * C, C)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, bar)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, 0], k_s, bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, 0], v_s, bar)
        for i in range(2):  # one copy per register layout (rows, columns)
            plgpu.copy_gmem_to_smem(g_ref.at[b, h, rows], g_s.at[i], bar)
            plgpu.copy_gmem_to_smem(r_ref.at[b, rows], r_s.at[i], bar)
        plgpu.barrier_wait(bar)
        sq = (C, C)
        qk = mc.matmul(q_s, k_s.T, sq)
        decay = mc.decay_matrix(plgpu.load(g_s.at[0], layout=mc.ROWS), plgpu.load(r_s.at[0], layout=mc.ROWS),
                                plgpu.load(g_s.at[1], layout=mc.COLS), plgpu.load(r_s.at[1], layout=mc.COLS),
                                sq, strict=False)
        a_s[...] = (qk * decay).astype(a_s.dtype)
        plgpu.commit_smem()
        o_s[...] = mc.matmul(a_s, v_s, (C, V)).astype(o_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    dt = q.dtype
    scratch = dict(q_s=mc.smem((C, K), dt), k_s=mc.smem((C, K), dt), v_s=mc.smem((C, V), dt),
                   g_s=plgpu.SMEM((2, C), jnp.float32), r_s=plgpu.SMEM((2, C), jnp.int32),
                   a_s=mc.smem((C, C), dt), o_s=mc.smem((C, V), dt), bar=plgpu.Barrier(num_arrivals=7))
    return mc.kernel(body, name="decayed_products", out_type=jax.ShapeDtypeStruct((B, Tp, H, V), dt),
                     scratch=scratch, grid=(B, Tp // C, H), grid_names=("b", "n", "h"),
                     interpret=interpret)(q, k, v, tv.G, tv.r)


def _inputs(T=100, H=2, K=64, V=128):
    ks = jax.random.split(jax.random.PRNGKey(7), 5)
    q = jax.random.normal(ks[0], (1, T, H, K), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, T, H, 1, K), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, T, H, 1, V), jnp.bfloat16)
    g = -jax.random.uniform(ks[3], (1, T, H)) * 0.3
    beta = jax.random.uniform(ks[4], (1, T, H, 1))
    seg = jnp.zeros((1, T), jnp.int32).at[:, 90:].set(1)  # a reset inside the second chunk
    return prepare(q, k, v, beta, g, None, seg, C)


def _check_against_numpy(x, interpret):
    tv = mc.token_vectors(x)
    o = np.asarray(_decayed_products(x.q, x.k, x.v, tv, interpret=interpret).astype(jnp.float32))
    g = np.asarray(x.g, np.float64)
    r = np.asarray(x.r)
    qf, kf, vf = (np.asarray(t.astype(jnp.float32), np.float64) for t in (x.q, x.k[:, :, :, 0], x.v[:, :, :, 0]))
    ref = np.zeros_like(o, np.float64)
    idx = np.arange(C)
    for h in range(x.q.shape[2]):
        for n in range(x.q.shape[1] // C):
            sl = slice(n * C, (n + 1) * C)
            G = np.cumsum(g[0, sl, h])
            keep = (idx[:, None] >= idx[None, :]) & (r[0, sl, None] == r[0, None, sl])
            decay = np.where(keep, np.exp(np.where(keep, G[:, None] - G[None, :], 0.0)), 0.0)
            ref[0, sl, h] = (qf[0, sl, h] @ kf[0, sl, h].T * decay) @ vf[0, sl, h]
    assert np.abs(o - ref).max() / np.abs(ref).max() < 2e-2


def test_token_vectors_and_decay_matrix_kernel_match_numpy():
    _check_against_numpy(_inputs(), interpret=True)


def test_token_vectors_chunk_factors():
    x = _inputs()
    tv = mc.token_vectors(x)
    g = np.asarray(x.g, np.float64)[0, :, 0]
    r, rm1 = np.asarray(x.r)[0], np.asarray(x.rm1)[0]
    for n in range(x.q.shape[1] // C):
        sl = slice(n * C, (n + 1) * C)
        G = np.cumsum(g[sl])
        rc, rp = r[sl][-1], rm1[sl][0]
        np.testing.assert_allclose(tv.start[0, 0, sl], np.exp(G) * (r[sl] == rp), rtol=1e-5)
        np.testing.assert_allclose(tv.end_m1[0, 0, sl], np.exp(G[-1] - G + g[sl]) * (rm1[sl] == rc), rtol=1e-5)
        np.testing.assert_allclose(tv.all[0, 0, n], np.exp(G[-1]) * (rc == rp), rtol=1e-5)


def test_kernel_lowers_for_cuda():
    x = _inputs()
    tv = mc.token_vectors(x)
    lowered = jax.jit(lambda *a: _decayed_products(*a, interpret=False)).trace(x.q, x.k, x.v, tv).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.gpu
def test_kernel_on_gpu_matches_numpy():
    _check_against_numpy(_inputs(T=300), interpret=False)
