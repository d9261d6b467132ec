"""Automatic sizing: the tokenizer, the model shape, the batch and the learning rate of a run, chosen from the corpus,
the machine and the time budget.

A recipe asks for it with `tokenizer: auto` (or `tokenizer.train.vocab_size: auto`) and `model.size: auto`;
`lmkit train --data FILES --time 10m --output DIR` builds such a recipe around the files. `model.size` also takes a
rung of `LADDER` by name (e.g. `0.8M`), which sets the shape and the learning rate that goes with it.

The rules are what `benchmarks/bench_sizing.py` measured (table in benchmarks/README.md), not folklore:

- tokenizer: text that is mostly CJK gets the word tokenizer (jieba's words over every character: 4% fewer bits per
  byte than char-level on the Chinese corpus at 5 minutes, equal at 2), everything else byte-level BPE;
  `bpe_vocab_size` below.
- model: the rungs of `LADDER` are timed on the machine, with real batches; the one chosen is the largest whose
  measured throughput lets it see `TOKENS_PER_PARAMETER` training tokens per parameter in the time left.
- learning rate: `learning_rate(n_embd, optimizer)`, the peak of a warm-up/stable/decay schedule that follows the
  clock (`lmkit.deadline`; a rung without a budget: cosine) with 5% warm-up; Muon on the hidden matrices (`OPTIMIZER`)
  and squared ReLU (`MODEL`), from the recipe grid.
- weight decay: 0.1, and 0.3 for a run that will see its data more than 4 times (`weight_decay_for`).
- precision: bf16 autocast on a CUDA GPU that supports it; elsewhere where timing finds it `BF16_SPEEDUP` faster
  (at equal steps the study measured the same bits per byte as fp32).

Every choice is written into the run's `recipe.yaml` as a plain value, with its reason in the log, so a re-run of that
file trains the same model without choosing again.
"""

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from lmkit.cjk import cjk_share
from lmkit.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """One rung of the model ladder: depth, heads and width (head width 32 up to 256 wide, then 48 and 64)."""

    n_layer: int
    n_head: int
    n_embd: int

    @property
    def name(self) -> str:
        """The rung's name: its non-embedding parameters, e.g. '0.8M'."""
        millions = self.parameters / 1e6
        return f"{millions:.1f}M" if millions < 10 else f"{millions:.0f}M"

    @property
    def parameters(self) -> int:
        """Attention (4 d^2) and MLP (8 d^2) weights of every block: the size Kaplan et al. count, embeddings aside."""
        return 12 * self.n_layer * self.n_embd**2

    def model_settings(self) -> dict:
        """The `model:` keys of this rung."""
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd}


# From 0.1 M to GPT-2 small and medium: each rung has 2.3-3.5x the parameters of the one below.
LADDER = (
    Shape(2, 2, 64),
    Shape(3, 3, 96),
    Shape(4, 4, 128),
    Shape(4, 6, 192),
    Shape(6, 8, 256),
    Shape(8, 8, 384),
    Shape(12, 8, 512),
    Shape(12, 12, 768),
    Shape(24, 16, 1024),
)
RUNGS = {shape.name: shape for shape in LADDER}
AUTO = "auto"

