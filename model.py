"""SAIL-VL2: SAIL-ViT -> 2×2 pixel shuffle -> MLP adapter -> Qwen3 LLM (paper §2, Table 1).

Reads top-down in the paper's order:
  §2.3                Qwen3 LLM (dense; MoE layers by HF's rule, block in moe.py, §2.2)
  §2.1                pixel shuffle v2 (ratio 0.5) and the `mlp1` adapter
  §2                  `SAILVL`: visual tokens fill the `<IMG_CONTEXT>` positions, shifted CE loss
                      computed in token chunks (no full-vocabulary logits in training)
  §4.2.3              generation and RL rollouts: `policy_logits` (the sampling policy), a static
                      KV cache, each prompt prefilled once for its G rows, a decode step (prefill
                      and step optionally compiled, the step as CUDA graphs), finished rows leaving
  official layout     checkpoint I/O: our folders (= the official SAIL-VL2 layout), official
                      SAIL-VL2 HF folders, HF Qwen3 / Qwen3-MoE folders (`load_hf_llm`)
  checkpoints         the one writer and reader of the trainers' checkpoints (`save_checkpoint`,
                      `load_checkpoint`, `verify_checkpoint`): atomic folders, sizes and checksums,
                      step checkpoints sharded with torch.distributed.checkpoint, exact resume
  Table 1             presets: tiny (CPU default), tiny-moe, tiny-anyres, 2b, 8b, 30b-a3b; parameter
                      and training-FLOP counts and the GPUs' peaks (the trainer's MFU)

`LLMConfig` uses HF config.json field names, so a Qwen3 config.json loads directly. Parameter
names equal HF's (`model.layers.N.self_attn.q_proj`…) so no renaming table is needed.

Memory options of ours (not the paper's): every LLM decoder layer and ViT block recomputes its
inside in backward (`set_activation_checkpointing`, `--ac=block`) and is an FSDP2 unit (`parallelize`,
§5.2); the training loss never holds the (T, V) logits of a pack (`chunked_cross_entropy`).

`python model.py --preset 8b` prints the parameter counts of a preset (built on the meta device).
"""
import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
import moe
import vit
from vit import RMSNorm, ViTConfig, load_state_dict_strict, loadable, maybe_checkpoint, read_safetensors_folder


# ==============================================================================================
# Qwen3 LLM (HF transformers' modeling_qwen3.py / modeling_qwen3_moe.py)

@dataclass
class LLMConfig:
    """Qwen3 / Qwen3-MoE configuration; field names are HF config.json's."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = 151643
    # MoE (Qwen3-MoE, §2.2); num_experts == 0 means a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    model_type: str = "qwen3"

    def is_moe_layer(self, i: int) -> bool:
        """HF's rule (Qwen3MoeDecoderLayer): which decoder layers carry the sparse MoE block."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    def moe_config(self) -> "moe.MoEConfig":
        """The sparse block's config: MoEConfig's fields have LLMConfig's (HF's) names, so it is read off."""
        return moe.MoEConfig(**{f.name: getattr(self, f.name) for f in fields(moe.MoEConfig)})

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        """From an HF Qwen3 / Qwen3-MoE config.json (old and new spellings); refuses features we do
        not implement rather than building a silently different model."""
        d = dict(d)
        rope = d.pop("rope_parameters", None) or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            raise ValueError(f"unsupported LLM config: RoPE scaling {scaling!r} (only plain RoPE is implemented)")
        if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError("unsupported LLM config: sliding-window attention is on "
                             f"(use_sliding_window={d.get('use_sliding_window')}, sliding_window={d.get('sliding_window')})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported LLM config: hidden_act={d['hidden_act']!r} (only silu)")
        if "num_experts" not in d and "num_local_experts" in d:   # transformers v5 spelling
            d["num_experts"] = d["num_local_experts"]
        if d.get("model_type", "qwen3") not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"unsupported LLM model_type {d['model_type']!r} (expected qwen3 or qwen3_moe)")
        if d.get("model_type") == "qwen3_moe":
            d.setdefault("norm_topk_prob", False)                    # HF Qwen3MoeConfig default
        d.setdefault("tie_word_embeddings", False)                   # HF's default for both (PretrainedConfig)
        kw = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        if kw.get("head_dim") is None:
            kw["head_dim"] = kw.get("hidden_size", cls.hidden_size) // kw.get("num_attention_heads", cls.num_attention_heads)
        if isinstance(kw.get("eos_token_id"), list):                # lists allowed in HF: keep the first
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for f in fields(cls):                # hub files write "rope_theta": 1000000: keep float fields float
            if isinstance(f.default, float) and isinstance(kw.get(f.name), int):
                kw[f.name] = float(kw[f.name])
        return cls(**kw)

    def to_dict(self) -> dict:
        moe = self.num_experts > 0
        return dict(asdict(self), model_type="qwen3_moe" if moe else "qwen3",
                    architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"])


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """position_ids (B, T) -> cos, sin (B, T, 1, head_dim), the non-interleaved (rotate-half) form."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq                  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                              # (B, T, hd)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


class KVCache:
    """Static per-layer key/value buffers (B, Hkv, max_len, hd) for generation (the layout of
    gpt-fast's cache: each head's keys contiguous for the attention over them).
    `valid` (B, max_len): slots that may be attended (False on a row's left padding).
    `start` (1,): the slot the next token is written to (a tensor, so that a compiled step does not
    specialise on it). `length`: how many slots the attention reads, the filled ones."""

    def __init__(self, cfg: LLMConfig, valid, dtype):
        B, S = valid.shape
        shape = (B, cfg.num_key_value_heads, S, cfg.head_dim)
        # not zeroed: attention reads only the first `length` slots, each written before it is read
        self.k = [torch.empty(shape, device=valid.device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, device=valid.device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.valid = valid
        self.start = torch.zeros(1, dtype=torch.long, device=valid.device)
        self.length = S
        self.slots = None                                                # set by Qwen3LM.run for each forward

    def update(self, layer: int, k, v):                                  # k, v (B, Hkv, t, hd)
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))    # (under autocast: fp32 k)
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]

    def repeat(self, n: int):
        """Each row n times, row-major (a prompt's cache for its n rollouts)."""
        self.k = [t.repeat_interleave(n, 0) for t in self.k]
        self.v = [t.repeat_interleave(n, 0) for t in self.v]
        self.valid = self.valid.repeat_interleave(n, 0)

    def keep(self, rows):
        """Keep only `rows` (n,), in place at the front of each buffer (their addresses stay fixed)."""
        n = rows.shape[0]
        for buf in (*self.k, *self.v, self.valid):
            buf[:n] = buf[rows]
        self.k = [t[:n] for t in self.k]
        self.v = [t[:n] for t in self.v]
        self.valid = self.valid[:n]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * hd, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)     # qk-norm over head_dim, before RoPE
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens=None, mask=None, cache=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, -1, hd))               # (B, T, H, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, hd))               # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, -1, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cu_seqlens is not None:        # packed row: samples never mix. Under autocast q, k are fp32 (the
            dt = v.dtype                  # norms' fp32 weight) and v bf16: one dtype, as autocast gives SDPA
            out = kernels.packed_attention(q[0].to(dt), k[0].to(dt), v[0], cu_seqlens, causal=True)[None]
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H, T, hd)
            if cache is not None:
                k, v = cache.update(self.layer, k, v)                    # (B, Hkv, S, hd)
            out = grouped_attention(q, k, v, mask, fold=q.is_cuda and mask is not None)     # (B, H, T, hd)
            out = out.transpose(1, 2)                                    # (B, T, H, hd)
        return self.o_proj(out.reshape(B, T, -1))


def grouped_attention(q, k, v, mask, fold: bool):
    """SDPA of H query heads over Hkv key/value heads (query head h reads kv head h // (H / Hkv)),
    under `mask` (B, 1, T, S) or causal. CUDA's kernel that takes a mask (memory-efficient) takes no
    enable_gqa (only flash, which takes no mask, and the fp32 math path do): `fold` puts each kv
    head's G query heads on the query axis instead, (B, Hkv, G*T, hd), the mask repeated G times."""
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, -1, G * T, hd), k, v, attn_mask=mask.repeat(1, 1, G, 1))
    return out.reshape(B, H, T, hd)          # not view: CUDA's fused kernels return a transposed buffer


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = moe.SparseMoeBlock(cfg.moe_config()) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.checkpoint_activations = False          # --ac=block (set_activation_checkpointing)

    def forward(self, x, cos, sin, cu_seqlens=None, mask=None, cache=None):
        return maybe_checkpoint(self.body, self.checkpoint_activations, x, cos, sin, cu_seqlens, mask, cache)

    def body(self, x, cos, sin, cu_seqlens=None, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, mask, cache)
        h = self.post_attention_layernorm(x)
        h, router_logits = self.mlp(h) if self.is_moe else (self.mlp(h), None)
        return x + h, router_logits


