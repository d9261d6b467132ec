"""Fine-tuning methods: the recipe's `finetune:` section, LoRA adapters via peft, and the run's adapter + merged model.

`finetune.method: full` trains every weight of the model; `lora` freezes the model of `model.init_from` and trains
peft's low-rank adapters on the linears named by `finetune.target_modules`, by default every attention and MLP linear
of lmkit's model (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`). A name is matched as peft matches it (the
module's full name, or its last dotted parts) but only against the model's linears, and a name that matches none is an
error listing them: peft itself would accept some such names silently. The LM head is tied to the token embedding, so
an adapter on it would, once merged, change the embedding too: it is refused rather than silently untied.

A LoRA run ends with the merged model in the run dir (plain weights: `lmkit eval`, `generate`, `export` and `push`
treat it like any model) and peft's adapter files in `adapter/` (`RunDir.adapter_dir`), whose adapter_config.json names
the base model and its hub revision. The adapter lives in a subfolder because transformers' `from_pretrained` applies
an adapter_config.json it finds next to config.json: beside the merged weights it would add the adapter a second time.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lmkit.atomic import atomic_directory
from lmkit.configuration import LmkitConfig
from lmkit.errors import UserError
from lmkit.modeling import LmkitForCausalLM
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)


@dataclass
class FinetuneArgs:
    """The recipe's `finetune:` section: how the model of `model.init_from` is trained."""

    method: str = setting("full", "'full' trains every weight; 'lora' trains low-rank adapters only (peft).",
                          choices=("full", "lora"))
    r: int = setting(8, "LoRA rank.", minimum=1)
    alpha: float = setting(16.0, "LoRA scale numerator: the update is scaled by alpha / r.", above=0)
    dropout: float = setting(0.0, "Dropout on the LoRA branch's input.", minimum=0, below=1)
    target_modules: list[str] | None = setting(
        None, "Linears to adapt, by full name or last dotted parts (attn.c_attn, c_fc, ...); null = every attention "
        "and MLP linear.",
    )

    def __post_init__(self):
        check_fields(self, "finetune")
        if self.target_modules is not None and (not self.target_modules or not all(self.target_modules)):
            raise SettingError("target_modules", f"must list module names, or be null for every attention and MLP "
                                                 f"linear, got {self.target_modules!r}", "finetune")


def _tied_output_names(model) -> set[str]:
    """Full names of output-embedding modules whose weight is the input embedding's."""
    output = model.get_output_embeddings()
    if output is None or output.weight is not model.get_input_embeddings().weight:
        return set()
    return {name for name, module in model.named_modules() if module is output}


