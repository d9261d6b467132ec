"""Metrics: BLEU and chrF of generated text through lmkit's own `evaluate` module, perplexity, bits per byte, and the
evaluation a Trainer log history holds at a step. Pure functions."""

import functools
import math
from pathlib import Path

from lmkit.cjk import cjk_share

# Shipped inside the package so that scoring works offline (evaluate.load("sacrebleu") fetches from the Hub).
BLEU_CHRF_MODULE = Path(__file__).parent / "metric_modules" / "bleu_chrf.py"
# sacrebleu's BLEU tokenizers that work offline without extra packages ('ja-mecab', 'spm', ... need downloads).
BLEU_TOKENIZERS = ("13a", "zh", "intl", "char", "none")


@functools.lru_cache(maxsize=1)
def _bleu_chrf_metric():
    import evaluate

    return evaluate.load(str(BLEU_CHRF_MODULE))


def bleu_tokenizer_for(texts: list[str]) -> str:
    """sacrebleu's BLEU tokenizer for a language: 'zh' when most letters are CJK (`lmkit.cjk`), '13a' otherwise.

    BLEU counts n-grams of words; Chinese and Japanese have no spaces, so with '13a' a whole sentence would be one
    "word". 'zh' makes each Han character a word and treats the rest as '13a' does (Korean, spaced, scores the same).
    """
    return "zh" if cjk_share(texts, letters_only=True) > 0.5 else "13a"


def _check_one_each(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def bleu_chrf(predictions: list[str], references: list[str], tokenize: str | None = None) -> dict:
    """Corpus BLEU and chrF (0-100) of `predictions` against one reference each.

    Args:
        tokenize: sacrebleu's BLEU tokenizer; None picks it from the references' language.
    """
    _check_one_each(predictions, references)
    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0}
    tokenize = tokenize or bleu_tokenizer_for(references)
    scores = _bleu_chrf_metric().compute(predictions=predictions, references=references, tokenize=tokenize)
    return {"bleu": float(scores["bleu"]), "chrf": float(scores["chrf"])}


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """Share (0-1) of predictions equal to their reference, ignoring whitespace at either end."""
    _check_one_each(predictions, references)
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf rather than an OverflowError for a diverged model."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")


def bits_per_byte(total_nats: float, total_bytes: int) -> float | None:
    """Summed next-token loss (nats) over the UTF-8 bytes of the text the predicted tokens stand for, in bits.

    Unlike perplexity, which is per token, it compares models whose tokenizers cut text differently (char vs BPE).
    None when no byte was predicted.
    """
    return total_nats / math.log(2) / total_bytes if total_bytes else None


def with_perplexity(results: dict) -> dict:
    """`results` with `eval_perplexity` derived from `eval_loss` where only the loss was recorded."""
    if "eval_perplexity" not in results and isinstance(results.get("eval_loss"), (int, float)):
        return {**results, "eval_perplexity": perplexity(results["eval_loss"])}
    return results


def evaluation_at(log_history: list[dict], step: int, exact: bool = False) -> dict:
    """The `eval_*` values (and epoch, step) logged by the evaluation at `step`, or by the last one up to `step` unless
    `exact`. lmkit logs BLEU as a second entry at the same step as eval_loss, so entries of that step are merged."""
    evals = [e for e in log_history if "step" in e and e["step"] <= step and any(k.startswith("eval_") for k in e)]
    if not evals or (exact and evals[-1]["step"] != step):
        return {}
    last = evals[-1]["step"]
    merged = {}
    for entry in evals:
        if entry["step"] == last:
            merged.update({k: v for k, v in entry.items() if k.startswith("eval_") or k in ("epoch", "step")})
    return merged