class Qwen3Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def decode_mask(attention_mask, past, t: int):
    """Boolean SDPA mask (B, 1, t, S) for `t` new tokens at slots past .. past+t-1 of S slots
    (`attention_mask` (B, S) marks the slots a row may see; `past` an int or a (1,) tensor): causal
    and blind to padding; each query also sees itself so fully padded rows stay finite."""
    S = attention_mask.shape[1]
    q_pos = past + torch.arange(t, device=attention_mask.device)                          # (t,)
    slots = torch.arange(S, device=attention_mask.device)
    allowed = (slots[None, :] <= q_pos[:, None])[None] & attention_mask[:, None, :].bool()  # (B, t, S)
    allowed |= (slots[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


class Qwen3LM(nn.Module):
    """Qwen3 causal LM (dense or MoE) with HF parameter names."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self):
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=self.cfg.initializer_range)

    def run(self, input_ids=None, position_ids=None, cu_seqlens=None, inputs_embeds=None,
            attention_mask=None, cache=None):
        """-> final hidden states (B, T, H) and the router logits of each MoE layer."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.start if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x.device))[None].expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"packed input (cu_seqlens given) must have batch size 1, got {B}")
        mask = None
        if cache is not None:
            cache.slots = cache.start + torch.arange(T, device=x.device)          # where this forward writes
            mask = decode_mask(cache.valid[:, :cache.length], cache.start, T)
        elif attention_mask is not None:
            mask = decode_mask(attention_mask, 0, T)
        router_logits = []
        for layer in self.model.layers:
            x, rl = layer(x, cos, sin, cu_seqlens, mask, cache)
            if rl is not None:
                router_logits.append(rl)
        if cache is not None:
            cache.start += T
        return self.model.norm(x), router_logits

    def forward(self, input_ids=None, position_ids=None, cu_seqlens=None, inputs_embeds=None,
                attention_mask=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V). With `cu_seqlens` B is 1 and the row holds packed
        samples (`position_ids` restart per sample). `attention_mask` (B, S) marks real tokens
        (left padding) and `cache` a KVCache, both for generation."""
        h, _ = self.run(input_ids, position_ids, cu_seqlens, inputs_embeds, attention_mask, cache)
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=32, temperature=0.0, top_p=1.0, stop_tokens=(),
                 generator=None, on_token=None, n_valid_tokens=None):
        """Batched generation with a KV cache. `prompts`: list of token-id lists (any lengths).
        Returns the list of generated id lists (each ending at its first stop token, included).
        `n_valid_tokens`: the tokenizer's size when the embedding table is padded beyond it."""
        embeds = [self.model.embed_tokens(torch.tensor(p, device=self.lm_head.weight.device)) for p in prompts]
        return generate_from_embeds(self, embeds, max_new_tokens, temperature, top_p, stop_tokens, generator,
                                    on_token, n_valid_tokens)


# ==============================================================================================
# Generation: the sampling policy and the rollout engine
#
# gpt-fast's pattern: a prefill, then one-token decode steps over a static KV cache (a tensor write
# slot, so the step does not specialise on it) that torch.compile can capture, and sampling that
# never waits for the host. The attention reads the filled slots (faster on the CPU than the whole
# cache), or, replayed as CUDA graphs, the cache up to a fixed length under a mask (GraphedStep).
# For RL (§4.2.3) each prompt is prefilled once for its G rows; the log-probs recorded are those of
# `policy_logits`, the one definition of the sampling policy, which the training forward uses too.

def policy_logits(logits, temperature: float, top_p: float = 1.0, n_valid=None, banned=()):
    """logits (..., V) -> float32 logits of the sampling policy: -inf at the padded rows >= n_valid
    (the tokenizer is smaller than the embedding table) and the `banned` ids (ints, or a tensor on
    the logits' device); divided by the temperature (0: greedy, its policy taken at T = 1); -inf
    outside the top-p nucleus (the smallest set of most likely tokens whose probability reaches
    top_p). Its log_softmax is the policy's log-prob, its softmax what is sampled."""
    x = logits.float()
    V = x.shape[-1]
    if n_valid is not None and n_valid < V:
        x = x.masked_fill(torch.arange(V, device=x.device) >= n_valid, float("-inf"))
    if len(banned):
        x = x.index_fill(-1, torch.as_tensor(banned, device=x.device), float("-inf"))
    if temperature > 0:
        x = x / temperature
    if top_p < 1.0:
        sorted_x, idx = x.sort(-1, descending=True)
        p = sorted_x.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p                                # keep the smallest prefix reaching top_p
        x = x.scatter(-1, idx, sorted_x.masked_fill(drop, float("-inf")))
    return x


def sample_tokens(policy, temperature: float, uniform=None):
    """Policy logits (n, V) -> (ids (n,), their log-probs (n,)), both from one log_softmax.
    Greedy (temperature 0): the argmax. Else inverse-CDF sampling with one draw `uniform` (n, 1) in
    [0, 1) per row: the first token whose cumulative probability reaches (1 - u) * total. The
    threshold is > 0 and never above the total, so a token of probability 0 is never picked."""
    logp = torch.log_softmax(policy, -1)
    if temperature <= 0:
        ids = policy.argmax(-1)
    else:
        cdf = sampling_cdf(logp)                                         # (n, V), non-decreasing
        ids = torch.searchsorted(cdf, (1 - uniform.double()) * cdf[:, -1:])[:, 0]
    return ids, logp.gather(-1, ids[:, None])[:, 0]


def sampling_cdf(logp):
    """The cumulative probabilities inverse-CDF sampling reads, in float64: a float32 running sum
    over a 152k vocabulary stops adding tokens far below its precision (the distribution sampled
    would differ from softmax(policy), whose log-probs are recorded, by ~1e-3 in total variation)."""
    return logp.double().exp().cumsum(-1)


def prompt_logits(lm: Qwen3LM, x, position_ids, cache: KVCache):
    """The prefill's forward: prompts x (P, L, H) into the cache -> logits at the last position (P, V)."""
    h, _ = lm.run(inputs_embeds=x, position_ids=position_ids, cache=cache)
    return lm.lm_head(h[:, -1])


def prefill(lm: Qwen3LM, embeds: list, repeats: int, max_new_tokens: int, forward_fn=prompt_logits):
    """Each prompt (L_i, H) once, left-padded into one batch, into a cache sized for the whole
    generation; its keys/values are then copied into the `repeats` rows it owns (prompt-major).
    Logits only at the last position (all (T, V) are gigabytes at a 151k vocabulary)
    -> (cache, logits (P, V), lengths (P,))"""
    L = max(e.shape[0] for e in embeds)
    device = embeds[0].device
    lens = torch.tensor([e.shape[0] for e in embeds], device=device)
    pad = (L - lens)[:, None]                                            # (P, 1) left padding per prompt
    x = torch.stack([F.pad(e, (0, 0, L - e.shape[0], 0)) for e in embeds])          # (P, L, H)
    slots = torch.arange(L + max_new_tokens, device=device)[None]
    cache = KVCache(lm.cfg, slots >= pad, cache_dtype(x))                # room for the generated tokens
    cache.length = L                                                     # the prefill reads the prompts' slots
    logits = forward_fn(lm, x, (slots[:, :L] - pad).clamp(min=0), cache)  # positions restart after padding
    if repeats > 1:
        cache.repeat(repeats)
    return cache, logits, lens


def cache_dtype(x):
    """The KV cache's dtype: autocast's where it is on (it hands SDPA bf16 keys and values whatever the
    cache holds, so an fp32 cache would be copied to bf16 in every decode step, at twice the memory),
    else the activations'."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def decode_step(lm: Qwen3LM, cache: KVCache, ids, pos, uniform, policy: tuple):
    """One token for every row through the cache: ids (n,) at RoPE positions pos (n,) ->
    (next ids (n,), their log-probs (n,), the next positions (n,)) under policy_logits(*policy)."""
    h, _ = lm.run(ids[:, None], pos[:, None], cache=cache)
    return (*sample_tokens(policy_logits(lm.lm_head(h[:, -1]), *policy), policy[0], uniform), pos + 1)


class Compiled:
    """`fn` (the prefill's forward or the decode step) under torch.compile: inductor's fused kernels
    (Triton on a GPU, C++ on CPU). A size that changes (batch, prompt or cache length) recompiles once
    and is dynamic from then on. Without inductor's CUDA graphs ("reduce-overhead"), which would treat
    the cache, allocated per call (not held through the RL update as gpt-fast's setup_caches would),
    as a new input each call: GraphedStep captures the step per call instead. If compiling fails it
    warns once and runs `fn` eagerly from then on."""

    def __init__(self, fn):
        self.eager, self.fn = fn, None                                   # compiled on first use

    def __call__(self, *args):
        if self.fn is None:
            self.fn = torch.compile(self.eager)
        if self.fn is not self.eager:
            try:
                return self.fn(*args)
            except torch._dynamo.exc.TorchDynamoException as e:          # raised before the step ran
                warnings.warn(f"torch.compile of {self.eager.__name__} failed ({type(e).__name__}: {e}); "
                              "running it eagerly")
                self.fn = self.eager
        return self.eager(*args)


COMPILED = {fn: Compiled(fn) for fn in (prompt_logits, decode_step)}   # graphs reused across generate calls
SYNC_EVERY = 8           # decode steps between looks at the done flags: the decode loop's only host sync
GRAPH_SLOTS = 256        # a graphed decode step reads the cache up to the next multiple of this many slots


def pick_compiled(compile, device) -> bool:
    """Whether generation runs the compiled prefill and decode step. compile="auto": on CUDA, not on
    CPU, where compiling costs more than a call saves (`python tests/bench.py rollout`: tens of
    seconds against half of a call). "graphs": compiled, the decode step replayed as CUDA graphs."""
    return device.type == "cuda" if compile == "auto" else bool(compile)


def cuda_graph(fn):
    """fn() (no arguments: it reads and writes tensors that stay in place) captured as one CUDA graph
    -> (replay, fn's outputs: tensors each replay overwrites). First one run on a side stream, as
    CUDA graph capture asks (cuBLAS workspaces; torch.compile compiles there, not inside the capture)."""
    if not torch.cuda.is_available():
        raise RuntimeError("compile='graphs' (CUDA graphs) needs a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedStep:
    """The decode step replayed as CUDA graphs (compile="graphs"): one launch per step, not one per
    kernel. A graph replays fixed shapes at fixed addresses with every Python value of its capture
    baked in: the inputs are copied into fixed buffers, the attention reads the cache up to the next
    multiple of GRAPH_SLOTS (unwritten slots zeroed, and masked), and a new graph is captured when the
    batch shrinks or the filled slots pass that multiple. One per generate call (its cache)."""

    def __init__(self, step_fn):
        self.step_fn, self.key = step_fn, None

    def __call__(self, lm, cache, ids, pos, uniform, policy):
        if self.key is None:                     # never written yet: zeros, which the mask then hides
            for t in cache.k + cache.v:          # (uninitialised memory may hold NaN: NaN * 0 is NaN)
                t[:, :, cache.length:].zero_()
        cache.length = min(cache.valid.shape[1], -(-cache.length // GRAPH_SLOTS) * GRAPH_SLOTS)
        new = [ids, pos] if uniform is None else [ids, pos, uniform]
        if (ids.shape[0], cache.length) != self.key:
            self.inputs = [t.clone() for t in new]                         # the graph's input buffers
            args = (self.inputs + [None])[:3]
            start = cache.start.clone()          # the warm-up run advances it: the replay takes the step
            self.replay = self.outputs = None    # the old graph's memory pool is freed before the new capture
            self.replay, self.outputs = cuda_graph(lambda: self.step_fn(lm, cache, *args, policy))
            cache.start.copy_(start)
            self.key = (ids.shape[0], cache.length)
        for buf, t in zip(self.inputs, new):
            buf.copy_(t)
        self.replay()
        return tuple(t.clone() for t in self.outputs)        # the next replay overwrites the outputs


def graphed(lm: Qwen3LM, step_fn):
    """step_fn as CUDA graphs, unless MoE experts take the torch path (the CPU's; the Triton path sizes
    its launches from the shapes alone): it sizes each product on the host from the routing."""
    w = lm.lm_head.weight
    if not any(layer.is_moe for layer in lm.model.layers) or kernels.use_triton(w, w.dtype in kernels.TRITON_DTYPES):
        return GraphedStep(step_fn)
    warnings.warn("compile='graphs': the MoE experts' torch path sizes its products from the routing on the host, "
                  "which a CUDA graph cannot replay; the decode step runs compiled, without graphs")
    return step_fn


def model_device(model) -> torch.device:
    """The device of the model's weights (the CPU for stand-ins that have none)."""
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return torch.device("cpu") if first is None else first.device


def on_device(pixels, device):
    """Pixels (None, a tensor, or an AnyRes list) on `device`."""
    if isinstance(pixels, (list, tuple)):
        return [p.to(device) for p in pixels]
    return None if pixels is None else pixels.to(device)


# What products compute in, per device type: bf16 on CUDA (the one-process trainer's autocast, RL's
# rollouts and updates, the evaluation's generation), fp32 where a type is absent (the CPU: its bf16
# products are slow).
COMPUTE_DTYPE = {"cuda": torch.bfloat16}


def compute_dtype(device) -> Optional[torch.dtype]:
    """The dtype `autocast(device)` computes products in; None where it is off (fp32)."""
    return COMPUTE_DTYPE.get(torch.device(device).type)


def autocast(device):
    """Autocast to the device's COMPUTE_DTYPE; nothing where it has none (any device: meta too)."""
    dt = compute_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dt) if dt is not None else contextlib.nullcontext()


def hold_matrices_in(lm: Qwen3LM, dtype):
    """The LLM's matrices (its Linear layers and MoE experts) held in `dtype`, for generation under
    autocast to it, in place (a meta model too: nothing is allocated then). Autocast casts an fp32
    weight at every use: every matrix in every decode step (4 bytes read, 2 written, 2 read again
    where 2 suffice), every expert of an MoE layer, routed or not. Cast once, the products are the
    same (the same rounding). A tied lm_head gets a copy of its own; the embedding lookup stays
    fp32, as autocast leaves it. A second call changes nothing."""
    if lm.cfg.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight:
        lm.lm_head.weight = nn.Parameter(lm.model.embed_tokens.weight.detach().to(dtype, copy=True),
                                         requires_grad=False)
    for m in lm.modules():
        if isinstance(m, (nn.Linear, moe.Experts)):
            m.to(dtype)


def parse_device(text: str) -> torch.device:
    """A command line's --device: cpu, or cuda[:N] for one of this machine's CUDA devices
    (ValueError with the reason otherwise)."""
    gpus, m = torch.cuda.device_count(), re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if not m or (text != "cpu" and (not gpus or (m[1] is not None and int(m[1]) >= gpus))):
        here = f"{gpus} CUDA devices here: N < {gpus}" if gpus else "no CUDA device here"
        raise ValueError(f"expected cpu or cuda[:N] ({here}), got {text!r}")
    return torch.device(text)


def for_generation(model, device):
    """`model` on `device` in eval mode, where the device computes in bf16 (CUDA: COMPUTE_DTYPE) its
    LLM's matrices held in bf16 as RL's generation copy holds them, cast before they move (a 30b-a3b
    model takes 64 GB of the GPU, not 122)."""
    if (low := compute_dtype(device)) is not None:
        hold_matrices_in(model.language_model, low)
    return model.to(device).eval()


def device_generator(generator, device):
    """The generator for draws on `device`: the given one when it lives there, else (a CPU
    generator handed to a CUDA model) a generator on `device` seeded by one draw from the given
    one, so a seeded run is reproducible and successive calls differ."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def rows_to_keep(n_live: int, n_rows: int) -> int:
    """Batch size once n_live of n_rows still run: the live rows, or all n_rows while fewer than a
    quarter have finished (moving the cache's rows costs a copy)."""
    return n_live if n_live <= 0.75 * n_rows else n_rows


def generate_from_embeds(lm: Qwen3LM, embeds, max_new_tokens, temperature=0.0, top_p=1.0, stop_tokens=(),
                         generator=None, on_token=None, n_valid_tokens=None, logprobs=None, banned=(), *,
                         repeats: int = 1, compile="auto", in_step: bool = False):
    """The decode loop of Qwen3LM.generate, SAILVL.generate and RL's rollouts. `embeds`: prompts as
    embeddings (L_i, H), any lengths, each prefilled once and sampled `repeats` times (rows are
    prompt-major: prompt 0's repeats first). Returns per row the generated ids, up to its first stop
    token (included) or max_new_tokens. `logprobs`: a list that receives per row each generated
    token's log-prob under policy_logits(logits, temperature, top_p, n_valid_tokens, banned), the
    policy sampled (`banned`: ids never generated). `generator`: any device (see device_generator).
    `on_token(ids (B,))` after each step: every row's token, -1 for rows that left the batch (tokens
    after a row's stop token are not output). `compile`: "auto" | True | False | "graphs" (see pick_compiled).
    Finished rows leave the batch every SYNC_EVERY steps; sampling and done flags stay on the device.
    `in_step`: every rank runs this call together, each forward a collective (the weights sharded and
    gathered per layer, see generating_sharded): the loop ends when every rank's rows are done, and a
    rank whose rows are all done keeps stepping one of them (same max_new_tokens on every rank)."""
    B = len(embeds) * repeats
    if max_new_tokens <= 0:
        if logprobs is not None:
            logprobs.extend([] for _ in range(B))
        return [[] for _ in range(B)]
    device = lm.lm_head.weight.device
    gen = device_generator(generator, device)
    policy = (temperature, top_p, n_valid_tokens, torch.tensor(sorted(set(banned)), dtype=torch.long, device=device))
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    forward_fn, step_fn = (COMPILED[prompt_logits], COMPILED[decode_step]) if pick_compiled(compile, device) \
        else (prompt_logits, decode_step)
    if compile == "graphs":
        step_fn = graphed(lm, step_fn)
    cache, logits, lens = prefill(lm, [e.to(device) for e in embeds], repeats, max_new_tokens, forward_fn)
    L = cache.valid.shape[1] - max_new_tokens
    rows = torch.arange(B, device=device)                                # the output row of each batch row
    out_ids = torch.full((max_new_tokens, B), -1, dtype=torch.long, device=device)
    out_lp = torch.zeros(max_new_tokens, B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = lens.repeat_interleave(repeats)                                # RoPE position of the next token
    idle = False        # in step: this rank's rows are done, its steps keep up with the other ranks'

    def draws():                 # (n, 1): one per output row and step, whatever the batch's composition
        if temperature <= 0:
            return None
        if idle:                 # no draws: the generator is left as if the loop had ended here
            return torch.zeros(rows.shape[0], 1, device=device)
        u = torch.rand(B, 1, generator=gen, device=device)
        return u if rows.shape[0] == B else u[rows]

    ids, lp = sample_tokens(policy_logits(logits, *policy).repeat_interleave(repeats, 0), temperature, draws())
    for step in range(max_new_tokens):
        if step:
            cache.length = L + step                                    # the filled slots
            ids, lp, pos = step_fn(lm, cache, ids, pos, draws(), policy)
        out_ids[step].index_copy_(0, rows, ids)
        out_lp[step].index_copy_(0, rows, lp)
        if on_token is not None:
            on_token(torch.full((B,), -1, device=device).index_copy_(0, rows, ids))
        if (step + 1) % SYNC_EVERY == 0:     # the done flags from the last steps' tokens, not one op per step
            done |= torch.isin(out_ids[step + 1 - SYNC_EVERY:step + 1], stop).any(0)
            live = ~done[rows]
            n_live = int(live.sum())
            if (all_reduce([n_live], device, "max")[0] if in_step else n_live) == 0:   # in step: the ranks leave together
                break
            idle = n_live == 0
            keep = max(1, rows_to_keep(n_live, rows.shape[0]))        # in step, an idle rank keeps one row
            if keep < rows.shape[0]:
                order = torch.argsort((~live).to(torch.uint8), stable=True)[:keep]   # live rows first
                cache.keep(order)
                rows, ids, pos = rows[order], ids[order], pos[order]
    return collect(out_ids, out_lp, stop, logprobs)


def collect(out_ids, out_lp, stop, logprobs=None) -> list:
    """(steps, B) ids and log-probs -> per row the ids up to its first stop token (included); the
    log-probs likewise into `logprobs` when it is a list."""
    is_stop = torch.isin(out_ids, stop)
    length = torch.where(is_stop.any(0), is_stop.int().argmax(0) + 1, out_ids.shape[0]).tolist()
    ids = [row[:n] for row, n in zip(out_ids.T.tolist(), length)]
    if logprobs is not None:
        logprobs.extend(row[:n] for row, n in zip(out_lp.T.tolist(), length))
    return ids


# ==============================================================================================
# pixel shuffle v2 and the MLP adapter (the official modeling_sailvl.py)

def pixel_shuffle(x, h: int, w: int):
    """(N, h*w, C) patch features -> (N, h/2 * w/2, 4C). Token (i, j) is the concatenation of the
    2×2 neighbourhood x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1), each a full C-chunk,
    row-major, exactly as the official `ps_version='v2'` with downsample_ratio 0.5."""
    N, P, C = x.shape
    if P != h * w or h % 2 or w % 2:
        raise ValueError(f"pixel shuffle needs an even patch grid matching the tokens, got {h}×{w} for {P} tokens")
    x = x.view(N, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 2, 4, 5)     # (N, h/2, w/2, dy, dx, C)
    return x.reshape(N, (h // 2) * (w // 2), 4 * C)


def make_adapter(vit_hidden: int, llm_hidden: int) -> nn.Sequential:
    """`mlp1` = LayerNorm -> Linear -> GELU -> Linear; keys mlp1.{0,1,3} as in the checkpoint."""
    d = 4 * vit_hidden
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


# ==============================================================================================
# SAILVL (§2)

@dataclass
class SAILVLConfig:
    vision_config: ViTConfig = field(default_factory=ViTConfig)
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    template: str = "univl-chat"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    img_context_token_id: int = 151671
    anyres: bool = False               # AnyRes variant (§2.1.2): variable-size images, interpolated pos-embed
    anyres_max_patches: int = 16384    # ViT patches per AnyRes image: the paper's 1792×1792 at 16,384 input tokens
    system_prompt: str = ""            # "" = the official univl-chat system prompt (data.DEFAULT_SYSTEM)

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision_config.grid // 2) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "SAILVLConfig":
        if d.get("downsample_ratio", 0.5) != 0.5 or d.get("ps_version", "v2") != "v2":
            raise ValueError(f"unsupported: downsample_ratio={d.get('downsample_ratio')} ps_version={d.get('ps_version')}"
                             " (only 0.5 / v2, as SAIL-VL2)")
        if d.get("select_layer", -1) != -1:
            raise ValueError(f"unsupported: select_layer={d['select_layer']} (SAIL-VL2 uses -1, the final ViT output)")
        if d.get("dynamic_image_size", True) is not True:    # one tile per image: not what data.py builds
            raise ValueError(f"unsupported: dynamic_image_size={d['dynamic_image_size']} (SAIL-VL2 tiles images "
                             "dynamically, up to max_dynamic_patch tiles and a thumbnail)")
        vision = ViTConfig.from_dict(d["vision_config"])
        if d.get("force_image_size", vision.image_size) != vision.image_size:   # one name for the tile size
            raise ValueError(f"unsupported: force_image_size={d['force_image_size']} differs from "
                             f"vision_config.image_size={vision.image_size}")
        ours = {f.name for f in fields(cls)} - {"vision_config", "llm_config"}
        kw = {k: v for k, v in d.items() if k in ours}
        return cls(vision_config=vision, llm_config=LLMConfig.from_dict(d["llm_config"]), **kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("vision_config", "llm_config")}
        v = asdict(self.vision_config)
        v.update(model_type="sailvit", use_bias=self.vision_config.mlp_bias, architectures=["SAILViTModel"])
        return dict(architectures=["SAILVLModel"], model_type="sailvl", vision_config=v,
                    llm_config=self.llm_config.to_dict(), force_image_size=self.vision_config.image_size, **d)


class Output(NamedTuple):
    """What SAILVL.forward returns, with or without labels. The loss is not made here: the training
    step alone turns these sums into the global token mean of a step and adds the aux term
    (train_stage.train_step), so no second, different 'loss' exists to be used by mistake."""
    logits: torch.Tensor | None          # (B, T, V); None when labels are given (unless return_logits)
    ce_sum: torch.Tensor | None          # summed next-token CE over targets (labels != -100); None without labels
    n_targets: torch.Tensor | None       # number of those targets
    aux_loss: torch.Tensor | None        # MoE load balancing: this rank's share of the global-batch loss (moe.py)
    router_logits: tuple | None = None   # per MoE layer (B*T, E), with grad; for moe.expert_load logging
    per_token: list | None = None        # with `per_token`: its outputs per chunk of positions


def shifted_cross_entropy(logits, labels):
    """Sum of next-token CE over labels != -100 and the count: logits[:, i] predicts labels[:, i+1].
    The full-logits form (a (T, V) fp32 copy): the reference `chunked_cross_entropy` equals."""
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    tg = labels[:, 1:].reshape(-1)
    ce_sum = F.cross_entropy(lg, tg, ignore_index=-100, reduction="sum")
    return ce_sum, (tg != -100).sum()


CE_CHUNK = 1024      # positions per chunk of the training loss: (1024, V) fp32 logits at a time (0.6 GB at V = 152k)


def chunked_cross_entropy(h, weight, labels, chunk: int | None = None):
    """shifted_cross_entropy(h @ weight.T, labels) without the (T, V) logits: final hidden states h
    (B, T, H) and the lm_head weight (V, H), `chunk` positions at a time (over_chunks). Each chunk's
    logits are made in the model dtype and upcast to fp32 as the full form does, summed into the CE,
    dropped, and made again in backward, so one chunk's logits exist at a time instead of the
    pack's (8k x 152k: 2.5 GB bf16 + 5 GB fp32, and as much again for their grads)."""
    parts = over_chunks(chunk_cross_entropy, h, weight, labels, chunk)
    # a pack with no position to predict (one token: a micro-batch whose samples all failed to
    # decode) still gives a loss in the graph, 0 with zero gradients, so backward runs as on every rank
    ce_sum = torch.stack(parts).sum() if parts else h.float().sum() * 0.0
    return ce_sum, (labels[:, 1:] != -100).sum()


def over_chunks(fn, h, weight, labels, chunk: int | None = None) -> list:
    """[fn(h_c (C, H), weight (V, H), targets_c (C,)) for each chunk of `chunk` shifted positions]
    (h (B, T, H) predicts labels[:, 1:]), each under torch.utils.checkpoint: whatever (C, V) logits
    fn makes exist while it runs, and again in backward."""
    chunk = chunk or CE_CHUNK
    hs = h[:, :-1].reshape(-1, h.shape[-1])                              # (B*(T-1), H)
    tg = labels[:, 1:].reshape(-1)                                        # (B*(T-1),)
    return [maybe_checkpoint(fn, True, hs[i:i + chunk], weight, tg[i:i + chunk]) for i in range(0, hs.shape[0], chunk)]


def chunk_cross_entropy(h, weight, targets):
    """Summed CE of one chunk: h (C, H), weight (V, H), targets (C,) with -100 ignored."""
    logits = F.linear(h, weight).float()                                 # (C, V)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


class SAILVL(nn.Module):
    def __init__(self, cfg: SAILVLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = vit.SAILViT(cfg.vision_config)
        self.mlp1 = make_adapter(cfg.vision_config.hidden_size, cfg.llm_config.hidden_size)
        self.language_model = Qwen3LM(cfg.llm_config)

    def init_weights(self):
        self.vision_model.init_weights()
        for m in self.mlp1:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.language_model.init_weights()

    # -- §2.1: visual tokens ------------------------------------------------------------------
    def encode_images(self, pixel_values):
        """Tiles (N, 3, S, S), or for AnyRes a list of images (3, H_i, W_i) -> visual tokens
        (N_tokens, H_llm) in order: per tile/image, row-major over the shuffled grid."""
        if isinstance(pixel_values, (list, tuple)):
            feats, grids = self.vision_model.forward_packed(pixel_values)
            shuffled = [pixel_shuffle(f[None], h, w)[0] for f, (h, w) in zip(feats, grids)]
            return self.mlp1(torch.cat(shuffled, 0))
        N = pixel_values.shape[0]
        # one tile N times (the blind eval's white), in generation only: a training-side forward without
        # gradients (RL's old log-probs) must run the kernels the update's forward runs, bit for bit
        if N > 1 and torch.is_inference_mode_enabled() and bool((pixel_values == pixel_values[:1]).all()):
            return self.encode_images(pixel_values[:1]).repeat(N, 1)
        feats = self.vision_model(pixel_values)                          # (N, P, C)
        p = self.cfg.vision_config.patch_size
        h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        return self.mlp1(pixel_shuffle(feats, h, w)).reshape(-1, self.cfg.llm_config.hidden_size)

    # Under FSDP2 each ViT block is a unit whose weights every rank gathers together: a rank whose
    # pack has no images must run the ViT too, or the ranks' collectives diverge (parallelize)
    vision_every_forward = False

    def blank_tile(self, device):
        """One white tile (fixed resolution) or one 2x2-patch image (AnyRes) for vision_every_forward, in
        the patch projection's dtype of the moment: under FSDP2's bf16 policy its gathered weights are
        bf16, and only the model's own inputs are cast to it, not a tensor made inside its forward."""
        v, dt = self.cfg.vision_config, self.vision_model.preprocessor.patchifier.proj.weight.dtype
        if self.cfg.anyres:
            return [torch.ones(3, 2 * v.patch_size, 2 * v.patch_size, device=device, dtype=dt)]
        return torch.ones(1, 3, v.image_size, v.image_size, device=device, dtype=dt)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the `<IMG_CONTEXT>` positions filled, in order, by visual tokens."""
        x = self.language_model.model.embed_tokens(input_ids)            # (B, T, H)
        slots = input_ids == self.cfg.img_context_token_id
        n_slots = int(slots.sum())
        if pixel_values is None or (isinstance(pixel_values, (list, tuple)) and not pixel_values):
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} <IMG_CONTEXT> tokens but no pixel_values were given")
            if self.vision_every_forward:      # sharded: every rank runs the ViT's gathers (a blank tile, weight 0)
                x = x + 0.0 * self.encode_images(self.blank_tile(x.device)).sum()
            return x
        vis = self.encode_images(pixel_values)                           # (N_tokens, H)
        if vis.shape[0] != n_slots:
            raise ValueError(f"image token mismatch: input_ids hold {n_slots} <IMG_CONTEXT> tokens but the "
                             f"images give {vis.shape[0]} visual tokens")
        return x.masked_scatter(slots[..., None], vis.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, labels=None, position_ids=None, cu_seqlens=None,
                attention_mask=None, return_logits=None, per_token=None) -> Output:
        """input_ids (B, T), pixel_values (N_tiles, 3, S, S) | list (AnyRes) | None -> Output. With labels
        (B, T): the summed shifted CE and its target count (`chunked_cross_entropy`), no logits unless
        `return_logits`, and for MoE LLMs the load-balancing term (§2.2), this rank's share (statistics
        averaged across ranks: a collective). Without labels: the logits. With labels and `per_token`
        (RL's policy terms): over_chunks(per_token, ...) in place of the CE, as Output.per_token."""
        x = self.embed(input_ids, pixel_values)
        h, router_logits = self.language_model.run(position_ids=position_ids, cu_seqlens=cu_seqlens,
                                                   inputs_embeds=x, attention_mask=attention_mask)
        lm_head = self.language_model.lm_head
        if per_token is not None:
            return Output(None, None, None, None, tuple(router_logits) or None,
                          over_chunks(per_token, h, lm_head.weight, labels))
        logits = lm_head(h) if (labels is None if return_logits is None else return_logits) else None
        ce_sum = n = aux = None
        if labels is not None:
            ce_sum, n = chunked_cross_entropy(h, lm_head.weight, labels)
        if router_logits and labels is not None:    # a loss forward, which every rank runs in step: the aux
            c = self.cfg.llm_config                 # loss all-reduces (a judge's or a reply's forward must not)
            aux = moe.load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok, attention_mask)
        return Output(logits, ce_sum, n, aux, tuple(router_logits) or None)

    @torch.no_grad()
    def generate(self, prompts, pixel_values=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
                 stop_tokens=(), generator=None, on_token=None, n_valid_tokens=None, banned=()):
        """`prompts`: list of token-id lists whose `<IMG_CONTEXT>` slots (over all prompts, in order)
        take the visual tokens of `pixel_values`; `banned`: ids never generated. Returns the generated id lists."""
        device = self.language_model.lm_head.weight.device
        lens = [len(p) for p in prompts]
        flat = torch.tensor([t for p in prompts for t in p], device=device)[None]
        embeds = list(self.embed(flat, pixel_values)[0].split(lens, 0))  # (L_i, H) each
        return generate_from_embeds(self.language_model, embeds, max_new_tokens, temperature, top_p,
                                    stop_tokens, generator, on_token, n_valid_tokens, banned=banned)

    # -- checkpoint I/O (the official model.safetensors key names) ---------------------------------------------------------
    def save_pretrained(self, path: str):
        """config.json + model.safetensors in the official SAIL-VL2 layout, written atomically."""
        sd = {k: v.detach() for k, v in self.state_dict().items()}      # where they are: written one at a time
        atomic_write_dir(path, lambda tmp: write_weights(tmp, sd, self.cfg))

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu", matrices_dtype=None,
                        cfg: Optional[SAILVLConfig] = None) -> "SAILVL":
        """Our own folder or an official SAIL-VL2 HF folder (sharded safetensors, with index), made
        on `device` in `dtype`; `matrices_dtype`: its LLM's matrices held in that dtype instead
        (hold_matrices_in, as for_generation holds them), so a model for generation on a GPU is read
        straight into its bf16 matrices there, never whole in fp32 on the host (30b-a3b: 122 GB).
        `cfg`: the folder's config with settings changed (a stage's --model.* options; same shapes)."""
        model = empty_model(cfg or read_config(path), device, dtype, matrices_dtype)
        load_state_dict_strict(model, checkpoint_tensors(path, model), f"SAIL-VL2 weights from {path}")
        return model


def read_config(path: str) -> SAILVLConfig:
    """The SAILVLConfig of a SAIL-VL2 folder's config.json (ours or the official one)."""
    raw = json.loads(Path(path, "config.json").read_text())
    if "vision_config" not in raw or "llm_config" not in raw:
        raise ValueError(f"{path}/config.json is not a SAIL-VL2 config (no vision_config / llm_config)")
    return SAILVLConfig.from_dict(raw)


def empty_model(cfg: SAILVLConfig, device="cpu", dtype=torch.float32, matrices_dtype=None) -> SAILVL:
    """A SAILVL of `cfg` with unset weights on `device`, in `dtype`, its LLM's matrices in
    `matrices_dtype` when given (hold_matrices_in): sized and cast on the meta device first, so
    nothing else is ever allocated. A tied lm_head is the embedding itself, or its own copy when the
    matrices are held apart (checkpoint_tensors fills it)."""
    with torch.device("meta"):
        model = SAILVL(cfg).to(dtype)
        if matrices_dtype is not None:
            hold_matrices_in(model.language_model, matrices_dtype)
    model = model.to_empty(device=device)
    lm = model.language_model
    if cfg.llm_config.tie_word_embeddings and matrices_dtype is None:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return model


def checkpoint_tensors(path: str, model: SAILVL, module: str = "") -> dict:
    """A SAIL-VL2 folder's tensors in our names, memory-mapped (normalize_state_dict: MoE experts
    as row blocks), for load_state_dict_strict into `model` (empty_model): a tied lm_head held
    apart from the embedding, or untied in `model` only, is given the embedding's tensor (a tied
    checkpoint's head). An untied checkpoint's own head into a model that ties it is refused: one of
    the two trained tensors would be lost. `module` (e.g. "vision_model"): only that module's
    tensors, named within it, for `getattr(model, module)`."""
    saved = read_config(path).llm_config
    sd = normalize_state_dict(read_safetensors_folder(path), saved, prefix="language_model.")
    lm, embed = model.language_model, sd.get("language_model.model.embed_tokens.weight")
    if module in ("", "language_model"):
        refuse_lost_head(path, saved, lm.cfg)
    if saved.tie_word_embeddings and lm.lm_head.weight is not lm.model.embed_tokens.weight and embed is not None:
        sd.setdefault("language_model.lm_head.weight", embed)          # the tied head, held apart: its own copy
    if module:
        sd = {k[len(module) + 1:]: v for k, v in sd.items() if k.startswith(module + ".")}
    return sd


def set_activation_checkpointing(model: SAILVL, on: bool):
    """--ac=block: every LLM decoder layer and ViT block keeps only its input in forward and
    recomputes its inside in backward (vit.maybe_checkpoint). Set before FSDP2 shards the blocks."""
    for block in [*model.language_model.model.layers, *model.vision_model.trunk.blocks]:
        block.checkpoint_activations = on


def parallelize(model: SAILVL, device, mixed_precision: bool):
    """FSDP2: each LLM decoder layer and each ViT block is a unit (one block's full weights exist at
    a time; SAIL-ViT-Huge is 0.68B parameters, too big to gather whole next to an 8k-token pack),
    the root holds the rest (embeddings, tied lm_head, adapter, patch embedding, final norms)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for block in [*model.vision_model.trunk.blocks, *model.language_model.model.layers]:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.vision_every_forward = True          # a text-only pack on one rank still runs the ViT's gathers
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def generating_sharded(model):
    """Generation on the FSDP2-sharded model itself (no full copy of it on any rank), which calls its
    parts outside the root's forward (embed, the LLM's layers one by one, lm_head): for the block the
    root's weights (embeddings, lm_head, adapter, patch embedding, final norms) are gathered, and each
    block's unit is gathered by its own forward and freed after it, every decode step: one unit's
    full weights at a time, an all-gather of the whole model per step. Every rank must make the same
    forwards (generate_from_embeds's in_step). FSDP2 takes the first module to run forward as the
    root, so the root runs a one-token forward first (on every call: about one decode step's cost).
    That forward and the root's gather run outside inference mode even when the caller is in it:
    FSDP2 keeps the buffers of a unit's first gather, which would otherwise be inference tensors
    that training cannot write. FSDP2 also notes every unit forward for its next backward's prefetch
    order (host memory, a few bytes each, until the next update). Every unit, the root too, is left
    resharding after each forward; an update sets its own (rl.update_episode). Nothing where
    `model` is not sharded."""
    if not is_sharded(model):
        yield
        return
    model.set_reshard_after_forward(True)
    with torch.inference_mode(False), torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=model_device(model)))
        for m in model.modules():
            if is_sharded(m):
                m.reshard()
        model.unshard()                                   # the root's own weights, not its units'
    try:
        yield
    finally:
        model.reshard()


def freeze(model: SAILVL, trainable: list):
    """Only the stage's modules train; frozen ones get no gradient and no optimizer state."""
    for name in MODULES:
        getattr(model, name).requires_grad_(name in trainable)

# ==============================================================================================
# checkpoint helpers shared by SAILVL, load_hf_llm and the trainer

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, entries: list, metadata: dict):
    """The one safetensors writer (stage outputs, HF exports, step checkpoint shards), one tensor at a
    time: entries [(name, dtype, shape, fetch)], where fetch() gives the tensor (any device, any
    strides) when its bytes are due, so at most one tensor's host copy exists. (torch.distributed.
    checkpoint's own writer builds each shard file as one bytes object with `safetensors.torch.save`,
    on a GPU after a host copy of every tensor: twice the rank's share of weights and optimizer
    state in host memory; older safetensors' save_file copied every tensor to bytes too.)
    The format: the header's length (8 bytes, little-endian), the JSON header {name: {dtype, shape,
    data_offsets}, "__metadata__": {str: str}} padded with spaces to a multiple of 8, then the
    tensors' bytes back to back in the header's order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape, _ in entries:
        if name in header:                                   # a second entry would overwrite the first's offsets
            raise CheckpointError(f"{path}: {name} is planned twice")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, dtype, shape, fetch in entries:
            t = fetch().detach()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
            f.write(memoryview(t.reshape(-1).cpu().view(torch.uint8).numpy()))   # contiguous where it lives: one host copy


def save_tensors(path: str, tensors: dict):
    """{name: tensor} as a safetensors file (write_safetensors), with the metadata HF writes."""
    write_safetensors(path, [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()], {"format": "pt"})


def write_weights(folder: str, state_dict: dict, cfg: SAILVLConfig):
    """config.json + model.safetensors of `state_dict` into an existing folder in the official layout
    (a tied lm_head dropped, MoE experts one by one): the one serialiser of SAILVL weights
    (save_pretrained, save_checkpoint)."""
    sd = dict(state_dict)
    if cfg.llm_config.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)                   # shared with embed_tokens
    Path(folder, "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    save_tensors(os.path.join(folder, "model.safetensors"), hub_layout(sd))


def hub_layout(sd: dict) -> dict:
    """Our tensors as HF checkpoints hold them: each MoE layer's stacked (E, ...) expert weights as
    `experts.N.<proj>.weight`, as on the hub and in Qwen3MoeForCausalLM's loading (normalize_state_dict
    stacks them back). Views, wherever the tensors are: write_safetensors copies one at a time to the host."""
    out = {}
    for k, v in sd.items():
        if ".experts." in k:
            base, proj = k.rsplit(".", 1)
            out.update({f"{base}.{e}.{proj}.weight": w.detach() for e, w in enumerate(v)})
        else:
            out[k] = v.detach()
    return out


def atomic_write_dir(path: str, write_fn):
    """Write a folder atomically: `write_fn(tmp)` fills a temp folder beside `path`, which then
    replaces `path` (replace_dir): `path` is the old folder or the new one, never half of one."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    restore_moved_aside(path)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        write_fn(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync(path: str):
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str, path: str):
    """Flush the finished folder `tmp` to disk, give it the permissions os.makedirs would, and rename
    it to `path`. An old `path` is moved aside to <path>.old-* first and removed after (moved back if
    the rename fails; renamed <path>.trash-* before its removal); after a crash between the two renames
    restore_moved_aside, which every writer and reader of `path` calls first, puts it back. What a
    crash left beside a `path` in place is removed here."""
    for root, _, names in os.walk(tmp):
        for name in names:
            fsync(os.path.join(root, name))
        fsync(root)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                       # mkdtemp made it 0700: owner-only
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.exists(path):
        for stale in glob.glob(glob.escape(path) + ".old-*") + glob.glob(glob.escape(path) + ".trash-*"):
            shutil.rmtree(stale, ignore_errors=True)   # what a crash left while `path` was in place: not needed
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old:
            os.replace(old, path)
        raise
    fsync(parent)                                       # the renames themselves survive a power loss
    if old:                                             # renamed first: a removal cut short is never put back
        trash = os.path.join(parent, os.path.basename(old).replace(".old-", ".trash-", 1))
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def restore_moved_aside(path: str):
    """Put back a folder replace_dir moved aside (<path>.old-*) when a crash stopped it before the
    new one took its place (`path` is then missing)."""
    if os.path.exists(path):
        return
    aside = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
    if aside:
        with contextlib.suppress(FileNotFoundError):   # another process put it back first
            os.replace(aside[-1], path)


def normalize_state_dict(sd: dict, cfg: LLMConfig, prefix: str = "") -> dict:
    """Bring LLM tensors to our layout: strip `_orig_mod.` (torch.compile), drop a tied lm_head,
    list per-expert MoE weights (hub layout `mlp.experts.N.{gate,up,down}_proj.weight`) as the
    rows of our (E, I, H) tensors (load_state_dict_strict copies each into its rows) or split the
    fused transformers-v5 layout (`experts.gate_up_proj` (E, 2I, H)) into two (E, I, H) views."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd.pop(prefix + "lm_head.weight", None)
    experts, out = {}, {}
    for k, v in sd.items():
        parts = k.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            if parts[i + 1].isdigit():                                   # ...experts.N.gate_proj.weight
                experts.setdefault((".".join(parts[:i + 1]), parts[i + 2]), {})[int(parts[i + 1])] = v
                continue
            if parts[i + 1] == "gate_up_proj":                           # fused (E, 2I, H): gate first
                base = ".".join(parts[:i + 1])
                out[base + ".gate_proj"], out[base + ".up_proj"] = v.chunk(2, dim=1)
                continue
        out[k] = v
    for (base, proj), per in experts.items():
        if sorted(per) != list(range(cfg.num_experts)):
            raise ValueError(f"{base}: expected experts 0..{cfg.num_experts - 1} for {proj}, found {sorted(per)[:8]}...")
        out[f"{base}.{proj}"] = [per[e][None] for e in range(cfg.num_experts)]   # (1, I, H) views, not a stack
    return out


def read_llm_config(path: str) -> LLMConfig:
    """The LLMConfig of an HF Qwen3 / Qwen3-MoE folder's config.json (or of the `llm_config` of a
    SAIL-VL2 folder), so Qwen3-0.6B ... Qwen3-30B-A3B need no shape options."""
    raw = json.loads(Path(path, "config.json").read_text())
    return LLMConfig.from_dict(raw.get("llm_config", raw))


def load_hf_llm(path: str, dtype=torch.float32, device="cpu") -> Qwen3LM:
    """A folder saved by HF `Qwen3ForCausalLM` or `Qwen3MoeForCausalLM` (config.json + safetensors,
    sharded with an index or not, any dtype), or the language model of a SAIL-VL2 folder."""
    cfg = read_llm_config(path)
    with torch.device("meta"):
        lm = Qwen3LM(cfg)
    lm = lm.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    load_llm_weights(lm, path)
    return lm


def refuse_lost_head(path: str, saved: LLMConfig, cfg: LLMConfig):
    """A checkpoint with its own lm_head (untied) cannot load into a model of `cfg` that ties the head
    to the embedding: one of the two trained tensors would be lost (a ValueError)."""
    if cfg.tie_word_embeddings and not saved.tie_word_embeddings:
        raise ValueError(f"{path} has an lm_head of its own (tie_word_embeddings false) and this model ties it to the "
                         "embedding: the checkpoint's head would be lost (keep tie_word_embeddings false)")


def llm_tensors(path: str, cfg: LLMConfig) -> dict:
    """The tensors of such a folder for a Qwen3LM of `cfg`, in our names, memory-mapped."""
    refuse_lost_head(path, read_llm_config(path), cfg)
    sd = read_safetensors_folder(path)
    if any(k.startswith("language_model.") for k in sd):                 # a whole SAIL-VL2 folder: its LLM
        sd = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    return normalize_state_dict(sd, cfg)


def load_llm_weights(lm: Qwen3LM, path: str):
    """The tensors of such a folder into `lm` (its config), each copied straight from the memory-mapped file."""
    load_state_dict_strict(lm, llm_tensors(path, lm.cfg), f"Qwen3 weights from {path}")


def save_hf_llm(lm: Qwen3LM, path: str):
    """Export the language model as an HF Qwen3 folder (config.json + model.safetensors, MoE experts
    one by one as on the hub) that `transformers.AutoModelForCausalLM` and `load_hf_llm` read."""
    sd = hub_layout({k: v for k, v in lm.state_dict().items()
                     if not (k == "lm_head.weight" and lm.cfg.tie_word_embeddings)})

    def write(tmp):
        Path(tmp, "config.json").write_text(json.dumps(lm.cfg.to_dict(), indent=2))
        save_tensors(os.path.join(tmp, "model.safetensors"), sd)
    atomic_write_dir(path, write)


# ==============================================================================================
# checkpoints: one writer, one reader; atomic folders, sizes and checksums, exact resume
#
# A stage output (out/<stage>/, the soup): config.json + model.safetensors (write_weights, the
# HF layout, gathered on rank 0), meta.json and the tokenizer. A resumable step checkpoint
# (out/<stage>.run/step-NNNNNN/): config.json, meta.json, the tokenizer, state/ (written with
# torch.distributed.checkpoint as safetensors: every rank writes its own shards of the weights and
# of the optimizer state, and any number of processes reads them back, resharding as needed) and
# rank{r}.pt per rank (RNG states, the AdaLRS rollback copy, RL's sampling generator: plain
# tensors and numbers, loaded with torch.load(weights_only=True)). Every file's size and sha256
# are in meta.json, hashed once, by the rank that wrote it; a reader checks presence and sizes
# (a truncated or missing file), not the hashes (`sha256sum` against meta.json checks those).

class CheckpointError(RuntimeError):
    pass


def file_record(path: str) -> dict:
    """{"bytes", "sha256"} of a file just written (the one time it is hashed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def full_state_dict(model) -> dict:
    """Consolidated weights: under FSDP gathered to rank 0's host ({} on other ranks); of a model
    that is not sharded its own tensors, wherever they are (write_safetensors copies one at a time
    to the host, not the whole model at once)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_sharded_weights(model, path: str, rank: int, device):
    """The weights of the SAIL-VL2 folder `path` into the FSDP2-sharded `model` (its config, empty),
    a tensor at a time (scatter_weights)."""
    scatter_weights(model, lambda: checkpoint_tensors(path, model), rank, device, path, f"SAIL-VL2 weights from {path}")


def full_tensor(value, name: str) -> torch.Tensor:
    """A tensor as a start gives it: memory-mapped from its file, an MoE layer's experts as row blocks
    (joined here: one tensor's worth), or a meta tensor still to be made (remade)."""
    value = torch.cat(value) if isinstance(value, (list, tuple)) else value
    return remade(value, name) if value.is_meta else value


def fill_weights(model, sd: dict, what: str):
    """`sd`'s tensors into `model`'s own (made, unsharded), one at a time: as load_state_dict_strict
    copies them (row blocks into their rows), a meta tensor made first (remade)."""
    with torch.no_grad():
        for name, t in loadable(model, sd, what).items():
            value = sd[name]
            vit.copy_into(t, remade(value, name) if isinstance(value, torch.Tensor) and value.is_meta else value)


def scatter_weights(model, read, rank: int, device, source: str, what: str):
    """Full tensors into the FSDP2-sharded `model` (empty), a tensor at a time: on rank 0, read()
    gives them by name (memory-mapped from their files: checkpoint_tensors, an MoE layer's experts
    as row blocks joined here, one tensor's worth; or a module's own tensors, those on the meta
    device made here: remade), and DTensor's distribute_tensor scatters each rank its shard. Where
    torch's set_model_state_dict needs rank 0 to hold the whole model first (30b-a3b in fp32: 122 GB
    of host memory), this holds one tensor. A missing or misshaped tensor, one that cannot be made,
    or any other failure of rank 0's read (of `source`): one error on every rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    state = model.state_dict(keep_vars=True)             # the parameters themselves: a tied head is the embedding
    sd, box, failed = None, [None, None], None
    if rank == 0:
        try:
            sd = read()
            box = [list(loadable(model, sd, what)), None]
            for name in box[0]:                          # each tensor to be made can be, before any is sent
                if isinstance(sd[name], torch.Tensor) and sd[name].is_meta:
                    fill_of(sd[name], name)
        except (OSError, ValueError) as e:
            box = [None, str(e)]
        except Exception as e:          # any other failure (a bug): told to every rank, which would wait for rank 0
            failed, box = e, [None, f"rank 0 failed reading {source}: {type(e).__name__}: {e}"]
    dist.broadcast_object_list(box, src=0)
    if failed is not None:
        raise failed                    # (the bug's own traceback on rank 0)
    if box[1] is not None:
        raise ValueError(box[1])
    with torch.no_grad():
        for name in box[0]:
            t = state[name]
            if rank == 0:
                full = full_tensor(sd[name], name).to(device, t.dtype)
            else:
                full = torch.empty(t.shape, dtype=t.dtype, device=device)
            if isinstance(t, DTensor):                   # (dim 0 sharded): each rank keeps its rows
                t.copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=0))
            else:
                dist.broadcast(full, 0)
                t.copy_(full)


def seed_all(seed: int):
    """Seed every RNG a run draws from (torch, Python, numpy): what rng_state saves."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():        # this rank's device only: a resume may see fewer or other GPUs
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = st.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):      # written before: every visible device's, this rank's among them
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


TIED_HEAD = "language_model.lm_head.weight"


def sharded_state(model, opt) -> tuple:
    """({"model": weights, "optim": per-parameter optimizer tensors}, optimizer param_groups), keyed
    by parameter name, DTensor shards under FSDP2. A tied lm_head is the embedding: stored once.
    Tensors only (written as safetensors); the param_groups (numbers) go to meta.json."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    weights = get_model_state_dict(model)
    if (model.module if hasattr(model, "module") else model).cfg.llm_config.tie_word_embeddings:
        weights.pop(TIED_HEAD, None)
    optim = get_optimizer_state_dict(model, opt)
    return {"model": weights, "optim": optim["state"]}, optim["param_groups"]


@functools.cache
def shard_writer():
    """ShardWriter: torch.distributed.checkpoint's safetensors layout (what its HuggingFaceStorageReader
    reads back, resharding), each rank writing its own shard file with write_safetensors, one tensor
    at a time, and remembering the file (hashed here, once). Built on first use: importing
    torch.distributed.checkpoint would cost every command 0.6 s at start-up."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class ShardWriter(HuggingFaceStorageWriter):
        def __init__(self, path: str):
            super().__init__(path, save_distributed=True)
            self.written = []

        def write_data(self, plan, planner):
            """This rank's items into shard-NNNNN.safetensors, each tensor's offsets within the whole
            (its DTensor shard's place) in the file's metadata, where the reader looks for them."""
            items = plan.items
            if any(it.type == WriteItemType.BYTE_IO for it in items):
                raise CheckpointError("a step checkpoint holds tensors only (numbers go to meta.json)")
            name = f"shard-{plan.storage_data['shard_index']:05d}.safetensors"
            entries = [(it.index.fqn, it.tensor_data.properties.dtype, tuple(it.tensor_data.chunk.sizes),
                        functools.partial(planner.resolve_data, it)) for it in items]
            offsets = {it.index.fqn: {"saved_offsets": list(it.tensor_data.chunk.offsets)} for it in items}
            if items:
                write_safetensors(os.path.join(self.path, name), entries, {
                    "DCP_SHARDING_INFO": json.dumps(offsets), "DCP_VERSION": "1.0", "format": "pt"})
            self.written = [name] if items else []
            future = Future()
            future.set_result([WriteResult(index=it.index, size_in_bytes=math.prod(it.tensor_data.chunk.sizes)
                                           * it.tensor_data.properties.dtype.itemsize, storage_data=name)
                               for it in items])
            return future
    return ShardWriter


def save_sharded(folder: str, model, opt) -> tuple:
    """Every rank writes its shards of the weights and optimizer state into `folder` (a collective).
    Returns (the names of this rank's files, the optimizer's param_groups and state keys for meta)."""
    import torch.distributed.checkpoint as dcp
    state, groups = sharded_state(model, opt)
    writer = shard_writer()(folder)
    with warnings.catch_warnings():               # one process without a group: intended, not worth a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=writer)
    return writer.written, {"param_groups": groups, "state": sorted(state["optim"])}


def load_sharded(folder: str, model, opt, saved: dict):
    """Weights and optimizer state from `folder` into this run's (possibly differently sharded)
    model and optimizer: each rank reads the slices of its own shards. `saved`: meta.json's
    optimizer entry (param_groups, and the parameters that had optimizer state when saved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict
    state, _ = sharded_state(model, opt)             # this run's layout (the optimizer's state initialised)
    missing = [k for k in saved["state"] if k not in state["optim"]]
    if missing:
        raise CheckpointError(f"{folder}: optimizer state for parameters this run does not train, e.g. {missing[:3]}")
    state["optim"] = {k: state["optim"][k] for k in saved["state"]}   # params that never had a gradient stay without
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(folder))
    except (Exception, dcp.CheckpointException) as e:    # a different model shape, a damaged shard: one line
        raise CheckpointError(f"cannot load {folder}: {reason(e)}") from None
    if TIED_HEAD not in state["model"]:
        state["model"][TIED_HEAD] = state["model"]["language_model.model.embed_tokens.weight"]
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, {"state": state["optim"], "param_groups": saved["param_groups"]},
                             options=StateDictOptions(strict=False))   # strict would demand state for every param


STAGING_MARK = ".rank0"         # a checkpoint's staging folder holds it until rank 0 renames the folder


def unshared_staging(staging: str, token: str) -> Optional[Exception]:
    """None when this rank sees the staging folder rank 0 made (its mark holds `token`), else the
    error. Every rank writes into that folder: on several nodes it must be on a file system they
    share (a node-local --out_dir gave each node its own folder, and rank 0 renamed a checkpoint
    without the others' files)."""
    mark = os.path.join(staging, STAGING_MARK)
    if os.path.isfile(mark) and Path(mark).read_text() == token:
        return None
    return RuntimeError(f"{staging}, made by rank 0, is not there on this rank: the output folder must be on a "
                        "file system every node shares")


def save_checkpoint(path: str, model, meta: dict, rank: int, world: int, rank_state: dict = None,
                    extra_files: dict = None, model_cfg: SAILVLConfig = None, opt=None):
    """The one checkpoint writer (the layouts above): files go into a staging folder beside `path`,
    which rank 0 renames to `path` once every rank is done, so a crash at any point leaves the
    previous `path` (or none), never half of one. With `opt`: a resumable step checkpoint (with each
    rank's `rank_state`); without: a stage output; `model` None: a data output (the CoT harvest).
    Rank 0 adds `extra_files` ({name: source path}, e.g. metrics.jsonl) and meta.json. A full disk or
    an unwritable folder, on any rank, is one CheckpointError on every rank; the previous one stays."""
    from torch.distributed.checkpoint import CheckpointException
    sd = full_state_dict(model) if model is not None and opt is None else None   # a collective under FSDP
    model_cfg = model_cfg or (model.cfg if model is not None else None)
    staging = os.path.abspath(path) + ".staging"

    def on_rank0(fn):                                # rank 0's own work -> its OSError (every rank's: agree)
        if rank == 0:
            try:
                fn()
            except OSError as e:
                return e

    def agree(err, extra=None):
        """Every rank's outcome: each rank raises the first failure, so none is left waiting in a
        collective that a failed rank never reaches."""
        got = all_gather((extra, reason(err) if err is not None else None))
        failed = next(((r, why) for r, (_, why) in enumerate(got) if why), None)
        if failed:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {path}: {failed[1]}"
                                  + (f" (rank {failed[0]})" if world > 1 else "") + " (the previous checkpoint, if any, is kept)")
        return [x for x, _ in got]

    token = os.urandom(8).hex() if rank == 0 else None   # rank 0's mark in the staging folder

    def make_staging():
        restore_moved_aside(os.path.abspath(path))
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        Path(staging, STAGING_MARK).write_text(token)
    token = agree(on_rank0(make_staging), token)[0]
    agree(unshared_staging(staging, token))
    mine, optim, err = [], None, None                # the files this rank writes, hashed here
    if opt is not None:
        try:
            shards, optim = save_sharded(os.path.join(staging, "state"), model, opt)
            mine += [f"state/{n}" for n in shards]
        except CheckpointException as e:            # DCP reports a failed write on every rank
            err = e
        agree(err)
    try:
        if opt is not None:
            torch.save(rank_state or {}, os.path.join(staging, f"rank{rank}.pt"))
            mine.append(f"rank{rank}.pt")
        if rank == 0:
            if sd is not None:
                write_weights(staging, sd, model_cfg)               # config.json + model.safetensors
                mine += ["config.json", "model.safetensors"]
            elif model_cfg is not None:
                Path(staging, "config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2))
                mine.append("config.json")
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, os.path.join(staging, name))
                mine.append(name)
        for name in mine:                # each rank its own files: another node's fsync may not reach them
            fsync(os.path.join(staging, name))
        files = {name: file_record(os.path.join(staging, name)) for name in mine}
    except OSError as e:
        files, err = {}, e
    every = {name: rec for theirs in agree(err, files) for name, rec in theirs.items()}

    def finish():
        full = dict(meta, world_size=world, resumable=opt is not None, optimizer=optim,
                    files=dict(sorted(every.items())), kind="model" if model is not None else "data")
        Path(staging, "meta.json").write_text(json.dumps(full, indent=1))
        os.remove(os.path.join(staging, STAGING_MARK))
        replace_dir(staging, path)
    agree(on_rank0(finish))


def reason(e: BaseException) -> str:
    """One line for a checkpoint error (torch.distributed.checkpoint's: the first failing rank's)."""
    from torch.distributed.checkpoint import CheckpointException
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__).strip()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable, small), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values, device, op: str = "sum") -> list:
    """Numbers (a list) summed, or maxed with op="max", over the ranks, element-wise (a collective;
    float64 on the model's device, as NCCL needs; as they are on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def verify_checkpoint(path: str, resumable: bool = False) -> dict:
    """meta.json of a complete checkpoint (every file listed there present with its size), else
    CheckpointError saying why."""
    meta_path = os.path.join(path, "meta.json")
    restore_moved_aside(os.path.abspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing")
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({e})") from None
    for name, rec in meta.get("files", {}).items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if isinstance(rec, str):                 # an output written before sizes were recorded: its sha256
            continue
        if not isinstance(rec, dict) or os.path.getsize(p) != rec.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} is {os.path.getsize(p)} bytes, meta.json "
                                  f"recorded {rec.get('bytes') if isinstance(rec, dict) else rec} (truncated or "
                                  f"modified after saving)")
    if meta.get("resumable"):
        if not any(n.startswith("state/") for n in meta["files"]):
            raise CheckpointError(f"checkpoint {path} is incomplete: meta.json lists no state/ shards")
    elif "model.safetensors" not in meta.get("files", {}) and meta.get("kind") != "data":
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json lists no model.safetensors")
    if resumable and not meta.get("resumable"):
        raise CheckpointError(f"{path} is a stage output, not a resumable step checkpoint (no optimizer state)")
    return meta


def is_finished_stage(path: str) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def load_checkpoint(path: str, model, opt, rank: int, world: int) -> tuple:
    """The one reader of a resumable checkpoint, saved by any number of processes: weights and
    optimizer state resharded into this run's model and `opt`; returns (meta, rank_state). A rank
    the saving run did not have takes rank 0's rank_state (its RNG states)."""
    meta = verify_checkpoint(path, resumable=True)
    saved_world = meta["world_size"]
    rank_state = torch.load(os.path.join(path, f"rank{rank if rank < saved_world else 0}.pt"), weights_only=True)
    if saved_world != world and rank_state.get("adalrs_snapshot") is not None:
        raise CheckpointError(f"{path} was saved by {saved_world} processes in the middle of an AdaLRS trial, whose "
                              f"rollback copy is per process: resume it with {saved_world} processes, or from an "
                              f"earlier checkpoint")
    load_sharded(os.path.join(path, "state"), model, opt, meta["optimizer"])
    return meta, rank_state


def step_checkpoints(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    steps = [d for d in os.listdir(folder) if re.fullmatch(r"step-\d+", d)]
    return [os.path.join(folder, d) for d in sorted(steps, key=lambda d: int(d[5:]))]   # step-1000000 after step-999999


def find_resume_checkpoint(folder: str, log) -> Optional[str]:
    """The newest complete step checkpoint of the run; incomplete ones are reported and skipped."""
    for path in reversed(step_checkpoints(folder)):
        try:
            verify_checkpoint(path, resumable=True)
            return path
        except CheckpointError as e:
            log(f"resume: refusing {path}: {e}")
    return None


def prune_checkpoints(folder: str, keep: int, step: int):
    """After step checkpoint `step` is written: the newest `keep` (0: all) up to it stay. Later ones
    are an abandoned run's (a --resume from an earlier step): they go, so that neither they count as
    the newest nor a bare --resume takes them. So do the half-written folders a crash left
    (step-N.staging, step-N.tmp-*: as large as a checkpoint), now that this rank's writing is done;
    a moved-aside step-N.old-* stays for restore_moved_aside."""
    paths = step_checkpoints(folder)
    later = [p for p in paths if int(os.path.basename(p)[5:]) > step]
    upto = [p for p in paths if p not in later]
    leftovers = [os.path.join(folder, d) for d in os.listdir(folder) if re.fullmatch(r"step-\d+\.(staging|tmp-.*)", d)]
    for path in later + (upto[:-keep] if keep > 0 else []) + leftovers:
        shutil.rmtree(path, ignore_errors=True)


# ==============================================================================================
# presets (paper Table 1) and the model factory

def preset_config(name: str) -> SAILVLConfig:
    """tiny (CPU default) / tiny-moe / tiny-anyres, and the paper's 2b / 8b / 30b-a3b."""
    qwen3_8b = LLMConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    qwen3_30b_a3b = LLMConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                              num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                              norm_topk_prob=True)
    tiny_llm = LLMConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # the tiny presets use a short system prompt: the official one is ~130 byte-level tokens per sample
    tiny = dict(vision_config=ViTConfig.preset("tiny"), max_dynamic_patch=4,
                img_context_token_id=TINY_IMG_CONTEXT_ID, system_prompt="You are UniVL, a helpful assistant.")
    presets = {
        "tiny": SAILVLConfig(llm_config=tiny_llm, **tiny),
        "tiny-moe": SAILVLConfig(llm_config=replace(tiny_llm, num_experts=8, num_experts_per_tok=2,
                                                    moe_intermediate_size=96, norm_topk_prob=True), **tiny),
        "tiny-anyres": SAILVLConfig(llm_config=tiny_llm, anyres=True, anyres_max_patches=1024, **tiny),
        "2b": SAILVLConfig(llm_config=LLMConfig()),             # Qwen3-1.7B (the official llm_config)
        "8b": SAILVLConfig(llm_config=qwen3_8b),
        "30b-a3b": SAILVLConfig(llm_config=qwen3_30b_a3b),
    }
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return presets[name]


PRESETS = ("tiny", "tiny-moe", "tiny-anyres", "2b", "8b", "30b-a3b")


# Id of <IMG_CONTEXT> in the embedded default tokenizer (data.load_tokenizer(None)): 256 bytes first,
# then the special tokens; test_model checks the two agree.
TINY_IMG_CONTEXT_ID = 263


def build_model(preset: str = "tiny", device="cpu", seed: int | None = 0) -> SAILVL:
    """A randomly initialised SAILVL. Big presets can be built with device='meta' (no memory)."""
    cfg = preset_config(preset)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta" if device == "meta" else "cpu"):
        model = SAILVL(cfg)
    if device != "meta":
        model.init_weights()
        model = model.to(device)
    return model


def reinit_module(module, seed: int):
    """A module's submodules re-initialised by their own reset_parameters (nn defaults: Linear
    Kaiming-uniform, Embedding N(0, 1)), seeded. Modules without one (RMSNorm, MoE experts, the
    ViT's position embedding) keep their values; init_weights is the model's own initialisation."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


class HostDraws(TorchDispatchMode):
    """Inside it, a random fill of a meta tensor (nn.init's uniform_ / normal_ on a module built on
    the meta device) is also made on a host scratch tensor, then dropped: the generator advances as
    if the tensor were real. The last write to each meta storage, through any alias, is kept: a fill
    of the whole of it with the generator's state before it, or nothing (a write to part of it, any
    other op), and keep_fills hands it to the module's tensors, so `remade` makes their whole-build
    values later, alone. Any other random op on a meta tensor (torch.randn under the meta device) is
    refused: its draws would go missing. (nn.init's trunc_normal_, orthogonal_, sparse_ and dirac_
    skip meta tensors in recent torch: never use them in a constructor or init_weights.)"""
    FILLS = (torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default)
    REMADE = FILLS + (torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default)    # nn.init's ones_, zeros_

    def __init__(self):
        super().__init__()
        self.fills = {}          # meta storage -> (the storage, kept alive: its id is not reused; its last fill)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, state = func(*args, **kwargs), None
        if torch.Tag.nondeterministic_seeded in func.tags and any(
                isinstance(x, torch.Tensor) and x.is_meta for x in tree_leaves((args, kwargs, out))):
            if func not in self.FILLS:
                raise NotImplementedError(f"HostDraws: {func} on the meta device (its draws are not replayed)")
            state = torch.get_rng_state()
            func(torch.empty(args[0].shape, dtype=args[0].dtype, device="cpu"), *args[1:], **kwargs)
        for x in written_tensors(func, args, kwargs):
            if x.is_meta:
                whole = func in self.REMADE and x is args[0] and x.storage_offset() == 0 \
                    and x.numel() * x.element_size() == x.untyped_storage().nbytes()
                storage = x.untyped_storage()
                self.fills[storage._cdata] = (storage, (state, func, args[1:], kwargs) if whole else None)
        return out

    def keep_fills(self, module: nn.Module):
        """Each meta parameter of `module` given the last fill of its storage (remade reads it)."""
        for p in module.parameters():
            if p.is_meta:
                p.remake = self.fills.get(p.untyped_storage()._cdata, (None, None))[1]


def written_tensors(func, args, kwargs) -> list:
    """The tensors an op writes into (in place, out=, each of a _foreach_ list)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            out += [x for x in tree_leaves(value) if isinstance(x, torch.Tensor)]
    return out


