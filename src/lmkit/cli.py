"""The `lmkit` command line: each subcommand parses its arguments, makes one library call and formats its result.

Recipe and spec settings are never mirrored as flags: they are changed with dotted `key=value` overrides. A command's
own numeric flags are fields of a checked settings dataclass (`GenerateSettings`, `ServeSettings`, the small ones
below), built by `settings_from_flags`, so a bad flag value is reported like a bad recipe value. A user mistake
(`UserError`) prints one `error: ...` line and exits with code 2; `--debug` shows the traceback.

Each command imports the lmkit modules it calls inside its own function: they pull in torch and transformers, which
take seconds to import, and `lmkit --help` (or a command's `--help`) needs neither. The hub module imports neither
and is imported here.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Iterator

from lmkit import hub
from lmkit.errors import UserError, describe_os_error
from lmkit.hub import SHORT_REVISION
from lmkit.settings import SettingError, check_fields, setting

EXIT_USER_ERROR = 2
# A dotted `section.key=value` override (as opposed to a file name).
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def settings_from_flags(cls, args: argparse.Namespace, **values):
    """`cls(...)`, a checked settings dataclass, from the parsed flags: field `x_y` is flag `--x-y` (fields without a
    flag keep their default, `values` replace the flags'). A bad value is an error naming the flag."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    with flag_errors(*(f.name for f in dataclasses.fields(cls))):
        return cls(**{**flags, **values})


@contextlib.contextmanager
def flag_errors(*fields: str) -> Iterator[None]:
    """Within the block, report a `SettingError` about one of `fields` (whatever section it names) as `--x-y
    <detail>`, the flag the user typed: from a settings dataclass, or from a later check (a prompt too long for
    `--max-new-tokens`, a bad `--num-samples`)."""
    try:
        yield
    except SettingError as exc:
        if exc.key not in fields:
            raise
        raise UserError(f"--{exc.key.replace('_', '-')} {exc.detail}") from None


@dataclasses.dataclass(frozen=True)
class GcFlags:
    """`lmkit hub gc`'s checked flags."""

    grace_minutes: float = setting(hub.GC_GRACE_SECONDS / 60, "Leftovers younger than this are left alone.",
                                   minimum=0)

    def __post_init__(self):
        check_fields(self)


def _cmd_tokenizer_train(args):
    from lmkit import tokenization
    from lmkit.settings import apply_overrides, build_section, read_yaml_mapping

    spec_values = apply_overrides(read_yaml_mapping(args.spec, "tokenizer spec"), args.overrides, args.spec)
    spec = build_section(tokenization.TokenizerSpec, spec_values, "", args.spec)
    if spec.is_auto and spec.files:
        from lmkit import sizing
        from lmkit.data.corpus import iter_documents

        spec = sizing.choose_tokenizer(
            spec, lambda: iter_documents(spec.files, spec.text_field, spec.doc_separator, spec.encoding_errors))
    output = tokenization.train_tokenizer_from_spec(spec)
    print(f"tokenizer saved to {output}")


def _cmd_train(args):
    from lmkit import sizing
    from lmkit.recipe import load_recipe, recipe_from_tree
    from lmkit.training import end_processes, train

    # `--data a.txt b.txt data.doc_separator=%`: the overrides typed after the files are overrides, not files.
    files = [item for item in args.data or [] if not _OVERRIDE.match(item)]
    items = [*args.items, *(item for item in args.data or [] if _OVERRIDE.match(item))]
    recipes = [item for item in items if "=" not in item]
    overrides = [item for item in items if "=" in item]
    if len(recipes) > 1:
        raise UserError(f"train: give one recipe file (then key=value overrides), got {len(recipes)}: {recipes}")
    if files:
        overrides.append("data.files=" + json.dumps(files))
    if args.output:
        overrides.append("training.output_dir=" + json.dumps(args.output))
    if args.time is not None:
        # as a string, so that a plain number of seconds stays a duration; a new budget is measured anew
        overrides += ["budget.time=" + json.dumps(args.time), "budget.steps=null"]
    if recipes:
        recipe = load_recipe(recipes[0], overrides)
    else:
        missing = [flag for flag, value in (("--data", files), ("--time", args.time), ("--output", args.output))
                   if not value]
        if missing:
            raise UserError(f"train: give a recipe file, or --data FILES --time DURATION --output DIR to size "
                            f"everything automatically (missing: {', '.join(missing)})")
        recipe = recipe_from_tree(sizing.auto_recipe(files, args.output), overrides, "lmkit train --data")
    metrics = train(recipe, resume=args.resume, started=args.started)
    end_processes()
    if metrics.get("already_finished"):
        print(f"already finished: {recipe.training.output_dir} (eval_loss {metrics['eval_loss']:.4f}); "
              "nothing trained or published. Raise training.max_steps to train further, or `lmkit push` it by hand")
        return
    line = (f"done: {recipe.training.output_dir}: eval_loss {metrics['eval_loss']:.4f}, "
            f"perplexity {metrics['eval_perplexity']:.2f}")
    if "eval_bits_per_byte" in metrics:
        line += f", bits/byte {metrics['eval_bits_per_byte']:.3f}"
    if "eval_bleu" in metrics:
        line += (f", BLEU {metrics['eval_bleu']:.2f} (baseline {metrics.get('eval_baseline_bleu', float('nan')):.2f})"
                 f", chrF {metrics['eval_chrf']:.2f} (baseline {metrics.get('eval_baseline_chrf', float('nan')):.2f})")
    if "eval_stop_rate" in metrics:  # a prompt→completion task or conversations: replies stopped by EOS or end of turn
        line += f", exact match {metrics['eval_exact_match']:.1%}, stop rate {metrics['eval_stop_rate']:.0%}"
    if "hub_ref" in metrics:
        line += f"; published as {metrics['hub_ref']}"
    print(line)


def _cmd_validate(args):
    from lmkit.recipe import load_recipe
    from lmkit.training import preflight

    recipes = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if not recipes:
        raise UserError("validate: give at least one recipe file (then any key=value overrides)")
    for path in recipes:
        preflight(load_recipe(path, overrides), resume=args.resume)
        print(f"ok: {path}")


def _cmd_eval(args):
    from lmkit import api

    with flag_errors("num_samples"):  # checked by evaluate_model before it loads anything
        report = api.evaluate(args.model, data=args.data, num_samples=args.num_samples, output=args.output,
                              hub=args.hub)
    print(json.dumps(report, indent=2, ensure_ascii=False))


def _cmd_generate(args):
    from lmkit import api
    from lmkit.generation import GenerateSettings

    settings = settings_from_flags(GenerateSettings, args)
    prompt_printed = False

    def show(text: str) -> None:  # the prompt, once the model has loaded, then the continuation as it comes
        nonlocal prompt_printed
        if not prompt_printed:
            print(args.prompt, end="", flush=True)
            prompt_printed = True
        print(text, end="", flush=True)

    with flag_errors(*(f.name for f in dataclasses.fields(GenerateSettings))):
        api.generate(args.model, args.prompt, show, hub=args.hub, **dataclasses.asdict(settings))
    print(args.prompt if not prompt_printed else "")


def _cmd_push(args):
    from lmkit import api

    print(api.push(args.run_dir, args.name, args.hub, message=args.message))


def _cmd_hub(args):
    if args.hub_command == "list":
        print(format_list(hub.list_models(args.hub)))
    elif args.hub_command == "show":
        info = hub.show(args.name, args.hub)
        print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_show(info))
    elif args.hub_command == "delete":
        if not args.yes:
            raise UserError(f"hub delete {args.name}: add --yes to confirm (deleting cannot be undone)")
        hub.delete(args.name, args.hub)
        print(f"deleted {args.name}")
    elif args.hub_command == "verify":
        rows = hub.verify(args.name, args.hub)
        for row in rows:
            what = f"{row['name']}@{row['revision']}" if row["revision"] else f"{row['name']} (refs/main)"
            print(f"ok       {what}" if row["ok"] else f"DAMAGED  {what}: {' '.join(row['problem'].split())}")
        damaged = sum(not row["ok"] for row in rows)
        print(f"{len(rows) - damaged} ok, {damaged} damaged" if rows else "no revisions in the hub")
        return 1 if damaged else 0
    elif args.hub_command == "gc":
        removed = hub.gc(args.hub, grace_seconds=settings_from_flags(GcFlags, args).grace_minutes * 60)
        for path in removed:
            print(f"removed {path}")
        print(f"{len(removed)} leftover(s) removed")


