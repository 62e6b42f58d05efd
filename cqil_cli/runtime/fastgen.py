"""Fast generation for CqilForCausalLM, in the style of gpt-fast.

transformers' generate() pays, per token, for logits processors, stopping criteria, a growing
DynamicCache (torch.cat of every layer's keys and values) and a fresh causal mask. At batch 1
on a 135M model that overhead is larger than the arithmetic. Here:

  - the KV cache is preallocated once per step: [B, P*kv_heads, max_len, head_dim]; new keys
    are written with index_copy_ (no allocation, no concatenation);
  - the decode mask is one preallocated additive row per sequence [B, 1, 1, max_len] per
    attention type (full, sliding window), updated in place by one element per token (no mask
    utilities in the loop);
  - RoPE cos/sin come from a table computed once (one per RoPE: Gemma 3's sliding layers
    have their own);
  - the prompt runs through the model's own fused steps (CqilModel.prepare_steps/run_steps);
  - the loop calls the fused steps directly (model.model.fused_steps()), then norm + lm_head on
    the last position only; with skip_layers (Unified Layer Skipping) the prompt runs through
    every step and decoding through the others;
  - optionally the decode step is compiled with torch.compile (static shapes, so one graph);
  - on CUDA the decode step is captured once as a CUDA graph and replayed for every token
    (all its inputs live in preallocated buffers updated in place), which removes the
    per-kernel launch cost that dominates a small model's decode step on a GPU.

A plain transformers model of a supported family (a row of family_table_cqil.py) is
first converted to a CqilForCausalLM with every layer its own step ("our engine with no
groups"); the conversion copies weights.
Greedy tokens equal those of generate() on the same model (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.devices import synchronize
from .configuration_cqil import FULL, SLIDING
from .edges_cqil import final_logits, next_tokens, rope_by_type, rotaries_of, scale_embeddings
from .fused_cqil import FusedLinear, linear_dtype, pack_members, rope_tables
from .modeling_cqil import CqilForCausalLM, step_inputs
from .quant_cqil import is_quantized

_TABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies independent of length


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, n_new] generated ids
    sequences: torch.Tensor  # [B, prompt + n_new] prompt (as given, padded) followed by tokens
    prefill_s: float  # prompt forward + first token, seconds
    decode_s: list[float] = field(default_factory=list)  # one entry per later token, seconds

    @property
    def decode_ms_per_token(self) -> float:
        """Median decode latency per token in milliseconds (nan when nothing was decoded)."""
        if not self.decode_s:
            return float("nan")
        ordered = sorted(self.decode_s)
        return 1000.0 * ordered[len(ordered) // 2]


class StaticKVCache:
    """Preallocated keys/values, one entry per step, with the transformers Cache.update signature.

    Before each forward the caller sets `write_pos` (cache positions of the new tokens, a
    LongTensor [T]) and `kv_len` (how many leading positions attention should see; None = all,
    which keeps shapes static for the decode loop).
    """

    def __init__(self, model: CqilForCausalLM, batch: int, max_len: int, dtype, device):
        cfg = model.config
        shape = lambda p: (batch, p * cfg.num_key_value_heads, max_len, cfg.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(len(g)), dtype=dtype, device=device) for g in cfg.groups]
        self.v = [torch.zeros(shape(len(g)), dtype=dtype, device=device) for g in cfg.groups]
        self.batch, self.max_len = batch, max_len
        self.write_pos: torch.Tensor | None = None
        self.kv_len: int | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, step_idx: int):
        """k, v [B, P*G, T, hd] -> the step's keys and values [B, P*G, kv_len, hd]."""
        ck, cv = self.k[step_idx], self.v[step_idx]
        ck.index_copy_(2, self.write_pos, k)
        cv.index_copy_(2, self.write_pos, v)
        if self.kv_len is None:
            return ck, cv
        return ck[:, :, : self.kv_len], cv[:, :, : self.kv_len]



