"""Export a trained lmkit model to a stock transformers architecture, which loads (and serves) without lmkit.

Every position type has an exact stock equivalent:

- learned positions -> `GPT2LMHeadModel`: the same weights (`LmkitForCausalLM.to_gpt2`);
- sinusoidal -> `GPT2LMHeadModel` whose `wpe` holds lmkit's scaled sinusoidal table (the same function's output);
- rope -> `GPTNeoXForCausalLM` with the sequential residual of a pre-LN GPT-2 block (`use_parallel_residual=False`),
  rotary embeddings on the whole head (GPT-NeoX and lmkit both rotate half against half), lmkit's `rope_theta`,
  activation, biases, LayerNorm epsilon and tied or untied head; the fused QKV projection is reordered from lmkit's
  (GPT-2's) [q of all heads, k, v] rows to GPT-NeoX's per-head [q, k, v] blocks.

Both name the activation by the kernel lmkit runs (`same_kernel_activation`: GPT-2's tanh GELU is written
`gelu_pytorch_tanh`, the same function as `gelu_new` in one fused op), so in transformers the export's logits are
bit-identical to lmkit's, not merely close.

The GPT-NeoX mapping lives here rather than in `modeling`, which knows GPT-2 (its own parameter names); `from_gpt_neox`
reads an export back, so lmkit's commands take one too. Before anything is written, the converted model must give the
original's logits on a plain and on a left-padded batch (within 1e-5 in fp32).
The output holds safetensors weights, a stock config and the run's own `tokenizer.json` declared as a stock
`PreTrainedTokenizerFast`.
"""

import json
import logging
import re
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from lmkit.atomic import atomic_directory, follow_umask
from lmkit.configuration import ACTIVATION_FUNCTIONS, LmkitConfig
from lmkit.errors import UserError
from lmkit.modeling import LmkitForCausalLM
from lmkit.run_dir import missing_model
from lmkit.tokenization import save_portable

logger = logging.getLogger(__name__)

FORMATS = ("auto", "gpt2", "gpt-neox")
FORMAT_OF_POSITIONS = {"learned": "gpt2", "sinusoidal": "gpt2", "rope": "gpt-neox"}
ARCHITECTURE_OF_FORMAT = {"gpt2": "GPT2LMHeadModel", "gpt-neox": "GPTNeoXForCausalLM"}


def stock_format(config: LmkitConfig | dict) -> str:
    """The export format of an lmkit config (or its config.json dict): `gpt2` or `gpt-neox`."""
    get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
    kind = get("position_embedding_type", "learned")
    if kind not in FORMAT_OF_POSITIONS:
        raise UserError(f"position_embedding_type must be one of {', '.join(FORMAT_OF_POSITIONS)}, got {kind!r}")
    return FORMAT_OF_POSITIONS[kind]


def same_kernel_activation(name: str) -> str:
    """The transformers name (`ACT2FN`) of the kernel lmkit runs for activation `name`, so exports are bit-identical.

    lmkit computes GPT-2's "gelu_new" (the tanh approximation of GELU) with `F.gelu(approximate="tanh")`, which
    transformers calls "gelu_pytorch_tanh"; its own "gelu_new" evaluates the same formula in seven elementwise ops,
    which rounds differently (logits 5e-6 apart at the demo's size, 1e-4 with wide trained weights). The other
    activations are the same kernels under the same names.
    """
    return "gelu_pytorch_tanh" if name == "gelu_new" else name