def _cmd_export(args):
    from lmkit import api

    print(api.export(args.model, args.output, format=args.format, hub=args.hub, output_key="--output"))


def _cmd_serve(args):
    import os

    from lmkit.serve import API_KEY_ENV, ServeSettings, serve

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if args.api_key is None and api_key is not None:  # a bad key from the environment names the variable
        try:
            ServeSettings(api_key=api_key)
        except SettingError as exc:
            raise UserError(f"${API_KEY_ENV} {exc.detail}") from None
    settings = settings_from_flags(ServeSettings, args, api_key=api_key)
    serve(args.model, hub=args.hub, settings=settings)


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def _metric_cells(metrics: dict) -> list[str]:
    cells = [f"{metrics[k]:.2f}" if k in metrics else "-" for k in ("bleu", "chrf", "perplexity")]
    return cells + [f"{metrics['bits_per_byte']:.3f}" if "bits_per_byte" in metrics else "-"]


def format_list(rows) -> str:
    """The `lmkit hub list` table."""
    if not rows:
        return "no models in the hub"
    header = ["NAME", "REVS", "MAIN", "BLEU", "CHRF", "PPL", "BPB", "SIZE", "PUSHED (UTC)"]
    table = [header] + [
        [r["name"], str(r["revisions"]), r["revision"][:SHORT_REVISION], *_metric_cells(r["metrics"]),
         _human_size(r["size"]), r["created"][:19].replace("T", " ")]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _stats_rows(info: dict) -> list[tuple[str, str]]:
    """The data and tokenizer statistics of a revision as a few (label, text) rows."""
    rows = []
    data, tok = info.get("data") or {}, info.get("tokenizer") or {}
    if "records_read" in data:  # pairs or conversations
        unit = "conversations" if "conversations_kept" in data else "pairs"
        dropped = ", ".join(f"{k} {v}" for k, v in (data.get("dropped") or {}).items() if v) or "none"
        rows.append((unit, f"{data['records_read']:,} read, {data.get(unit + '_kept', 0):,} kept "
                           f"(dropped: {dropped})"))
    if "documents_read" in data:
        dropped = ", ".join(f"{k} {v}" for k, v in (data.get("dropped") or {}).items() if v) or "none"
        rows.append(("documents", f"{data['documents_read']:,} read, {data.get('documents_kept', 0):,} kept "
                                  f"(dropped: {dropped})"))
    for split, counts in (data.get("splits") or {}).items():
        parts = [f"{counts[k]:,} {label}" for k, label in (("documents", "documents"), ("pairs", "pairs"),
                                                            ("conversations", "conversations"), ("tokens", "tokens"),
                                                            ("blocks", "blocks")) if k in counts]
        rows.append((split, ", ".join(parts)))
    if "kind" in tok:
        line = f"{tok['kind']}, {tok.get('vocab_size', '?'):,} tokens"
        if tok.get("chars_per_token"):
            line += f", {tok['chars_per_token']:.2f} chars/token"
        if tok.get("unk_rate") is not None:
            line += f", unknown {100 * tok['unk_rate']:.2f}% of tokens"
        rows.append(("tokenizer", line + f" (measured on {tok.get('stats_measured_on', 'held-out text')})"))
    return rows


def format_show(info) -> str:
    """The `lmkit hub show` text: what the revision is, how to load it, and the revision history."""
    lines = [f"{info['name']}@{info['revision']}" + ("  (main)" if info["main"] else "")]
    lines.append(f"  pushed   {info['created']}" + (f"  \"{info['message']}\"" if info["message"] else ""))
    lines.append(f"  size     {_human_size(info['size'])}")
    if info["architecture"]:
        lines.append("  model    " + ", ".join(f"{k}={v}" for k, v in info["architecture"].items()))
    if info["metrics"]:
        lines.append("  results  " + ", ".join(f"{k} {v:.4g}" for k, v in info["metrics"].items()))
    lines += [f"  {label:<9}{text}" if len(label) < 9 else f"  {label} {text}" for label, text in _stats_rows(info)]
    if info.get("chat"):
        lines.append(f"  chat     a chat model: its tokenizer carries a chat template (markers "
                     f"{', '.join(info['chat']['markers']) or 'none'}); generation stops at token ids "
                     f"{', '.join(map(str, info['chat']['stop_token_ids']))}")
    lines.append(f"  path     {info['path']}")
    subfolder = info["transformers_subfolder"]
    if subfolder is not None:
        lines.append("  plain transformers: from_pretrained(NAME, cache_dir=HUB, revision=REV, local_files_only=True"
                     + (f', subfolder="{subfolder}")' if subfolder else ")"))
    lines.append("history (newest first):")
    for entry in info["history"]:
        marker = "*" if entry["main"] else " "
        metrics = " ".join(f"{k}={v:.4g}" for k, v in entry["metrics"].items())
        lines.append(f"  {marker} {entry['revision'][:SHORT_REVISION]}  {entry['created'][:19].replace('T', ' ')}  "
                     f"{_human_size(entry['size']):>9}  {metrics}  {entry['message']}".rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmkit", description="Train a tokenizer and a GPT-2-class model on your text, evaluate it, publish it."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides_help = "dotted overrides typed as YAML, e.g. training.learning_rate=3e-4 data.packing=false"
    hub_help = "the hub directory (default: $LMKIT_HUB or ./hub)"
    model_help = "a run dir, a checkpoint dir or a hub name org/name[@rev]"

    tokenizer = commands.add_parser("tokenizer", help="tokenizer commands")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    tok_train = tokenizer_commands.add_parser("train", help="train a tokenizer from a spec (see tokenizer_training/)")
    tok_train.add_argument("spec", help="tokenizer spec YAML")
    tok_train.add_argument("overrides", nargs="*", help=overrides_help)
    tok_train.set_defaults(func=_cmd_tokenizer_train)

    train = commands.add_parser(
        "train", help="train a model from a recipe (see recipes/), or sized automatically: --data FILES --time T "
                      "--output DIR")
    train.add_argument("items", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                       help="a recipe YAML (none with --data: every size chosen automatically), then "
                            + overrides_help)
    train.add_argument("--data", nargs="+", metavar="FILE",
                       help="corpus files, folders or globs (data.files); without a recipe, the tokenizer, "
                            "model size, batch and learning rate are chosen from them, the machine and --time")
    train.add_argument("--output", metavar="DIR", help="the run directory (training.output_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    train.add_argument("--time", metavar="DURATION",
                       help="finish the whole command within this wall time (e.g. 90s, 5m, 1h30m): the step count is "
                            "fixed from a measured step time and written to the run's recipe.yaml (budget.time)")
    train.set_defaults(func=_cmd_train)

    validate = commands.add_parser(
        "validate", help="run every check `lmkit train` runs before its data stage, without running anything"
    )
    validate.add_argument("items", nargs="+", metavar="RECIPE|KEY=VALUE",
                          help="recipe YAML files, then overrides applied to each (" + overrides_help + ")")
    validate.add_argument("--resume", action="store_true", help="check as `lmkit train --resume` would")
    validate.set_defaults(func=_cmd_validate)

    evaluate = commands.add_parser("eval", help="BLEU, chrF, perplexity and bits per byte on held-out text")
    evaluate.add_argument("model", help=model_help)
    evaluate.add_argument("--data", help="a corpus to score instead of the run's saved held-out split")
    evaluate.add_argument("--num-samples", type=int,
                          help="documents scored by BLEU (default: the recipe's eval.bleu_samples)")
    evaluate.add_argument("--output", help="where to write eval_report.json (default: a run or checkpoint dir itself; "
                          "for a hub name or revision path ./runs/eval/ORG--NAME-REV, never inside the hub)")
    evaluate.add_argument("--hub", help=hub_help)
    evaluate.set_defaults(func=_cmd_eval)

    generate = commands.add_parser("generate", help="continue a prompt, streaming tokens")
    generate.add_argument("model", help=model_help)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=50, help="0 = off")
    generate.add_argument("--top-p", type=float, default=0.95, help="1.0 = off")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--hub", help=hub_help)
    generate.set_defaults(func=_cmd_generate)

    push = commands.add_parser("push", help="publish a run or checkpoint dir as a new hub revision")
    push.add_argument("run_dir", help="a run dir or checkpoint dir")
    push.add_argument("--name", required=True, help="org/name")
    push.add_argument("--hub", help=hub_help)
    push.add_argument("--message", help="a note recorded with the revision")
    push.set_defaults(func=_cmd_push)

    hub_parser = commands.add_parser("hub", help="the local model hub: list, show, delete, verify, gc")
    hub_option = argparse.ArgumentParser(add_help=False)
    hub_option.add_argument("--hub", help=hub_help)
    hub_commands = hub_parser.add_subparsers(dest="hub_command", required=True, metavar="COMMAND")
    hub_commands.add_parser("list", parents=[hub_option], help="models, revisions, latest metrics, size, date")
    show = hub_commands.add_parser("show", parents=[hub_option], help="a model card summary and revision history")
    show.add_argument("name", help="org/name[@rev]")
    show.add_argument("--json", action="store_true", help="everything recorded, as JSON")
    delete = hub_commands.add_parser("delete", parents=[hub_option],
                                     help="delete a revision (org/name@rev) or a whole model (org/name)")
    delete.add_argument("name", help="org/name or org/name@rev")
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    verify = hub_commands.add_parser("verify", parents=[hub_option],
                                     help="re-hash every revision (of NAME, or of every model) and check the refs")
    verify.add_argument("name", nargs="?", help="org/name (default: every model)")
    gc = hub_commands.add_parser("gc", parents=[hub_option],
                                 help="remove what killed pushes and deletes left behind (never a live push's)")
    gc.add_argument("--grace-minutes", type=float, default=hub.GC_GRACE_SECONDS / 60,
                    help="leave leftovers younger than this alone (default: %(default)g)")
    hub_parser.set_defaults(func=_cmd_hub)

    export = commands.add_parser(
        "export",
        help="export a model to a stock transformers architecture (GPT-2 or GPT-NeoX) that loads without lmkit",
    )
    export.add_argument("model", help=model_help)
    # Checked by lmkit.exporting (which imports torch), not by argparse choices, so the list lives in one place.
    export.add_argument("--format", default="auto", metavar="FORMAT",
                        help="auto (learned and sinusoidal positions -> gpt2, rope -> gpt-neox), gpt2 or gpt-neox")
    export.add_argument("--output", required=True, help="the directory to write (must not exist or be empty)")
    export.add_argument("--hub", help=hub_help)
    export.set_defaults(func=_cmd_export)

    serve = commands.add_parser("serve",
                                help="serve a model over an OpenAI-compatible HTTP API, with a playground page")
    serve.add_argument("model", help=model_help + ", or an export dir")
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health "
                                         "(default: $LMKIT_API_KEY; unset = no key)")
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="the most tokens one prompt may generate, over all its choices (n x max_tokens)")
    serve.add_argument("--max-n", type=int, default=16, help="the most choices (n, best_of) one prompt may ask for")
    serve.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together at most")
    serve.add_argument("--max-queue", type=int, default=64, help="generations waiting at most; beyond, 503")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body; beyond, 413")
    serve.add_argument("--drain-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long in-flight requests may finish before they are cancelled")
    serve.add_argument("--stream-interval-ms", type=float, default=20.0,
                       help="after the first streamed text, send at most one chunk per this many ms (0 = every token)")
    serve.add_argument("--threads", type=int,
                       help="torch threads for the model on CPU (default: the CPU cores less one, at most 8)")
    serve.add_argument("--chat-template", metavar="FILE",
                       help="a Jinja chat template that replaces the model's own for /v1/chat/completions")
    serve.add_argument("--hub", help=hub_help)
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # a time budget (train --time) counts from here: the interpreter started ~0.2 s earlier
    args = build_parser().parse_args(argv)
    args.started = started
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = args.func(args)
    except (UserError, OSError) as exc:
        # OSError: a full disk, a read-only or missing directory, a file where a directory belongs. Not a bug in
        # lmkit but the machine's state, so the same one line naming the path and the cause.
        if args.debug:
            raise
        message = " ".join((str(exc) if isinstance(exc, UserError) else describe_os_error(exc)).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
