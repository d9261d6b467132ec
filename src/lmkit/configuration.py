"""`LmkitConfig`: GPT-2's configuration, field for field, plus the choice of positional encoding.

The field names, defaults and `attribute_map` are GPT-2's (`transformers.GPT2Config`), so a GPT-2 `config.json` reads
the same here and a learned-position lmkit config maps back onto `GPT2Config` one to one (see the method
`lmkit.modeling.LmkitForCausalLM.to_gpt2`). What lmkit adds is `position_embedding_type` (`learned` | `sinusoidal` |
`rope`) and `rope_theta`.

This module imports no torch itself, but transformers' configuration base class does: importing it costs about as
much as importing the model.
"""

import dataclasses
from typing import ClassVar

from transformers.configuration_utils import PreTrainedConfig

import lmkit
from lmkit.settings import SettingError, check_fields, setting

POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal", "rope")
# The activations `modeling.py` implements with fused PyTorch kernels; "gelu_new" is GPT-2's tanh-approximated GELU.
ACTIVATION_FUNCTIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "relu2")
# GPT2Config fields that change GPT-2's forward pass in ways lmkit does not implement: accepting them silently would
# make `from_gpt2` produce a different model.
_UNSUPPORTED_GPT2_FLAGS = ("scale_attn_by_inverse_layer_idx", "add_cross_attention")
# The fields lmkit adds to GPT-2's; every other architecture field maps one to one onto GPT2Config.
LMKIT_ONLY_FIELDS = ("position_embedding_type", "rope_theta", "zero_init_projections")


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
        position_embedding_type (`str`, defaults to `"learned"`): `learned` (a trained table, GPT-2's),
            `sinusoidal` (the fixed table of "Attention Is All You Need"; exports to GPT-2 too) or `rope` (rotary
            positions, RoFormer; no position embedding is added; exports to GPT-NeoX), see `lmkit.exporting`.
        rope_theta (`float`, defaults to 10000.0): base of the rotary frequencies.
        zero_init_projections (`bool`, defaults to False): start the residual output projections (attention and MLP
            `c_proj`) at zero, as modded-nanogpt does, instead of GPT-2's scaled normal; each block then starts as the
            identity. It changes only the initialisation, so it is dropped on export.
    """

    model_type = "lmkit"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = setting(50257, minimum=1)
    n_positions: int = setting(1024, minimum=1)
    n_embd: int = setting(768, minimum=1)
    n_layer: int = setting(12, minimum=1)
    n_head: int = setting(12, minimum=1)
    n_inner: int | None = setting(None, minimum=1)
    activation_function: str = setting("gelu_new", choices=ACTIVATION_FUNCTIONS)
    resid_pdrop: float = setting(0.1, minimum=0, below=1)
    embd_pdrop: float = setting(0.1, minimum=0, below=1)
    attn_pdrop: float = setting(0.1, minimum=0, below=1)
    layer_norm_epsilon: float = setting(1e-5, above=0)
    initializer_range: float = setting(0.02, above=0)
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = setting(None, minimum=0)
    eos_token_id: int | None = setting(None, minimum=0)
    pad_token_id: int | None = setting(None, minimum=0)
    tie_word_embeddings: bool = True
    position_embedding_type: str = setting("learned", choices=POSITION_EMBEDDING_TYPES)
    rope_theta: float = setting(10000.0, above=1)
    zero_init_projections: bool = False

    def __post_init__(self, **kwargs):
        check_gpt2_compatible(kwargs)
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
        check_fields(self, "model", self.architecture_keys())
        if self.n_embd % self.n_head:
            raise SettingError("n_embd", f"must be divisible by model.n_head, got n_embd={self.n_embd} and "
                                         f"n_head={self.n_head}", "model")
        # Both fixed encodings pair dimensions into (sin, cos) of one frequency, so they need an even width.
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise SettingError("n_head", f"must leave an even head dimension for rope, got n_embd/n_head = "
                                         f"{self.head_dim}", "model")
        if self.position_embedding_type == "sinusoidal" and self.n_embd % 2:
            raise SettingError("n_embd", f"must be even for sinusoidal positions, got {self.n_embd}", "model")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise SettingError(name, f"must be a token id in [0, {self.vocab_size}) or null, got {value!r}",
                                   "model")


def check_gpt2_compatible(gpt2_fields) -> None:
    """Refuse the GPT-2 options whose forward pass lmkit does not implement (a config dict or a GPT2Config)."""
    get = gpt2_fields.get if isinstance(gpt2_fields, dict) else lambda name: getattr(gpt2_fields, name, None)
    for flag in _UNSUPPORTED_GPT2_FLAGS:
        if get(flag):
            raise SettingError(flag, "is a GPT-2 option lmkit does not implement; leave it unset or false", "model")


# Importing this module may be what first imported transformers; `import lmkit` then registers the Auto classes now.
lmkit._finish_deferred_registration()