def fill_of(t: torch.Tensor, name: str) -> tuple:
    """The fill `remade` repeats for a meta tensor, or a RuntimeError naming it."""
    if getattr(t, "remake", None) is None:
        raise RuntimeError(f"{name} {tuple(t.shape)}: no fill of the whole of it to make again (HostDraws)")
    return t.remake


def remade(t: torch.Tensor, name: str = "a meta tensor") -> torch.Tensor:
    """The values of a meta tensor a HostDraws build left unmade, made now on the host from its last
    fill (with the generator's state before that fill; the generator itself is left as it is)."""
    state, func, args, kwargs = fill_of(t, name)
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    with torch.random.fork_rng(devices=[]):
        if state is not None:
            torch.set_rng_state(state)
        func(out, *args, **kwargs)
    return out


def initialised(cfg: SAILVLConfig, seed: int, fresh_seed: Optional[int] = None, fresh=()) -> SAILVL:
    """The model's own initialisation (torch.manual_seed(seed), SAILVL(cfg), init_weights(), then
    reinit_module(m, fresh_seed) for each module in `fresh`) on the meta device, its draws made on
    scratch (HostDraws): the generator's state after is the whole build's, and `remade` gives each
    tensor's whole-build values later, one at a time; a module that is read from files never takes
    the host memory (30b-a3b's LLM: 122 GB in fp32)."""
    torch.manual_seed(seed)
    draws = HostDraws()
    with torch.device("meta"), draws:
        model = SAILVL(cfg)
    with draws:
        model.init_weights()
        for name in fresh:
            reinit_module(getattr(model, name), fresh_seed)
    draws.keep_fills(model)
    return model


