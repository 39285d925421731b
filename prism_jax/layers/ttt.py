"""TTT-Linear baseline (Sun et al. 2024, "Learning to (learn at test time)"), mini-batch dual form.

Per head (width Dh = D / H) the hidden state is an inner linear model f(k) = k + LN(k W + b) trained
online on the self-supervised loss ||f(k_t) - v_t||^2 by gradient descent, one step per mini-batch of
`ttt_mini_batch` tokens, every gradient of a mini-batch taken at the weights (W_0, b_0) of its start:

    G_s   = dLoss/dz at z_s = k_s W_0 + b_0            (through the inner LayerNorm)
    W_t   = W_0 - (1 / (i_t + 1)) sum_{s <= t in batch} eta_s k_s^T G_s,  i_t = position in the batch
    b_t   = b_0 - (1 / (i_t + 1)) sum_{s <= t in batch} eta_s G_s
    o_t   = q_t + LN(q_t W_t + b_t)
    eta_s = ttt_base_lr * sigmoid(w_lr . x_s + b_lr) / Dh   (per head)

The next mini-batch starts from (W_t, b_t) of the last token. With mini-batch size 1 this is the
per-token explicit solver (one online GD step per token). The output goes through the same per-head
norm, SiLU gate and output projection as the other mixers; q, k, v pass a causal ShortConv.

Forms: the dual form (matmuls inside each mini-batch, `lax.scan` over chunks of one mini-batch) for
training and prefill; a token-by-token step for decoding (and `_sequential`, the readable reference).
With segment_ids the mini-batches restart at every document start and the inner weights reset there
(so a packed row equals each document alone). All forms agree exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers.common import (DTYPES, OutputHead, ShortConv, check_segment_ids, dense,
                                     document_starts, positions_in_document)

_LN_EPS = 1e-6


def _layer_norm(z, scale, bias):
    mu = jnp.mean(z, axis=-1, keepdims=True)
    xc = z - mu
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + _LN_EPS)
    return xc * rstd * scale + bias, xc * rstd, rstd


def _inner_grad(k, v, w, b, ln_scale, ln_bias):
    """dLoss/dz for f(k) = k + LN(z), z = k W + b, Loss = 0.5 ||f(k) - v||^2. k, v: [..., Dh]."""
    z = jnp.einsum("...k,...kv->...v", k, w) + b
    y, xhat, rstd = _layer_norm(z, ln_scale, ln_bias)
    dxhat = (y + k - v) * ln_scale
    return rstd * (dxhat - jnp.mean(dxhat, -1, keepdims=True)
                   - xhat * jnp.mean(dxhat * xhat, -1, keepdims=True))


class TTTLinearMixer(nn.Module):
    """TTT-Linear token mixer. config: a PrismLMConfig (d_model, num_heads, ttt_mini_batch, ttt_base_lr)."""

    config: object

    def setup(self):
        c = self.config
        D, H = c.d_model, c.num_heads
        Dh = D // H
        kw = dict(dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
        pd = DTYPES[c.param_dtype]
        self.q_proj = dense(D, ("embed", "qkv"), **kw)
        self.k_proj = dense(D, ("embed", "qkv"), **kw)
        self.v_proj = dense(D, ("embed", "qkv"), **kw)
        if c.use_short_conv:
            self.conv = ShortConv(3 * D, c.conv_kernel_size, "qkv", **kw)
        self.lr_proj = dense(H, ("embed", "heads"), use_bias=True, **kw)
        # inner-model weights: per head, the within-head axes are never sharded (None)
        self.w0 = self.param("w0", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", None, None)),
                             (H, Dh, Dh), pd)
        self.b0 = self.param("b0", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)), (H, Dh), pd)
        self.ln_scale = self.param("ln_scale", nn.with_logical_partitioning(nn.initializers.ones, ("heads", None)),
                                   (H, Dh), pd)
        self.ln_bias = self.param("ln_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
                                  (H, Dh), pd)
        self.head = OutputHead(H, Dh, D, c.norm_eps, **kw)

    # -- pieces -------------------------------------------------------------------------------------
    def _project(self, x):
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _terms(self, qkv, x):
        """q, k, v [..., H, Dh] and eta [..., H], all float32."""
        c = self.config
        H, D = c.num_heads, c.d_model
        split = lambda t: t.reshape(*t.shape[:-1], H, D // H).astype(jnp.float32)
        q, k, v = split(qkv[..., :D]), split(qkv[..., D:2 * D]), split(qkv[..., 2 * D:])
        eta = c.ttt_base_lr * jax.nn.sigmoid(self.lr_proj(x).astype(jnp.float32)) / (D // H)
        return q, k, v, eta

    def _inner_params(self):
        f = lambda p: p.astype(jnp.float32)
        return f(self.w0), f(self.b0), f(self.ln_scale), f(self.ln_bias)

    def initial_state(self, batch):
        """Inner state at a document start: (W_0, b_0, sum eta k^T G, sum eta G), leading dim B."""
        w0, b0, _, _ = self._inner_params()
        bcast = lambda p: jnp.broadcast_to(p, (batch, *p.shape))
        return {"w": bcast(w0), "b": bcast(b0), "gw": jnp.zeros((batch, *w0.shape)), "gb": jnp.zeros((batch, *b0.shape))}

    def _token_step(self, state, q, k, v, eta, pos):
        """One token. state: dict of [B, H, ...]; q, k, v: [B, H, Dh]; eta: [B, H]; pos: [B] int
        (position inside the document). Returns (o [B, H, Dh], new state)."""
        _, _, ln_scale, ln_bias = self._inner_params()
        b_size = self.config.ttt_mini_batch
        grad = _inner_grad(k, v, state["w"], state["b"], ln_scale, ln_bias)
        gw = state["gw"] + jnp.einsum("bh,bhk,bhv->bhkv", eta, k, grad)
        gb = state["gb"] + eta[..., None] * grad
        i = pos % b_size
        tau = (1.0 / (i + 1).astype(jnp.float32))[:, None]
        w_t = state["w"] - tau[..., None, None] * gw
        b_t = state["b"] - tau[..., None] * gb
        z = jnp.einsum("bhk,bhkv->bhv", q, w_t) + b_t
        o = q + _layer_norm(z, ln_scale, ln_bias)[0]
        end = (i == b_size - 1)[:, None]
        new = {"w": jnp.where(end[..., None, None], w_t, state["w"]),
               "b": jnp.where(end[..., None], b_t, state["b"]),
               "gw": jnp.where(end[..., None, None], 0.0, gw), "gb": jnp.where(end[..., None], 0.0, gb)}
        return o, new

    def _sequential(self, q, k, v, eta, segment_ids):
        """Token-by-token form with document resets (the reference for the dual form).
        Inputs [B, T, H, ...] -> (o [B, T, H, Dh], inner state after the last token)."""
        B = q.shape[0]
        starts = document_starts(segment_ids)
        pos = positions_in_document(segment_ids)
        init = self.initial_state(B)

        def step(state, xs):
            qt, kt, vt, et, st, pt = xs
            state = jax.tree.map(lambda s, i: jnp.where(st.reshape((B,) + (1,) * (s.ndim - 1)), i, s), state, init)
            return self._token_step(state, qt, kt, vt, et, pt)[::-1]

        xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, eta, starts, pos))
        final, o = jax.lax.scan(step, init, xs)
        return jnp.moveaxis(o, 0, 1), final

    def _dual(self, q, k, v, eta, segment_ids=None):
        """Mini-batch dual form. Inputs [B, T, H, ...]; segment_ids [B, T] or None.
        Returns (o [B, T, H, Dh], inner state after the last token, in the decode-cache format).

        `lax.scan` over fixed chunks of `ttt_mini_batch` tokens. Mini-batches start at each document's
        start, so a chunk can hold (a) the tail of the mini-batch open at the chunk start (anchor: the
        carried weights), (b) first mini-batches of documents that start in the chunk (anchor: the
        initial weights) and (c) the mini-batch that follows (a) in the same document (anchor: the
        weights at the end of (a), computed from (a)'s gradients first). Every gradient is taken at its
        mini-batch's anchor, so the result equals the token-by-token form exactly.
        """
        B, T, H, Dh = q.shape
        bs = self.config.ttt_mini_batch
        w_init, b_init, ln_scale, ln_bias = self._inner_params()
        n = -(-T // bs)
        pad = n * bs - T
        if segment_ids is None:
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            pos = positions_in_document(segment_ids)
        # padded tokens continue the last document with eta = 0: they change no weights, and the state
        # is read at the last real token
        pos = jnp.concatenate([pos, pos[:, -1:] + jnp.arange(1, pad + 1, dtype=jnp.int32)], axis=1)
        to_chunks = lambda a: jnp.moveaxis(
            jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(B, n, bs, *a.shape[2:]), 1, 0)
        qc, kc, vc, ec = (to_chunks(a) for a in (q, k, v, eta))  # [n, B, bs, H, ...]
        pc = jnp.moveaxis(pos.reshape(B, n, bs), 1, 0)  # [n, B, bs]
        starts = jnp.arange(n, dtype=jnp.int32) * bs
        last = jnp.full((n,), bs - 1, jnp.int32).at[-1].set((T - 1) % bs)
        causal = jnp.tril(jnp.ones((bs, bs), bool))
        idx = jnp.arange(bs, dtype=jnp.int32)

        def grad_at(z, kk, vv):
            y, xhat, rstd = _layer_norm(z, ln_scale, ln_bias)
            dxhat = (y + kk - vv) * ln_scale
            return rstd * (dxhat - jnp.mean(dxhat, -1, keepdims=True)
                           - xhat * jnp.mean(dxhat * xhat, -1, keepdims=True))

        def step(carry, xs):
            qq, kk, vv, ee, pp, c0, lst = xs  # [B, bs, H, Dh] x3, [B, bs, H], [B, bs], [], []
            w0, b0, gw, gb = carry["w"], carry["b"], carry["gw"], carry["gb"]
            i = pp % bs
            gstart = c0 + idx - i  # absolute start of each token's mini-batch
            case_b = (pp < bs) & (gstart >= c0)
            case_a = ~case_b & (gstart <= c0)
            case_c = ~case_b & (gstart > c0)
            sel = lambda m, x, y: jnp.where(m[..., None, None], x, y)
            z_carry = jnp.einsum("bshk,bhkv->bshv", kk, w0) + b0[:, None]
            z_init = jnp.einsum("bshk,hkv->bshv", kk, w_init) + b_init
            eg = ee[..., None] * grad_at(sel(case_b, z_init, z_carry), kk, vv)
            a_mask = case_a[..., None, None].astype(eg.dtype)
            w_c = w0 - (gw + jnp.einsum("bshk,bshv->bhkv", kk * a_mask, eg)) / bs
            b_c = b0 - (gb + jnp.sum(eg * a_mask, axis=1)) / bs
            z_c = jnp.einsum("bshk,bhkv->bshv", kk, w_c) + b_c[:, None]
            eg = jnp.where(case_c[..., None, None], ee[..., None] * grad_at(z_c, kk, vv), eg)
            # outputs: anchor - tau * (open partial sums (case a) + in-chunk same-mini-batch sums)
            anchor_q = sel(case_b, jnp.einsum("bthk,hkv->bthv", qq, w_init) + b_init,
                           sel(case_c, jnp.einsum("bthk,bhkv->bthv", qq, w_c) + b_c[:, None],
                               jnp.einsum("bthk,bhkv->bthv", qq, w0) + b0[:, None]))
            partial_q = jnp.einsum("bthk,bhkv->bthv", qq, gw) + gb[:, None]
            same = (gstart[:, :, None] == gstart[:, None, :]) & causal  # [B, t, s]
            attn = jnp.where(same[:, None], jnp.einsum("bthk,bshk->bhts", qq, kk) + 1.0, 0.0)
            sums_q = jnp.einsum("bhts,bshv->bthv", attn, eg) + sel(case_a, partial_q, 0.0)
            tau = 1.0 / (i + 1).astype(jnp.float32)
            o = qq + _layer_norm(anchor_q - tau[..., None, None] * sums_q, ln_scale, ln_bias)[0]
            # state after token `lst` (the chunk's last real token)
            take = lambda a: jnp.take_along_axis(a, jnp.broadcast_to(lst, (B, 1)), axis=1)[:, 0]
            l_a, l_c, l_i, l_start = take(case_a), take(case_c), take(i), take(gstart)
            in_group = ((gstart == l_start[:, None]) & (idx <= lst))[..., None, None].astype(eg.dtype)
            sum_w = jnp.einsum("bshk,bshv->bhkv", kk * in_group, eg) + jnp.where(l_a[:, None, None, None], gw, 0.0)
            sum_b = jnp.sum(eg * in_group, axis=1) + jnp.where(l_a[:, None, None], gb, 0.0)
            anchor_w = jnp.where(l_a[:, None, None, None], w0,
                                 jnp.where(l_c[:, None, None, None], w_c, w_init))
            anchor_b = jnp.where(l_a[:, None, None], b0, jnp.where(l_c[:, None, None], b_c, b_init))
            closes = (l_i == bs - 1)
            new = {"w": jnp.where(closes[:, None, None, None], anchor_w - sum_w / bs, anchor_w),
                   "b": jnp.where(closes[:, None, None], anchor_b - sum_b / bs, anchor_b),
                   "gw": jnp.where(closes[:, None, None, None], 0.0, sum_w),
                   "gb": jnp.where(closes[:, None, None], 0.0, sum_b)}
            return new, o

        final, o = jax.lax.scan(step, self.initial_state(B), (qc, kc, vc, ec, pc, starts, last))
        return jnp.moveaxis(o, 0, 1).reshape(B, n * bs, H, Dh)[:, :T], final

    # -- forward, prefill, decode -------------------------------------------------------------------
    def _sequence(self, x, segment_ids):
        c = self.config
        check_segment_ids(segment_ids, x.shape[:2], "TTTLinearMixer")
        qkv = self._project(x)
        pre = self.conv(qkv, segment_ids) if c.use_short_conv else qkv
        q, k, v, eta = self._terms(pre, x)
        if self.is_initializing():  # parameter values do not depend on the inner loop: skip it
            o, state = q, None
        else:
            o, state = self._dual(q, k, v, eta, segment_ids)
        return self.head(o.astype(DTYPES[c.dtype]), x), state, qkv

    def __call__(self, x, segment_ids=None, positions=None):
        """x: [B, T, D] -> [B, T, D]."""
        del positions
        return self._sequence(x, segment_ids)[0]

    def prefill(self, x, max_len):
        """x: [B, T, D] -> (y, cache {"conv", "w", "b", "gw", "gb"})."""
        del max_len
        y, state, qkv = self._sequence(x, None)
        if self.config.use_short_conv:
            state["conv"] = self.conv.window(qkv)
        return y, state

    def decode(self, x_t, cache, index):
        """x_t: [B, D] at position `index` -> (y_t [B, D], new cache)."""
        c = self.config
        qkv = self._project(x_t)
        new = {}
        if c.use_short_conv:
            qkv, new["conv"] = self.conv.step(qkv, cache["conv"])
        q, k, v, eta = self._terms(qkv, x_t)
        state = {key: cache[key] for key in ("w", "b", "gw", "gb")}
        pos = jnp.full((x_t.shape[0],), index, jnp.int32)
        o, state = self._token_step(state, q, k, v, eta, pos)
        new.update(state)
        return self.head(o.astype(DTYPES[c.dtype]), x_t), new
