"""`LmkitConfig`: GPT-2's configuration, field for field, plus the choice of positional encoding.

The field names, defaults and `attribute_map` are GPT-2's (`transformers.GPT2Config`), so a GPT-2 `config.json` reads
the same here and a learned-position lmkit config maps back onto `GPT2Config` one to one (see `modeling.to_gpt2`).
What lmkit adds is `position_embedding_type` (`learned` | `sinusoidal` | `rope`) and `rope_theta`.

This module imports no torch itself, so recipes can be validated without building a model (transformers may still
load torch on its own when it is installed).
"""

import dataclasses
from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig

from lmkit.errors import UserError

POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal", "rope")
# The activations `modeling.py` implements with fused PyTorch kernels; "gelu_new" is GPT-2's tanh-approximated GELU.
ACTIVATION_FUNCTIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")
# GPT2Config fields that change GPT-2's forward pass in ways lmkit does not implement: accepting them silently would
# make `from_gpt2` produce a different model.
_UNSUPPORTED_GPT2_FLAGS = ("scale_attn_by_inverse_layer_idx", "add_cross_attention")


class LmkitConfig(PreTrainedConfig):
    r"""Configuration of `LmkitForCausalLM`, a pre-LayerNorm GPT-2-class decoder.

    Every argument is a keyword; the defaults are GPT-2 small's. Errors name the recipe key as `model.<field>`.

    Args:
        vocab_size (`int`, defaults to 50257): number of token ids; lmkit derives it from the tokenizer.
        n_positions (`int`, defaults to 1024): the longest sequence the model accepts.
        n_embd (`int`, defaults to 768): width of the residual stream (`hidden_size`).
        n_layer (`int`, defaults to 12): number of transformer blocks (`num_hidden_layers`).
        n_head (`int`, defaults to 12): attention heads per block (`num_attention_heads`); must divide `n_embd`.
        n_inner (`int`, *optional*): width of the MLP; `None` means `4 * n_embd`, as in GPT-2.
        activation_function (`str`, defaults to `"gelu_new"`): one of `ACTIVATION_FUNCTIONS`.
        resid_pdrop (`float`, defaults to 0.1): dropout on each residual branch output.
        embd_pdrop (`float`, defaults to 0.1): dropout on the summed embeddings.
        attn_pdrop (`float`, defaults to 0.1): dropout on the attention probabilities.
        layer_norm_epsilon (`float`, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation.
        scale_attn_weights (`bool`, defaults to True): scale attention scores by 1/sqrt(head_dim).
        use_cache (`bool`, defaults to True): return the key/value cache (for generation).
        bos_token_id, eos_token_id, pad_token_id (`int`, *optional*): special ids; lmkit takes them from the
            tokenizer.
        tie_word_embeddings (`bool`, defaults to True): share the LM head with the token embedding, as GPT-2 does.
        position_embedding_type (`str`, defaults to `"learned"`): `learned` (a trained table, GPT-2's and the only
            type that exports to GPT-2), `sinusoidal` (the fixed table of "Attention Is All You Need") or `rope`
            (rotary positions, RoFormer; no position embedding is added).
        rope_theta (`float`, defaults to 10000.0): base of the rotary frequencies.
    """

    model_type = "lmkit"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    position_embedding_type: str = "learned"
    rope_theta: float = 10000.0

    def __post_init__(self, **kwargs):
        for flag in _UNSUPPORTED_GPT2_FLAGS:
            if kwargs.get(flag):
                raise UserError(f"model.{flag} is a GPT-2 option lmkit does not implement; leave it unset or false")
        self._validate()
        super().__post_init__(**kwargs)

    @classmethod
    def architecture_keys(cls) -> list[str]:
        """The keyword arguments this class declares (GPT-2's and lmkit's), not PreTrainedConfig's generic ones."""
        return [field.name for field in dataclasses.fields(cls) if field.name in cls.__annotations__]

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def _validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _check_positive_int(name, getattr(self, name))
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd must be divisible by model.n_head, got n_embd={self.n_embd} and n_head={self.n_head}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise UserError(
                f"model.position_embedding_type must be one of {', '.join(POSITION_EMBEDDING_TYPES)}, "
                f"got {self.position_embedding_type!r}"
            )
        # Both fixed encodings pair dimensions into (sin, cos) of one frequency, so they need an even width.
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise UserError(
                f"model.n_head must leave an even head dimension for rope, got n_embd/n_head = {self.head_dim}"
            )
        if self.position_embedding_type == "sinusoidal" and self.n_embd % 2:
            raise UserError(f"model.n_embd must be even for sinusoidal positions, got {self.n_embd}")
        if not _is_number(self.rope_theta) or self.rope_theta <= 1:
            raise UserError(f"model.rope_theta must be a number > 1, got {self.rope_theta!r}")
        if self.activation_function not in ACTIVATION_FUNCTIONS:
            raise UserError(
                f"model.activation_function must be one of {', '.join(ACTIVATION_FUNCTIONS)}, "
                f"got {self.activation_function!r}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise UserError(f"model.{name} must be a probability in [0, 1), got {value!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise UserError(f"model.{name} must be a number > 0, got {value!r}")
        for name in ("scale_attn_weights", "use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise UserError(f"model.{name} must be a token id in [0, {self.vocab_size}) or null, got {value!r}")


def _is_int(value) -> bool:
    # YAML `true` is a Python bool, which is an int subclass; a flag is never a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value <= 0:
        raise UserError(f"model.{name} must be a positive integer, got {value!r}")