def config_leaves(obj, prefix: str = ""):
    """(dotted name, value) of every leaf field of a (nested) config dataclass."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            yield from config_leaves(v, prefix + f.name + ".")
        else:
            yield prefix + f.name, v


def param_shapes(model_cfg: SAILVLConfig) -> dict:
    """{parameter name: shape} of the model a config builds (on the meta device: no memory)."""
    with torch.device("meta"):
        model = SAILVL(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


MODULES = ("vision_model", "mlp1", "language_model")     # SAILVL's modules in forward order


def matmul_weights(model: SAILVL) -> dict:
    """{module: N}, the weights one token multiplies in that module (matrices and the patch
    convolution; of a MoE layer's experts the k of E a token uses): per ViT patch, per adapter
    token, per LLM token (the lm_head included, the embedding lookup not)."""
    c = model.cfg.llm_config

    def n(module, skip=()):
        return sum(p.numel() * (c.num_experts_per_tok / c.num_experts if ".experts." in name else 1)
                   for name, p in module.named_parameters() if p.dim() >= 2 and name not in skip)
    lm = model.language_model
    return {"vision_model": n(model.vision_model, ("preprocessor.pos_embed",)), "mlp1": n(model.mlp1),
            "language_model": n(lm.model.layers) + lm.lm_head.weight.numel()}


def training_flops(cfg: SAILVLConfig, weights: dict, packs: list, trainable: list) -> float:
    """Model FLOPs of a training step over `packs` (forward inputs: cu_seqlens, pixel_values),
    `weights` from matmul_weights, the modules in `trainable` training; counted as PaLM does
    (Chowdhery et al. 2022, appendix B): per token 6 N for a module whose N matmul weights train
    (2 N forward, 2 N input gradients, 2 N weight gradients), 4 N for a frozen module that gradients
    still cross (a module before it trains), 2 N for one that only runs forward; plus attention,
    12 L H D per query-key pair when gradients cross it (PaLM's 12 L H Q T per token, T = the
    sample's length, causality not discounted), 4 L H D forward only. A pack's samples attend only
    within themselves (sum of s_i^2 pairs), each ViT tile or image within itself."""
    vit, llm = cfg.vision_config, cfg.llm_config
    work = {m: [0, 0] for m in MODULES}                              # tokens, query-key pairs
    for pack in packs:
        lengths = torch.diff(pack["cu_seqlens"]).tolist()
        pv = pack.get("pixel_values")
        images = [] if pv is None else pv if isinstance(pv, list) else list(pv)      # (3, H, W) each
        patches = [(x.shape[-2] // vit.patch_size) * (x.shape[-1] // vit.patch_size) for x in images]
        for m, counts in (("vision_model", patches), ("mlp1", [x // 4 for x in patches]),
                          ("language_model", lengths)):
            work[m][0] += sum(counts)
            work[m][1] += sum(x * x for x in counts) if m != "mlp1" else 0
    lhd = {"vision_model": vit.num_hidden_layers * vit.hidden_size, "mlp1": 0,
           "language_model": llm.num_hidden_layers * llm.num_attention_heads * llm.head_dim}
    flops, grads = 0.0, False
    for m in MODULES:                          # gradients cross every module from the first that trains
        trains = m in trainable
        grads = grads or trains
        tokens, pairs = work[m]
        flops += (2 + 2 * grads + 2 * trains) * weights[m] * tokens + (4 + 8 * grads) * lhd[m] * pairs
    return flops


# dense bf16 tensor-core peak per GPU (vendor data sheets), matched in order against the device name
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
                   ("A100", 312e12), ("B200", 2250e12))


def peak_flops(device) -> Optional[float]:
    """This device's dense bf16 peak FLOP/s, or None (a CPU, a GPU not in the table): no MFU then."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def main():
    ap = argparse.ArgumentParser(description="Print a SAIL-VL2 preset's configuration and parameter counts "
                                             "(built on the meta device, so no memory is used).")
    ap.add_argument("--preset", default="tiny", choices=PRESETS, help="the model preset")
    args = ap.parse_args([a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--")
                          else a for a in sys.argv[1:]])             # --key_name works as --key-name
    model = build_model(args.preset, device="meta")
    print(json.dumps(model.cfg.to_dict(), indent=2))
    lm, c = model.language_model, model.language_model.cfg
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))          # 0 for a dense LLM
    inactive = n_moe * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    n = lambda x: f"{x / 1e9:.3f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"  # noqa: E731
    print(f"vision {n(count_params(model.vision_model))} | adapter {n(count_params(model.mlp1))} | "
          f"llm {n(count_params(lm))} (active {n(count_params(lm) - inactive)}) | total {n(count_params(model))}")


if __name__ == "__main__":
    main()
