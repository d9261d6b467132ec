"""Export a trained lmkit model as a plain GPT-2 directory that transformers loads without lmkit installed.

Only learned positions exist in GPT-2, so only those models export; the weights are the same numbers (GPT-2's
`Conv1D` stores the transposes of lmkit's `nn.Linear`), the config says `model_type: gpt2`, the weights are
safetensors and the tokenizer is the run's own `tokenizer.json`, declared as a stock `PreTrainedTokenizerFast`.
"""

import json
import logging
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from lmkit.atomic import atomic_directory, follow_umask
from lmkit.errors import UserError
from lmkit.modeling import LmkitForCausalLM
from lmkit.tokenization import save_portable

logger = logging.getLogger(__name__)


def export_gpt2(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Write `model_dir` (an lmkit run or checkpoint directory) to `output_dir` as `GPT2LMHeadModel` + tokenizer.

    The directory appears all at once (it is written next to its final path and renamed), and before anything is
    written the converted model is checked to give the same logits as the original.

    Args:
        model_dir: a directory with an lmkit `config.json`, `model.safetensors` and the tokenizer files.
        output_dir: where the export goes; it must not exist or be an empty directory.

    Returns:
        `output_dir`, which `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    Raises:
        UserError: `model_dir` is not an lmkit model directory, has no tokenizer, uses sinusoidal or rope positions,
            or `output_dir` exists and is not empty.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir}: not a model directory (expected {config_path})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type != "lmkit":
        raise UserError(f"{config_path}: model_type must be 'lmkit' to export to GPT-2, got {model_type!r}")
    position_type = config.get("position_embedding_type", "learned")
    if position_type != "learned":
        raise UserError(
            f"{config_path}: GPT-2 has learned positions only, this model has position_embedding_type "
            f"{position_type!r}; train with model.position_embedding_type: learned to export"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; export needs the tokenizer the model was trained with")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"{output_dir}: the export directory already exists and is not empty; choose a new path")

    model = LmkitForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    gpt2 = model.to_gpt2().eval()
    _check_same_logits(model, gpt2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)

    with atomic_directory(output_dir) as tmp:
        gpt2.save_pretrained(tmp)
        save_portable(tokenizer, tmp)
        follow_umask(tmp)  # save_pretrained writes the weights 0600: others the umask allows must read an export
    logger.info("exported %s to %s as GPT2LMHeadModel", model_dir, output_dir)
    return output_dir


def _check_same_logits(model: LmkitForCausalLM, gpt2) -> None:
    """Guard against a silent mis-conversion: a short random sequence must score the same in both models."""
    generator = torch.Generator().manual_seed(0)
    length = min(16, model.config.n_positions)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), gpt2(ids).logits.float()
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    difference = (ours - theirs).abs().max().item()
    if difference > tolerance:
        raise RuntimeError(f"GPT-2 conversion changed the logits by {difference:.2e} (tolerance {tolerance:.0e})")