# ---- Rules (bench_sizing's findings) -------------------------------------------------------------------------------
# Text with at least this share of CJK characters gets the word tokenizer (the share is a choice, not measured:
# Japanese mixes kana and kanji with Latin words, and should still count as CJK). The tokenizer grid (zh, 2 and 5
# minutes): words 8192 1.782 / 1.606 bits per byte, characters 1.781 / 1.676, byte-level BPE at best 1.756 / 1.670,
# Unigram 1.893 / 1.628.
CJK_SHARE = 0.3
# byte-level BPE: VOCAB_ANCHOR tokens for VOCAB_ANCHOR_BYTES of training text (see bpe_vocab_size).
VOCAB_ANCHOR, VOCAB_ANCHOR_BYTES = 1024, 2_000_000
# char and word: a maximum (characters seen fewer than twice are <|unk|>); for words on Chinese 16384 was no better
# than 8192 at 5 minutes (1.604) and far worse at 2 (1.958: a bigger head, fewer steps).
CHAR_VOCAB_SIZE = 8192
# The chosen rung is the largest that trains on at least this many tokens per (non-embedding) parameter. With AdamW
# the best rung of every corpus and budget saw 6.4 to 34 tokens per parameter and the next larger one 1.7 to 4.8, which
# gave 5. Under Muon (the en size grid again) larger rungs keep up on fewer: the 2-minute winner saw 4.7 (the rung
# above it, at 1.0, lost by 5%), and at 5 minutes a rung at 2.5 tied one at 11; hence 4, which takes the larger rung
# in such near-ties (a fifth of Chinchilla's 20 tokens per parameter).
TOKENS_PER_PARAMETER = 4
# A corpus is seen at most this many times: more epochs stop paying (bench_sizing's epoch grid on 25 KB and 250 KB
# slices), and the tokens-per-parameter rule counts what the run will see, so a small corpus gets a small rung.
# `lmkit.budget` ends a budgeted run at this many epochs too, and warns past REPEATS_WARNING.
MAX_EPOCHS = 16
REPEATS_WARNING = 4
# Of the time left when the model is chosen, the share its optimizer steps get (the rest: measuring the step,
# evaluations, checkpoint saves and the final save).
TRAINING_SHARE = 0.85
# Each rung's step is timed on real batches in ROUNDS rounds of TIMED_STEPS steps (MORE_ROUNDS more when they spread
# widely), after `lmkit.budget.WARMUP_STEPS` untimed ones.
TIMED_STEPS, ROUNDS, MORE_ROUNDS = 3, 3, 2
# A rung timed this many times slower than the rung below it is timed again: the model is 2.3-3.5 times larger, so
# an order of magnitude is something else on the machine.
NEIGHBOUR_LIMIT = 10.0
# Timing rungs stops once it has used this share of the time left.
TIMING_SHARE = 0.05
# On a machine without a CUDA GPU, bf16 autocast is used when a rung's step is at least this much faster with it.
BF16_SPEEDUP = 1.1
# Peak learning rate = LR_WIDTH / n_embd, at most LR_MAX: it gives GPT-2 small (768 wide) the 6e-4 it was trained
# with, and bench_sizing's sweep on one rung (x0.5, x1, x2) found x1 best; for AdamW at 5 minutes x2 tied it (en) and
# x4 was 5% worse (ru).
LR_WIDTH, LR_MAX = 0.5, 3e-3
# The training settings an automatically sized run starts from (the recipe's own training: values win).
TRAINING = {
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a fraction of the run
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "eval_strategy": "steps",
    "eval_steps": 0.5,  # halfway and at the end
    "save_steps": 0.5,
    "save_total_limit": 1,
    "logging_steps": 0.05,
    "seed": 42,
}
# An automatically sized run (always budgeted) warms up, stays at the peak and decays when the clock says
# (lmkit.deadline): the schedule that completes by the deadline whatever the machine's speed. The rungs without a
# budget keep TRAINING's cosine over their fixed step count.
AUTO_SCHEDULE = "warmup_stable_decay"
# Rotary positions (6.8% better than learned in the study); no dropout (0.1 was 2.5% worse on en at 5 minutes, which
# repeats its data 10 times, and 4% worse on ru); from the recipe grid at 2 minutes: squared ReLU (2-3% better than
# tanh GELU) and a head of its own (2.5% better on zh at equal steps).
MODEL = {"position_embedding_type": "rope", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
         "activation_function": "relu2", "tie_word_embeddings": False}