class FastGenerator:
    """Static-cache generation for a CqilForCausalLM (or a plain model of a supported family).

    gen = FastGenerator(model)                  # converts a plain HF model (all single steps)
    out = gen.generate(input_ids, attention_mask, max_new_tokens=64)
    out.tokens, out.prefill_s, out.decode_s

    compile=True compiles the decode step with torch.compile (needs a C++ compiler on CPU);
    the first call then includes compilation, so warm up before timing.
    cuda_graph (default: on for CUDA models) replays the decode step as a captured CUDA graph;
    the graph is captured on the first decode step of a call and kept while the batch size,
    total length, dtype and weights stay the same.
    """

    def __init__(self, model, compile: bool = False, cuda_graph: bool | None = None):
        if not isinstance(model, CqilForCausalLM) and type(model).__name__ != "CqilForCausalLM":
            from .checkpoint import build_cqil_model

            model = build_cqil_model(model, None, 0)
        self.model = model.eval()
        self.config = model.config
        self.compile = compile
        self.cuda_graph = cuda_graph
        self._decode_fn = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._graph_logits: torch.Tensor | None = None
        self._cache: StaticKVCache | None = None
        self._tables: dict | None = None  # layer type -> RoPE tables (cos, sin) [max_len, 1, r]
        self._one_rope = True  # sliding layers use the full layers' tables
        self._lm_w, self._lm_key = None, None

    # -- pieces of one forward

    def _rope(self, max_len: int, device, dtype) -> dict | None:
        """layer type -> RoPE tables [max_len, 1, r] in the fused form, or None when a RoPE type
        depends on the length (then computed per step)."""
        tables, by_module = {}, {}
        dummy = torch.empty(1, dtype=dtype, device=device)
        for kind, rope in rotaries_of(self.model.model).items():
            if rope.rope_type not in _TABLE_ROPE_TYPES:
                return None
            if id(rope) not in by_module:
                cos, sin = rope_tables(*rope(dummy, torch.arange(max_len, device=device)[None]))
                by_module[id(rope)] = (cos[0].contiguous(), sin[0].contiguous())
            tables[kind] = by_module[id(rope)]
        return tables

    def _cos_sin(self, positions: torch.Tensor, dtype) -> dict:
        """positions [B, T] -> layer type -> (cos, sign-folded sin) [B, T, 1, r]."""
        if self._tables is not None:
            full = self._tables[FULL]
            out = {FULL: (full[0][positions], full[1][positions])}
            local = self._tables[SLIDING]
            # a plain bool (torch.compile cannot trace `is` between tuples: it fell back to eager)
            out[SLIDING] = out[FULL] if self._one_rope else (local[0][positions], local[1][positions])
            return out
        dummy = torch.empty(1, dtype=dtype, device=positions.device)
        ropes = rope_by_type(rotaries_of(self.model.model), dummy, positions)
        out = {FULL: rope_tables(*ropes[FULL])}
        out[SLIDING] = out[FULL] if ropes[SLIDING] is ropes[FULL] else rope_tables(*ropes[SLIDING])
        return out

    def _lm_matrix(self) -> torch.Tensor:
        """lm_head in the faster layout, without a second copy: in fp32 on CPU the parameter
        itself is re-laid out as [d, V] storage (pack_members; a tied embedding is the same
        parameter, and its lookups read the strided rows), prepacked where bf16 is."""
        head = self.model.lm_head
        if is_quantized(head):  # its kernel caches itself, and is rebuilt when a buffer changes
            self._lm_w = head.kernel()
            self._lm_key = id(self._lm_w)
            return self._lm_w
        w = head.weight
        if self._lm_key != (w.data_ptr(), w._version, w.dtype):
            with torch.no_grad():
                if self.compile or not FusedLinear.packs(w):
                    pack_members([[w]])  # re-points w.data: the old storage is freed
                self._lm_w = FusedLinear(w, prepack=not self.compile)
                self._lm_key = (w.data_ptr(), w._version, w.dtype)
        return self._lm_w

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] last hidden state -> logits [B, V] (final norm, lm_head, as every engine)."""
        return final_logits(self.config, self.model.model.norm, self._lm_w, h)

    def _decode(self, tok, pos, write_pos, masks):
        """One token for every sequence: tok/pos [B, 1], write_pos [1], masks (layer type ->
        additive row [B, 1, 1, max_len]) -> logits [B, V]."""
        x = scale_embeddings(self.config, self.model.model.embed_tokens(tok))  # [B, 1, d]
        ropes = self._cos_sin(pos, x.dtype)  # layer type -> [B, 1, 1, r]
        masks = {kind: (row, False) for kind, row in masks.items()}
        self._cache.write_pos = write_pos
        for s, step, kinds in self._decode_steps:
            x = step(x, *step_inputs(kinds, ropes, masks), self._cache, s)
        return self._logits(x[:, -1])

    def _replay(self, decode) -> torch.Tensor:
        """Run the decode step as a CUDA graph (captured on first use) -> logits [B, V]."""
        key = (id(self._steps), self._lm_key, id(self._cache), decode is self._decode_fn)
        if self._graph is None or self._graph_key != key:
            args = (self._tok, self._pos, self._write_pos, self._mask_rows)
            # Warm-up on a side stream (also compiles, if compiling); it writes this token's
            # keys and values into the cache, which the replay below writes again, identically.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    decode(*args)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_logits = decode(*args)
            self._graph_key = key
        self._graph.replay()
        return self._graph_logits

    # -- the public entry point

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
        top_p: float | None = None,
    ) -> GenerationResult:
        """Generate `max_new_tokens` tokens after a (left-padded) prompt batch: greedy, or with
        do_sample drawn as the distributed engine draws (distributed_cqil.next_tokens:
        temperature, top_k, top_p, a CPU generator seeded with `seed`, default 0), so the two
        engines draw the same tokens from the same logits.

        attention_mask [B, T]: 1 = token, 0 = left padding. With `eos_token_id`, a finished
        sequence continues with `pad_token_id` (default: the eos id) and the loop stops once
        all sequences have finished; without it exactly max_new_tokens are produced.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        model, cfg = self.model, self.config
        device = model.model.embed_tokens.weight.device
        dtype = linear_dtype(model.lm_head)
        input_ids = input_ids.to(device)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        max_len = T + max_new_tokens
        window = cfg.sliding_window
        eos = None
        if eos_token_id is not None:
            eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
            pad = int(pad_token_id if pad_token_id is not None else eos[0])
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed)) if do_sample else None

        def pick(logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B]
            return next_tokens(logits, do_sample, temperature, top_k, top_p, gen)

        # Static state for this call: cache, RoPE table, decode mask row, positions.
        if self._cache is None or (self._cache.batch, self._cache.max_len) != (B, max_len) \
                or self._cache.k[0].dtype != dtype or self._cache.k[0].device != device:
            self._cache = StaticKVCache(model, B, max_len, dtype, device)
            self._tables = self._rope(max_len, device, dtype)
            self._one_rope = self._tables is not None and self._tables[SLIDING] is self._tables[FULL]
            # Decode inputs, preallocated and updated in place (a CUDA graph reads these addresses).
            self._tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # [B, 1] current token
            self._pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # [B, 1] its RoPE position
            self._write_pos = torch.zeros(1, dtype=torch.long, device=device)  # [1] its cache slot
            self._mask_rows = {kind: torch.empty(B, 1, 1, max_len, dtype=dtype, device=device)
                               for kind in sorted(set(cfg.layer_types))}  # additive masks
            self._decode_fn = None  # shapes changed: a compiled step would recompile
            self._graph = None
        self._steps = model.model.fused_steps(prepack=not self.compile)
        # Unified Layer Skipping: the prompt runs through every step, decoding skips these.
        skipped = set(cfg.skip_layers or [])
        self._decode_steps = [(s, step, [cfg.layer_types[i] for i in cfg.groups[s]])
                              for s, step in enumerate(self._steps) if cfg.groups[s][0] not in skipped]
        self._lm_matrix()
        cache = self._cache
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)  # like generate()

        # Prefill: the prompt through every step (the model's own fused forward, without its
        # final norm and head), keys written to positions 0..T-1.
        synchronize(device)
        t0 = time.perf_counter()
        x, context = model.model.prepare_steps(input_ids, attention_mask=attention_mask,
                                               position_ids=positions)  # x [B, T, d]
        cache.write_pos, cache.kv_len = torch.arange(T, device=device), T
        x = model.model.run_steps(x, context, cache, fused=True)
        tok = pick(self._logits(x[:, -1]))  # [B]
        finished = torch.isin(tok, eos) if eos is not None else None
        out = [tok]
        synchronize(device)
        prefill_s = time.perf_counter() - t0

        # Decode state, preallocated: everything below is updated in place. The mask is additive
        # (0 = visible, -inf = hidden): SDPA would otherwise convert a bool mask on every call.
        cache.kv_len = None
        mask_rows, pos, write_pos = self._mask_rows, self._pos, self._write_pos
        sliding = mask_rows.get(SLIDING)
        for row in mask_rows.values():
            row.fill_(float("-inf"))
            row[:, 0, 0, :T].masked_fill_(attention_mask.bool(), 0.0)
        if sliding is not None and T - window > 0:
            sliding[..., : T - window] = float("-inf")  # left of the first decode query's window
        pos.copy_(positions[:, -1:])  # [B, 1] position of the last token per sequence
        write_pos.fill_(T - 1)
        decode = self._decode
        if self.compile:
            if self._decode_fn is None:
                # every generator's _decode is one code object to dynamo: each model (and batch
                # size, or length) is a recompilation of it, and past the limit (8) it would
                # silently run eagerly
                dynamo = torch._dynamo.config
                dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
                dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 512)
                self._decode_fn = torch.compile(self._decode, dynamic=False)
            decode = self._decode_fn
        use_graph = self.cuda_graph if self.cuda_graph is not None else device.type == "cuda"
        if use_graph and device.type != "cuda":
            raise ValueError("cuda_graph needs a model on a CUDA device")
        if use_graph and self._tables is None:  # RoPE computed per step: not capturable
            if self.cuda_graph:
                raise ValueError(f"cuda_graph does not support RoPE type "
                                 f"'{model.model.rotary_emb.rope_type}' (computed per step)")
            use_graph = False
        decode_s: list[float] = []
        for i in range(1, max_new_tokens):
            if finished is not None and bool(finished.all()):
                break
            t1 = time.perf_counter()
            write_pos += 1
            pos += 1
            q = T + i - 1  # cache position of this token
            for row in mask_rows.values():
                row[..., q] = 0.0
            if sliding is not None and q - window >= 0:
                sliding[..., q - window] = float("-inf")
            self._tok.copy_(tok[:, None])
            if use_graph:
                logits = self._replay(decode)
            else:
                logits = decode(self._tok, pos, write_pos, mask_rows)
            nxt = pick(logits)
            if finished is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, eos)
            tok = nxt
            out.append(tok)
            synchronize(device)
            decode_s.append(time.perf_counter() - t1)
        tokens = torch.stack(out, dim=1)  # [B, n_new]
        return GenerationResult(
            tokens=tokens, sequences=torch.cat([input_ids, tokens], dim=1), prefill_s=prefill_s, decode_s=decode_s
        )


def fast_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 64, **kwargs) -> GenerationResult:
    """One-off convenience wrapper around FastGenerator(model).generate(...)."""
    return FastGenerator(model).generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)


__all__ = ["FastGenerator", "GenerationResult", "StaticKVCache", "fast_generate"]
