"""`LmkitForCausalLM`: a GPT-2-class decoder in one file, inside the Hugging Face `PreTrainedModel` shell.

token embedding -> positions (learned | sinusoidal | rope) -> n_layer pre-LayerNorm blocks (causal self-attention
through `F.scaled_dot_product_attention`, MLP) -> final LayerNorm -> LM head tied to the token embedding -> logits.

Parameter names are GPT-2's (`transformer.wte`, `transformer.h.N.attn.c_attn`, ...) and every weight is an
`nn.Linear`, so a learned-position model converts to and from `transformers.GPT2LMHeadModel` by transposing GPT-2's
`Conv1D` weights (`from_gpt2`, `to_gpt2`; a sinusoidal model converts to it too, its table becoming `wpe`).
Shapes: B batch, T new tokens, S = past + T keys, C = n_embd, nh = n_head, hs = head_dim, V = vocab_size.
"""

import math
import os
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg

from lmkit.configuration import LMKIT_ONLY_FIELDS, LmkitConfig, check_gpt2_compatible
from lmkit.errors import UserError

# Fused PyTorch kernels. GPT-2's "gelu_new" is the tanh approximation of GELU; transformers evaluates it as seven
# separate elementwise ops, `approximate="tanh"` computes the same function in one kernel.
ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU, as transformers' ACT2FN["relu2"] computes it
}
# GPT-2 stores these as Conv1D, i.e. (in, out); nn.Linear stores (out, in). Everything else maps unchanged.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def inverse_frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    """The `dim // 2` angular frequencies base^(-2i/dim) shared by the sinusoidal table and rope, in fp32.

    Written as 1 / base^(2i/dim), the order of operations of transformers' GPT-NeoX and Llama rotary embeddings (and
    vLLM's): base^(-2i/dim) rounds differently in the last bit, which at position 2000 moves an angle by ~1e-4 and
    would keep a GPT-NeoX export (`lmkit.exporting`) from giving exactly lmkit's logits.
    """
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed (n_positions, dim) table of "Attention Is All You Need" section 3.5.

    PE(pos, 2i) = sin(pos / 10000^(2i/dim)) and PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)).
    """
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * inverse_frequencies(dim, 10000.0)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # interleave sin/cos -> (P, dim)


def scaled_sinusoidal_table(config: LmkitConfig) -> torch.Tensor:
    """The sinusoidal table at the scale of the token embeddings, as the model adds it.

    "Attention Is All You Need" multiplies its token embeddings by sqrt(d_model) to match the unit-amplitude table.
    GPT-2's embeddings start at N(0, initializer_range) and double as the LM head, so the table is scaled down to
    that size instead; unscaled, positions drown the tokens (150 byte-level steps: loss 3.32 vs 2.90-2.96).
    """
    return sinusoidal_table(config.n_positions, config.n_embd) * config.initializer_range


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for `position_ids` (B, T), each (B, 1, T, hs), computed in fp32.

    Computed per forward from the positions (a few thousand sin/cos) rather than cached, so left padding, the KV
    cache and a model cast to bf16 all see exact angles.
    """
    angles = position_ids[..., None].float() * inverse_frequencies(head_dim, theta, position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hs/2}) pair of `x` (B, nh, T, hs) by its position's angle (RoFormer, eq. 34).

    RoFormer rotates adjacent pairs (x_2i, x_2i+1); pairing i with i + hs/2 ("rotate half", as GPT-NeoX and Llama do)
    is the same rotation up to a fixed permutation of the head dimensions, which the learned projections absorb,
    and it needs no strided gathers.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_mask(attention_mask: torch.Tensor | None, past_length: int, query_length: int) -> torch.Tensor | None:
    """The boolean SDPA mask (B|1, 1, T, S), True = may attend; None when SDPA's own `is_causal` path is exact.

    `is_causal` aligns the triangle to the top-left corner, which is right only without a cache (T == S) or for a
    single query (which may see every key), and only without padding.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past_length == 0 or query_length == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    key_positions = torch.arange(past_length + query_length, device=device)
    query_positions = key_positions[past_length:, None]
    mask = (key_positions <= query_positions)[None, None]  # (1, 1, T, S)
    if padded:
        mask = mask & attention_mask[:, None, None, :].bool()
        # A left-pad query has no visible key at all, and SDPA turns an all-masked row into NaN, which would then
        # leak into real positions through 0 * NaN in the next layer's attention. Let each query see itself.
        mask = mask | (key_positions == query_positions)[None, None]
    return mask


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) against targets (N,) (-100 ignored), in fp32 whatever the logits' dtype.

    The same value and gradient as `F.cross_entropy(logits.float(), targets, reduction="sum")`, computed a few rows
    at a time: the fp32 copy, log-softmax and softmax gradient of each chunk stay in cache instead of streaming
    three full fp32 copies of the (B*T, V) logits through memory. That halves the loss's cost on CPU, where it is a
    fifth of a training step at GPT-2 small widths (benchmarks/bench_model.py).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # ~1 MB of fp32 per chunk on CPU (cache-sized); on accelerators fewer, larger chunks keep launches few.
        ctx.rows = max(1, (2**18 if logits.device.type == "cpu" else 2**26) // logits.shape[1])
        valid = targets != -100
        target_logits = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0].float()
        logsumexp = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(ctx.rows)])
        ctx.save_for_backward(logits, targets, logsumexp)
        return ((logsumexp - target_logits) * valid).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        row_weight = (targets != -100).float() * grad_loss
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            softmax = (logits[rows].float() - logsumexp[rows, None]).exp_()  # d(logsumexp)/d(logits)
            softmax[torch.arange(softmax.shape[0]), targets[rows].clamp(min=0)] -= 1  # minus d(target logit)
            grad[rows] = softmax.mul_(row_weight[rows, None])
        return grad, None


class LmkitAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection, as GPT-2's `c_attn`."""

    def __init__(self, config: LmkitConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True  # scaled at init, see `_init_weights`
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # GPT-2 can switch off the 1/sqrt(hs) scaling of "Attention Is All You Need"; SDPA takes the factor directly.
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0

    def forward(self, x, mask=None, rope=None, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            # RoFormer: rotate queries and keys only, so q.k depends on the positions' difference alone.
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            is_causal=mask is None and T > 1 and T == k.shape[2],
            scale=self.scale,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class LmkitMLP(nn.Module):
    def __init__(self, config: LmkitConfig):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.act = ACTIVATIONS[config.activation_function]
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class LmkitBlock(GradientCheckpointingLayer):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); GPT-2 (section 2.3) moved LayerNorm to the input."""

    def __init__(self, config: LmkitConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = LmkitAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = LmkitMLP(config)

    # hidden_states stays positional: GradientCheckpointingLayer replays positional inputs; `cache` is a keyword so
    # that it is dropped under checkpointing (a replay would append to the cache twice).
    def forward(self, hidden_states, mask=None, rope=None, cache: Cache | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), mask, rope, cache)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class LmkitTransformer(nn.Module):
    """The decoder stack without the LM head (GPT-2's `GPT2Model`), exposed as `LmkitForCausalLM.transformer`."""

    def __init__(self, config: LmkitConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position_embedding_type == "learned":
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        elif config.position_embedding_type == "sinusoidal":
            # A fixed function of the position, not a weight: non-persistent, so it is never saved, and
            # `_init_weights` recomputes it when from_pretrained builds the model on the meta device.
            self.register_buffer("wpe_table", scaled_sinusoidal_table(config), persistent=False)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(LmkitBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("LmkitForCausalLM takes a 2-D (batch, past + new tokens) attention_mask")
        if position_ids is None:
            position_ids = _positions(attention_mask, past_length, T, x.device)  # (B|1, T)
        rope = None
        kind = self.config.position_embedding_type
        if kind == "learned":
            x = x + self.wpe(position_ids)
        elif kind == "sinusoidal":
            x = x + F.embedding(position_ids, self.wpe_table).to(x.dtype)
        else:
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.drop(x)
        mask = causal_mask(attention_mask, past_length, T)
        for block in self.h:
            x = block(x, mask, rope, cache=cache)
        return self.ln_f(x)


def _positions(attention_mask, past_length: int, length: int, device) -> torch.Tensor:
    """Position of each new token: counted over real tokens only, so a left-padded row numbers like an unpadded one."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(past_length, past_length + length, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -length:]


class LmkitPreTrainedModel(PreTrainedModel):
    config_class = LmkitConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LmkitBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """GPT-2 initialisation: N(0, initializer_range) for weights, zero biases, unit LayerNorms; the residual
        projections scaled down (or zero, `zero_init_projections`)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            residual = getattr(module, "is_residual_projection", False)
            if residual and self.config.zero_init_projections:
                init.zeros_(module.weight)
            else:
                if residual:
                    # GPT-2 paper section 2.3: "scale the weights of residual layers at initialization by a factor of
                    # 1/sqrt(N) where N is the number of residual layers" -- two residual branches per block.
                    std = std / math.sqrt(2 * self.config.n_layer)
                init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LmkitTransformer) and hasattr(module, "wpe_table"):
            init.copy_(module.wpe_table, scaled_sinusoidal_table(self.config))


class LmkitForCausalLM(LmkitPreTrainedModel, GenerationMixin):
    """The decoder with its language-modelling head; logits are pre-softmax scores, the loss is next-token CE."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "transformer.wte.weight"}
    # Trainer passes `num_items_in_batch` so that a loss summed over accumulated micro-batches is a true mean.
    accepts_loss_kwargs = True

    def __init__(self, config: LmkitConfig):
        super().__init__(config)
        self.transformer = LmkitTransformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits (B, T', V) for `input_ids` (B, T), plus the loss when `labels` are given.

        Args:
            input_ids: token ids (B, T); with a `cache`, only the tokens not yet in it.
            attention_mask: (B, past + T), 1 for real tokens and 0 for (left) padding.
            position_ids: (B, T); by default counted from the first real token of each row.
            cache: the key/value `Cache` of earlier tokens (generation); a `DynamicCache` is made when `use_cache`.
            inputs_embeds: (B, T, C) instead of `input_ids`.
            labels: (B, T) targets, usually `input_ids`; shifted inside, -100 is ignored.
            use_cache: return the cache; defaults to `config.use_cache` outside training.
            logits_to_keep: compute logits for the last N positions only (0 = all), or for these indices.
            num_items_in_batch: when given, the loss is sum / num_items_in_batch instead of the mean, so that
                gradient accumulation over micro-batches of different sizes averages over all tokens.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("LmkitForCausalLM attends through SDPA and cannot return attention weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_states = self.transformer(input_ids, attention_mask, position_ids, cache, inputs_embeds)
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))  # (B, T', V)

        loss = None
        if labels is not None:
            # Shift the labels, not the logits: padding one ignored label on the right pairs position t with token
            # t + 1 without copying the (B, T, V) logits.
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device).flatten()
            loss = ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets)
            if num_items_in_batch is None:
                loss = loss / (targets != -100).sum()
            else:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    # ---- exchange with transformers' GPT-2 ----

    @classmethod
    def from_gpt2(cls, path_or_model: "str | os.PathLike | GPT2LMHeadModel") -> "LmkitForCausalLM":
        """Import a `GPT2LMHeadModel` (a model or a local directory with safetensors weights) as learned positions."""
        gpt2 = path_or_model
        if not isinstance(gpt2, GPT2LMHeadModel):
            gpt2 = GPT2LMHeadModel.from_pretrained(path_or_model, use_safetensors=True)
        source = gpt2.config
        try:
            check_gpt2_compatible(source)
        except UserError as exc:
            raise UserError(f"{path_or_model}: cannot import this GPT-2: {exc}") from None
        config = LmkitConfig(position_embedding_type="learned", **_shared_fields(source))
        model = cls(config).to(gpt2.dtype)
        # Older GPT-2 checkpoints carry the causal mask as buffers named attn.bias / attn.masked_bias.
        state = {k: v for k, v in gpt2.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        model.load_state_dict(_transpose_conv1d(state), strict=True)
        model.generation_config = gpt2.generation_config
        return model

    def to_gpt2(self, activation_function: str | None = None) -> GPT2LMHeadModel:
        """This model as a `transformers.GPT2LMHeadModel` with the same outputs (learned or sinusoidal positions).

        A sinusoidal model's fixed table becomes GPT-2's `wpe` weight: the same numbers, added the same way.

        Args:
            activation_function: GPT-2's name for the activation, by default this model's own; `lmkit.exporting` passes
                the name of the kernel lmkit runs, which makes the logits bit-identical.
        """
        if self.config.position_embedding_type not in ("learned", "sinusoidal"):
            raise UserError(
                "model.position_embedding_type must be 'learned' or 'sinusoidal' to export to GPT-2, "
                f"got {self.config.position_embedding_type!r} (rope exports to GPT-NeoX, see lmkit.exporting)"
            )
        fields = _shared_fields(self.config)
        fields["activation_function"] = activation_function or fields["activation_function"]
        gpt2 = GPT2LMHeadModel(GPT2Config(**fields)).to(self.dtype)
        state = self.state_dict()
        if self.config.position_embedding_type == "sinusoidal":
            # lmkit adds the fp32 table cast to the activations' dtype; GPT-2 adds its wpe, stored in that dtype.
            state["transformer.wpe.weight"] = self.transformer.wpe_table.to(self.dtype)
        gpt2.load_state_dict(_transpose_conv1d(state), strict=True)
        gpt2.generation_config = self.generation_config
        return gpt2.train(self.training)


# The GPT-2 fields both configs share: all of LmkitConfig's but the ones lmkit adds.
_GPT2_FIELDS = tuple(name for name in LmkitConfig.architecture_keys() if name not in LMKIT_ONLY_FIELDS)


def _shared_fields(config) -> dict:
    return {name: getattr(config, name) for name in _GPT2_FIELDS}


def _transpose_conv1d(state: dict) -> dict:
    """Conv1D (in, out) <-> nn.Linear (out, in): the same transpose converts in both directions."""
    return {k: v.t().contiguous() if k.endswith(_CONV1D_SUFFIXES) else v for k, v in state.items()}


# `import lmkit` imports this module once transformers is imported: AutoConfig and AutoModelForCausalLM then read a
# directory whose config.json says model_type "lmkit" (no trust_remote_code involved).
AutoConfig.register("lmkit", LmkitConfig, exist_ok=True)
AutoModelForCausalLM.register(LmkitConfig, LmkitForCausalLM, exist_ok=True)