# Muon on the hidden matrices (lmkit.optimizers) at MUON_LR_SCALE times AdamW's rate: the recipe grid's best on both
# corpora it ran (x0.5 and x1 of AdamW's rate did worse than x2); at 5 minutes on en twice that again (x4) tied it.
OPTIMIZER = {"name": "muon"}
MUON_LR_SCALE = 2.0
# ... but not for a run that sees its data more than MUON_MAX_EPOCHS times: on a 250 KB slice of en at 5 minutes (16
# epochs) Muon reached 2.875 bits per byte, AdamW 2.657, where Muon still won at 10 epochs (en at 5 minutes: 2.093 and
# 2.099 against AdamW's 2.113), at 5 (ru at 5 minutes, the 0.3M rung: 1.087 against AdamW's 1.103 and 1.115) and in
# the recipe grid at 5 minutes, 4 to 9 epochs, by 4-5% (en 2.140 against 2.229, ru 1.102 against 1.166).
MUON_MAX_EPOCHS = 12
# ... and a stronger weight decay for a run that repeats its data more than REPEATS_WARNING times (decoupled: each step
# shrinks the weights by learning rate x weight decay). The automatic run with 0.3 instead of TRAINING's 0.1, paired
# on the same machine: en at 5 minutes (8 epochs) 2.2% better twice (2.054 vs 2.098, 2.040 vs 2.086), zh at 5 (4.7)
# 2.0% (1.591 vs 1.623; 0.5: 2.4%), ru at 5 (4.9) 0.6% and 1.0% worse (0.5: 1.7% worse); at 2 minutes, 2 to 5.5 epochs,
# 0.1% to 1.0% worse (en 5.5, ru 3.1, zh 2.0); 1.0 on en at 5 minutes: 0.2% better. Repeated data wants more
# regularisation (Kim et al. 2025, "Pre-training under infinite compute", tuned it 30x higher at many epochs), and
# past 4 epochs the two corpora that gained outweigh the one that lost.
REPEATED_WEIGHT_DECAY = 0.3


def learning_rate(n_embd: int, optimizer: str = "adamw") -> float:
    """The peak learning rate of a model `n_embd` wide, trained with `optimizer` (`optimizer.name`)."""
    scale = MUON_LR_SCALE if optimizer == "muon" else 1.0
    return round(min(LR_MAX, LR_WIDTH / n_embd) * scale, 6)


def optimizer_for(epochs: float) -> str:
    """`optimizer.name` for an automatically sized run that will see its training data `epochs` times."""
    return "adamw" if epochs > MUON_MAX_EPOCHS else OPTIMIZER["name"]


def weight_decay_for(epochs: float) -> float:
    """`training.weight_decay` for an automatically sized run that will see its training data `epochs` times."""
    return REPEATED_WEIGHT_DECAY if epochs > REPEATS_WARNING else TRAINING["weight_decay"]


def bpe_vocab_size(train_bytes: int) -> int:
    """The byte-level BPE vocabulary for a training text of `train_bytes` UTF-8 bytes: 1024 up to a few MB (the
    study's English 1.1 MB and Russian 3.3 MB: 1024 as good as 512-4096, within run-to-run noise), then growing with
    the square root of the text (a power of two), to the cap of 65536 at about 8 GB (GPT-2: 50k tokens for 40 GB).
    The growth is an extrapolation: the study's corpora are all below 4 MB."""
    scaled = VOCAB_ANCHOR * math.sqrt(max(train_bytes, 1) / VOCAB_ANCHOR_BYTES)
    return int(min(max(2 ** round(math.log2(scaled)), VOCAB_ANCHOR), 65536))


# ---- Recipes --------------------------------------------------------------------------------------------------------


def auto_recipe(files: list[str], output_dir: str) -> dict:
    """The recipe of `lmkit train --data FILES --output DIR`: every size chosen automatically (needs a budget)."""
    return {
        "data": {"files": list(files)},
        "tokenizer": {"train": {"kind": AUTO, "vocab_size": AUTO}},
        "model": {"size": AUTO},
        "hub": {"push": "never"},
        "training": {"output_dir": output_dir},
    }