def export_model(model_dir: str | Path, output_dir: str | Path, format: str = "auto") -> Path:
    """Write `model_dir` (an lmkit run or checkpoint directory) to `output_dir` as a stock transformers model.

    The directory appears all at once (written next to its final path and renamed), and only after the converted
    model has been checked to give the original's logits.

    Args:
        model_dir: a directory with an lmkit `config.json`, `model.safetensors` and the tokenizer files.
        output_dir: where the export goes; it must not exist or be an empty directory.
        format: `gpt2`, `gpt-neox`, or `auto` for the one the model's position type maps to.

    Returns:
        `output_dir`, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    Raises:
        UserError: `model_dir` is not an lmkit model directory or has no tokenizer, `format` does not fit the model's
            position type, the model uses an option the target cannot express, or `output_dir` is not empty.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config = _read_lmkit_config(model_dir)
    format = _choose_format(config, format, model_dir / "config.json")
    _check_representable(config, format, model_dir / "config.json")
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; export needs the tokenizer the model was trained with")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{output_dir}: the export directory already exists and is not empty; choose a new path")

    model = LmkitForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    if format == "gpt2":
        stock = model.to_gpt2(activation_function=same_kernel_activation(config.activation_function))
    else:
        stock = to_gpt_neox(model)
    stock.eval()
    _check_same_logits(model, stock)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)

    with atomic_directory(output_dir) as tmp:
        stock.save_pretrained(tmp)
        save_portable(tokenizer, tmp)
        follow_umask(tmp)  # save_pretrained writes the weights 0600: others the umask allows must read an export
    logger.info("exported %s to %s as %s", model_dir, output_dir, ARCHITECTURE_OF_FORMAT[format])
    return output_dir


def _read_lmkit_config(model_dir: Path) -> LmkitConfig:
    config_path = model_dir / "config.json"
    missing = missing_model(model_dir)
    if missing:
        raise UserError(missing)
    values = json.loads(config_path.read_text(encoding="utf-8"))
    if values.get("model_type") != "lmkit":
        raise UserError(
            f"{config_path}: model_type must be 'lmkit' to export, got {values.get('model_type')!r} "
            "(a stock transformers model needs no export)"
        )
    try:
        return LmkitConfig.from_dict(values)
    except UserError as error:
        raise UserError(f"{config_path}: {error}") from None


def _choose_format(config: LmkitConfig, format: str, config_path: Path) -> str:
    if format not in FORMATS:
        raise UserError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    fitting = stock_format(config)
    if format not in ("auto", fitting):
        raise UserError(
            f"{config_path}: position_embedding_type {config.position_embedding_type!r} exports as {fitting!r}, "
            f"not {format!r}; use --format {fitting} or --format auto"
        )
    return fitting


def _check_representable(config: LmkitConfig, format: str, config_path: Path) -> None:
    """Refuse the option combinations the target architecture has no switch for (before any weight is read)."""
    if format == "gpt-neox" and not config.scale_attn_weights:
        raise UserError(
            f"{config_path}: scale_attn_weights is false, but GPT-NeoX always scales attention scores by "
            "1/sqrt(head_dim); this model cannot be exported exactly"
        )


def to_gpt_neox(model: LmkitForCausalLM) -> GPTNeoXForCausalLM:
    """A rope `LmkitForCausalLM` as a `GPTNeoXForCausalLM` with the same outputs.

    Raises:
        UserError: the model does not use rope positions, or uses an option GPT-NeoX cannot express.
    """
    config = model.config
    if config.position_embedding_type != "rope":
        raise UserError(
            "model.position_embedding_type must be 'rope' to export to GPT-NeoX, "
            f"got {config.position_embedding_type!r}"
        )
    _check_representable(config, "gpt-neox", Path("model"))
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0}
    neox_config = GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
        hidden_act=same_kernel_activation(config.activation_function),
        # GPT-NeoX has one dropout for the embeddings and both residual branches; they only matter in training.
        hidden_dropout=config.resid_pdrop,
        attention_dropout=config.attn_pdrop,
        max_position_embeddings=config.n_positions,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_epsilon,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        use_parallel_residual=False,  # lmkit's pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(.))
        attention_bias=True,
        rope_parameters=rope,
    )
    # The legacy spellings too: transformers 5 reads `rope_parameters`, older transformers and other runtimes (vLLM
    # versions, conversion scripts) read `rotary_pct` and `rotary_emb_base` / `rope_theta`. Left at its default,
    # `rotary_pct` would be 0.25: rotary on a quarter of each head.
    neox_config.rotary_pct = 1.0
    neox_config.rotary_emb_base = config.rope_theta
    neox_config.rope_theta = config.rope_theta

    neox = GPTNeoXForCausalLM(neox_config).to(model.dtype)
    neox.load_state_dict(_neox_state(model.state_dict(), config.n_head), strict=True)
    neox.generation_config = model.generation_config
    return neox.train(model.training)


def from_gpt_neox(path: str | Path) -> LmkitForCausalLM:
    """Read a GPT-NeoX directory (an lmkit export, or any GPT-NeoX lmkit's rope blocks compute) as a rope lmkit model.

    The inverse of `to_gpt_neox`, so lmkit's own commands (generate, eval, fine-tuning) also take an export.

    Raises:
        UserError: the GPT-NeoX uses something lmkit's blocks do not compute (a parallel residual, partial or scaled
            rotary embeddings, no attention biases, another activation), named with the config key.
    """
    source = GPTNeoXConfig.from_pretrained(path)  # checked before any weight is read
    rope = dict(source.rope_parameters or {})
    unsupported = {
        "use_parallel_residual": source.use_parallel_residual,
        "rope_parameters.partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) != 1.0,
        "rope_parameters.rope_type": rope.get("rope_type", "default") != "default",
        "attention_bias": not source.attention_bias,
        "hidden_act": source.hidden_act not in ACTIVATION_FUNCTIONS,
        "eos_token_id": isinstance(source.eos_token_id, list),
    }
    for key, bad in unsupported.items():
        if bad:
            raise UserError(f"{path}: GPT-NeoX {key} = {_config_value(source, rope, key)!r} has no lmkit equivalent")
    config = LmkitConfig(
        vocab_size=source.vocab_size,
        n_positions=source.max_position_embeddings,
        n_embd=source.hidden_size,
        n_layer=source.num_hidden_layers,
        n_head=source.num_attention_heads,
        n_inner=source.intermediate_size,
        activation_function=source.hidden_act,
        resid_pdrop=source.hidden_dropout,
        embd_pdrop=source.hidden_dropout,
        attn_pdrop=source.attention_dropout,
        layer_norm_epsilon=source.layer_norm_eps,
        initializer_range=source.initializer_range,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
        tie_word_embeddings=source.tie_word_embeddings,
        position_embedding_type="rope",
        rope_theta=rope["rope_theta"],
    )
    neox = GPTNeoXForCausalLM.from_pretrained(path, use_safetensors=True)
    model = LmkitForCausalLM(config).to(neox.dtype)
    model.load_state_dict(_neox_state(neox.state_dict(), config.n_head, to_neox=False), strict=True)
    model.generation_config = neox.generation_config
    return model.train(neox.training)  # from_pretrained's eval mode, as loading.load_model gives for lmkit models


def _config_value(config, rope: dict, key: str):
    return rope.get(key.split(".", 1)[1]) if key.startswith("rope_parameters.") else getattr(config, key)


# lmkit parameter-name prefixes and their GPT-NeoX counterparts ({i}: the layer index), read in both directions.
_NEOX_NAMES = (
    ("transformer.wte.", "gpt_neox.embed_in."),
    ("transformer.ln_f.", "gpt_neox.final_layer_norm."),
    ("lm_head.", "lm_head."),  # saved as GPT-NeoX's own `embed_out.` by save_pretrained
    ("transformer.h.{i}.ln_1.", "gpt_neox.layers.{i}.input_layernorm."),
    ("transformer.h.{i}.ln_2.", "gpt_neox.layers.{i}.post_attention_layernorm."),
    ("transformer.h.{i}.attn.c_attn.", "gpt_neox.layers.{i}.attention.query_key_value."),
    ("transformer.h.{i}.attn.c_proj.", "gpt_neox.layers.{i}.attention.dense."),
    ("transformer.h.{i}.mlp.c_fc.", "gpt_neox.layers.{i}.mlp.dense_h_to_4h."),
    ("transformer.h.{i}.mlp.c_proj.", "gpt_neox.layers.{i}.mlp.dense_4h_to_h."),
)
_LAYER_INDEX = re.compile(r"^(?:transformer\.h|gpt_neox\.layers)\.(\d+)\.")


def _neox_state(state: dict, n_head: int, to_neox: bool = True) -> dict:
    """lmkit parameter names and QKV layout -> GPT-NeoX's, or back with `to_neox=False`."""
    out = {}
    for name, tensor in state.items():
        layer = _LAYER_INDEX.match(name)
        for ours, theirs in _NEOX_NAMES:
            source, target = (ours, theirs) if to_neox else (theirs, ours)
            source, target = (p.format(i=layer.group(1) if layer else "") for p in (source, target))
            if ("{i}" in ours) == bool(layer) and name.startswith(source):
                if ours.endswith("c_attn."):
                    tensor = _per_head_qkv(tensor, n_head, inverse=not to_neox)
                out[target + name[len(source) :]] = tensor
                break
        else:
            raise KeyError(f"no GPT-NeoX counterpart for parameter {name}")
    return out