def available_targets(model) -> list[str]:
    """The short names (module name without the layer prefix) of the linears LoRA can adapt, in model order."""
    tied = _tied_output_names(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in tied:
            short = name.split(".h.", 1)[1].split(".", 1)[1] if ".h." in name else name
            names.append(short)
    return list(dict.fromkeys(names))


def resolve_targets(model, targets: list[str] | None) -> list[str]:
    """The full names of the linears `finetune.target_modules` selects (null: every attention and MLP linear).

    Raises:
        UserError: a name that matches no linear (the available names listed), or one that matches the LM head
            tied to the token embedding.
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    tied = _tied_output_names(model)
    if targets is None:
        chosen = [name for name in linears if ".attn." in name or ".mlp." in name]
        if not chosen:
            raise UserError(f"finetune.target_modules: the model has no attention or MLP linears to adapt; name them "
                            f"(available: {', '.join(available_targets(model))})")
        return chosen
    chosen = []
    for target in targets:
        matched = [name for name in linears if name == target or name.endswith("." + target)]
        if not matched:
            raise UserError(f"finetune.target_modules: {target!r} matches no linear module of the model; available: "
                            f"{', '.join(available_targets(model))}")
        if tied & set(matched):
            raise UserError(f"finetune.target_modules: {target!r} is the LM head, whose weight is the token embedding "
                            f"(tied): a merged adapter would change the embedding too; available: "
                            f"{', '.join(available_targets(model))}")
        chosen += [name for name in matched if name not in chosen]
    return chosen


# Above this share of the model's parameters in its adapters, LoRA saves little over full fine-tuning: a warning.
LARGE_ADAPTER_SHARE = 0.5


def check_lora(base_config: dict, args: "FinetuneArgs") -> None:
    """Check `finetune.target_modules` and `finetune.r` before any data is read, against the base model's config.json
    values: the targets against a skeleton of lmkit's model with its `n_layer` layers (every lmkit model, an imported
    GPT-2 too, has the same module names, whatever its sizes); the rank against its width.

    Raises:
        UserError: as `resolve_targets`; or `r` above `n_embd`, the smaller side of every linear lmkit adapts (a rank
            beyond it adds parameters and nothing else).
    """
    if isinstance(base_config.get("n_layer"), int):
        skeleton = LmkitForCausalLM(LmkitConfig(n_layer=base_config["n_layer"], n_head=1, n_embd=4, n_positions=4,
                                                vocab_size=4))
        resolve_targets(skeleton, args.target_modules)
    width = base_config.get("n_embd")
    if isinstance(width, int) and args.r > width:
        raise UserError(f"finetune.r must be at most the base model's width (n_embd {width}), got {args.r}: a rank "
                        f"beyond the smaller side of a matrix adds parameters and nothing else (LoRA ranks are "
                        f"typically 4 to 64)")


def apply_lora(model, args: FinetuneArgs, base_model: str, base_revision: str | None,
               trainable_tokens: list[int] = ()):
    """Wrap `model` in a peft `PeftModel` with LoRA adapters on the chosen linears; everything else is frozen.

    Args:
        base_model, base_revision: what the adapter adapts (`model.init_from` and its hub revision), recorded in
            adapter_config.json.
        trainable_tokens: ids of tokens added to the base model's vocabulary (chat markers), whose embedding rows
            train too (peft's trainable tokens): frozen at their shared initial value, the markers could never be
            told apart, in the input nor in the tied output.
    """
    from peft import LoraConfig, get_peft_model  # heavy, and needed by LoRA runs only

    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=resolve_targets(model, args.target_modules), bias="none",
        trainable_token_indices={"wte": list(trainable_tokens)} if trainable_tokens else None,
    )
    lora = get_peft_model(model, config)
    # get_peft_model records the model's own name_or_path (a snapshot path); the card names the hub model and revision.
    lora.peft_config["default"].base_model_name_or_path = base_model
    lora.peft_config["default"].revision = base_revision
    counts = parameter_counts(lora)
    logger.info("LoRA r=%d on %d linears: %d trainable parameters of %d (%.3f%%)", args.r, len(config.target_modules),
                counts["trainable_parameters"], counts["total_parameters"], 100 * counts["trainable_share"])
    if counts["trainable_share"] > LARGE_ADAPTER_SHARE:
        logger.warning("finetune.r %d: the adapters train %.0f%% of the model's parameters; LoRA saves little at this "
                       "rank: a smaller finetune.r, or finetune.method: full", args.r,
                       100 * counts["trainable_share"])
    return lora


def parameter_counts(model) -> dict:
    """Trainable and total parameters (tied weights counted once) and the trainable share."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_share": trainable / total if total else 0.0}


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def save_adapter(lora_model, adapter_dir: Path) -> None:
    """peft's adapter_config.json and adapter_model.safetensors into `adapter_dir`, appearing whole or not at all."""
    with atomic_directory(adapter_dir, replace=True) as staging:
        # save_embedding_layers=False: LoRA leaves the embeddings alone (peft would look the base model up to check)
        lora_model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)


def merge(lora_model):
    """The base model with the adapters added into its weights (in place: `lora_model` is used up)."""
    return lora_model.merge_and_unload()


__all__ = ["FinetuneArgs", "apply_lora", "available_targets", "is_lora", "merge", "parameter_counts",
           "resolve_targets", "save_adapter"]