def expand_size(model: dict, training: dict, optimizer: dict, block_size: int, has_budget: bool,
                source: str) -> tuple[dict, dict, dict]:
    """`model:`, `training:` and `optimizer:` with `model.size` (a rung name, or auto) turned into the keys it stands
    for.

    A rung sets the shape and its learning rate; both auto and a rung set the automatic run's model, training and
    optimizer defaults (`MODEL`, `TRAINING`, `OPTIMIZER`, n_positions = data.block_size). The recipe's own values
    win, except the shape:
    `model.size` and `n_layer`/`n_head`/`n_embd` together are refused. With auto the shape and the learning rate
    (unless the recipe gives one) are chosen by `choose_shape` once the data is ready.
    """
    size = model.get("size")
    if size is None:  # `model.size=null` on the command line: the recipe's own shape
        return {k: v for k, v in model.items() if k != "size"}, training, optimizer
    if size != AUTO and size not in RUNGS:
        raise UserError(f"{source}: model.size must be auto or one of {', '.join(RUNGS)}, got {size!r}")
    fixed = [key for key in ("n_layer", "n_head", "n_embd") if key in model]
    if fixed:
        raise UserError(f"{source}: model.size ({size}) sets n_layer, n_head and n_embd; remove model.{fixed[0]} or "
                        "model.size")
    if size == AUTO and not has_budget:
        raise UserError(f"{source}: model.size auto sizes the model to a time budget: give --time (or budget.time), "
                        f"or a rung: {', '.join(RUNGS)}")
    expanded = {**MODEL, "n_positions": block_size, **{k: v for k, v in model.items() if k != "size"}}
    optimizer = {**OPTIMIZER, **optimizer}
    chosen = {**TRAINING}
    if bf16_is_faster() and "fp16" not in training:
        chosen["bf16"] = True
    if size != AUTO:
        expanded.update(RUNGS[size].model_settings())
        chosen["learning_rate"] = learning_rate(RUNGS[size].n_embd, optimizer.get("name", "adamw"))
    else:  # always budgeted: the decay starts by the clock (lmkit.deadline)
        chosen["lr_scheduler_type"] = AUTO_SCHEDULE
    return expanded, {**chosen, **training}, optimizer