def _per_head_qkv(tensor: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """Rows [q (nh, hs), k (nh, hs), v (nh, hs)] -> [(q, k, v) of head 0, of head 1, ...]; weight or bias.

    GPT-NeoX views its fused projection's output as (B, T, nh, 3 * hs) and splits each head's slice into q, k, v.
    `inverse` regroups GPT-NeoX's rows back into lmkit's.
    """
    head_dim = tensor.shape[0] // (3 * n_head)
    grouped = (n_head, 3) if inverse else (3, n_head)
    return tensor.reshape(*grouped, head_dim, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _check_same_logits(model: LmkitForCausalLM, stock) -> None:
    """Guard against a silent mis-conversion: random sequences, one of them left-padded, must score the same.

    The stock model gets explicit position ids counted over real tokens (lmkit derives them from the attention mask,
    transformers' GPT-2 and GPT-NeoX count from the left edge); padded positions are not compared.
    """
    generator = torch.Generator().manual_seed(0)
    length = min(16, model.config.n_positions)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, : length // 2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=attention_mask).logits.float()
        theirs = stock(ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    ours, theirs = ours[attention_mask.bool()], theirs[attention_mask.bool()]
    # Both run the same kernels, so the logits are in fact bit-identical (benchmarks/bench_export.py); a mis-converted
    # weight moves them by tenths.
    tolerance = 1e-5 if model.dtype == torch.float32 else 5e-2
    difference = (ours - theirs).abs().max().item()
    if difference > tolerance:
        raise RuntimeError(
            f"{type(stock).__name__} conversion changed the logits by {difference:.2e} (tolerance {tolerance:.0e})"
        )