def bf16_is_faster() -> bool:
    """Whether a CUDA GPU that supports bf16 (Ampere and later) is here: there bf16 autocast is the rule. Elsewhere
    `model.size: auto` times each rung both ways (`StepTimer`): on CPU the answer depends on the processor
    (avx512_bf16, AMX) and the model's width."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def choose_tokenizer(spec, texts: Callable[[], Iterable[str]]):
    """`spec` with `kind: auto` and `vocab_size: auto` decided from the training texts (`texts()` iterates them).

    Returns:
        A copy of `spec` (a `TokenizerSpec`) with both plain values; the log says why.
    """
    kind, vocab_size = spec.kind, spec.vocab_size
    if kind == AUTO:
        share = cjk_share(texts())
        kind = "word" if share >= CJK_SHARE else "bpe"
        logger.info("tokenizer.kind auto: %s, as %.0f%% of the characters are CJK (words from %.0f%%)", kind,
                    100 * share, 100 * CJK_SHARE)
    if vocab_size == AUTO:
        if kind == "bpe":
            train_bytes = sum(len(text.encode("utf-8")) for text in texts())
            vocab_size = bpe_vocab_size(train_bytes)
            logger.info("tokenizer.vocab_size auto: %d for %.1f MB of training text", vocab_size, train_bytes / 1e6)
        else:
            vocab_size = CHAR_VOCAB_SIZE
            logger.info("tokenizer.vocab_size auto: at most %d %ss, those seen at least %d times", vocab_size,
                        kind, spec.min_frequency)
    return replace(spec, kind=kind, vocab_size=vocab_size)


# ---- The model, from the machine and the budget --------------------------------------------------------------------


def choose_shape(time_step: Callable[[Shape], float], seconds: float, tokens_per_step: int,
                 corpus_tokens: int | None = None) -> tuple[Shape, str]:
    """The rung to train for `seconds` (the whole time left), and why.

    Args:
        time_step: seconds of one optimizer step of a rung, measured on this machine with the run's batches.
        seconds: the time left for everything that follows: measuring, training, evaluations, saves.
        tokens_per_step: training tokens in what `time_step` times: one micro-batch of every process.
        corpus_tokens: the training split's tokens: a rung sees at most `MAX_EPOCHS` times these, however fast.

    Rungs are timed from the smallest up, and timing stops at the first rung that would see fewer than
    `TOKENS_PER_PARAMETER` tokens per parameter (every larger one would see fewer still), or once timing has used
    `TIMING_SHARE` of `seconds`.
    """
    started = time.perf_counter()
    chosen, notes = LADDER[0], []
    previous = None
    for shape in LADDER:
        step = time_step(shape)
        if previous is not None and step > NEIGHBOUR_LIMIT * previous:
            again = time_step(shape)
            logger.info("model.size auto: %s timed %.0f ms/step, over %.0fx the rung below it: timed again, %.0f ms",
                        shape.name, 1000 * step, NEIGHBOUR_LIMIT, 1000 * again)
            step = min(step, again)
        previous = step
        spent = time.perf_counter() - started
        tokens = (seconds - spent) * TRAINING_SHARE / step * tokens_per_step
        capped = corpus_tokens is not None and tokens > MAX_EPOCHS * corpus_tokens
        tokens = min(tokens, MAX_EPOCHS * corpus_tokens) if corpus_tokens is not None else tokens
        ratio = tokens / shape.parameters
        notes.append(f"{shape.name} {1000 * step:.0f} ms/step, {tokens / 1e6:.2f}M tokens"
                     f"{f' ({MAX_EPOCHS} epochs)' if capped else ''} = {ratio:.1f}/parameter")
        if ratio < TOKENS_PER_PARAMETER:
            break
        chosen = shape
        if spent > TIMING_SHARE * seconds:
            notes.append("(timing stopped: its share of the budget is spent)")
            break
    why = (f"{chosen.name}: the largest rung that trains on at least {TOKENS_PER_PARAMETER} tokens per parameter in "
           f"{seconds:.0f} s ({'; '.join(notes)})")
    return chosen, why


class StepTimer:
    """The `time_step` of `choose_shape`: builds each rung from `model_config` (vocabulary, positions, special ids)
    and times forward, backward and an AdamW update on `batches` (the run's own collated batches), in fp32 and, when
    `try_bf16`, under bf16 autocast too.

    Each precision is timed in `ROUNDS` rounds of `TIMED_STEPS` steps after `WARMUP_STEPS` untimed ones, the
    precisions taking turns, so that load from other work falls on both; up to `MORE_ROUNDS` more when the rounds
    spread widely. A rung's time is its faster precision's (the robust median of its rounds), and bf16 counts as faster
    only when every round found it `BF16_SPEEDUP` faster: one lucky round on a busy machine does not decide.
    `bf16[shape]` says which precision a rung's time is."""

    def __init__(self, model_config: dict, batches: list[dict], device, try_bf16: bool, bf16: bool = False):
        self.model_config, self.batches, self.device = model_config, batches, device
        self.precisions = (False, True) if try_bf16 else (bf16,)
        self.bf16: dict[Shape, bool] = {}
        self.seconds: dict[Shape, float] = {}
        self.notes: list[str] = []

    def __call__(self, shape: Shape) -> float:
        from lmkit.budget import robust_seconds

        rounds = self._time(shape)
        if len(rounds) == 2:
            ratios = [fp32 / bf16 for fp32, bf16 in zip(rounds[False], rounds[True])]
            self.bf16[shape] = min(ratios) >= BF16_SPEEDUP
            self.notes.append(f"{shape.name} bf16 x{min(ratios):.2f}-{max(ratios):.2f}")
        else:
            self.bf16[shape] = self.precisions == (True,)
        self.seconds[shape] = robust_seconds(rounds[self.bf16[shape]], f"the {shape.name} rung")
        return self.seconds[shape]

    def _time(self, shape: Shape) -> dict[bool, list[float]]:
        """Each precision's seconds per step, one median per round."""
        import torch

        from lmkit.budget import WARMUP_STEPS, WIDE_SPREAD, spread
        from lmkit.configuration import LmkitConfig
        from lmkit.generation import preserved_rng_state
        from lmkit.modeling import LmkitForCausalLM

        device, taken = self.device, [0]

        def step(bf16: bool) -> float:
            batch = {k: v.to(device) for k, v in self.batches[taken[0] % len(self.batches)].items()}
            taken[0] += 1
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        with preserved_rng_state():
            config = LmkitConfig(**{**self.model_config, **shape.model_settings()})
            model = LmkitForCausalLM(config).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for bf16 in self.precisions:
                for _ in range(WARMUP_STEPS):
                    step(bf16)
            rounds: dict[bool, list[float]] = {bf16: [] for bf16 in self.precisions}
            for index in range(ROUNDS + MORE_ROUNDS):
                if index >= ROUNDS and all(spread(times) < WIDE_SPREAD for times in rounds.values()):
                    break
                for bf16 in self.precisions:
                    ends = [time.perf_counter()] + [step(bf16) for _ in range(TIMED_STEPS)]
                    rounds[bf16].append(statistics.median(b - a for a, b in zip(ends, ends[1:])))
        return rounds
