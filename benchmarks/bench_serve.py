"""`lmkit serve` under load, side by side with `transformers serve` and with one-at-a-time in-process `generate`.

The model is the size the demo had before the sizing study (4 layers, 4 heads, 192 wide, 128 positions, a char
tokenizer trained here on the fortunes-zh texts), with random weights and learned positions, so that the very same
weights also export to GPT-2 (`lmkit.exporting.export_model(..., format="gpt2")`) for `transformers serve`, which
cannot load lmkit's class. Weights do not change the cost of a decoding step; random ones rarely end a text early, and
every request asks for the same number of tokens (greedy). Each server runs as a subprocess on a free 127.0.0.1 port;
the load generator is one asyncio process with 1, 4 and 16 concurrent streaming clients, each sending its requests
back to back. Reported per (system, clients): aggregate generated tokens/s, p50/p95 time to first token and request
latency. Token counts come from the stream's `usage` where the server sends it, else from the number of text chunks.

`lmkit serve` is also measured with `logprobs: 5` on every request (the cost of log-probabilities: target <= 15% of
throughput at 16 clients) and with `n: 4` (four choices a request, counted as four times the tokens). With `--abuse`,
the 16-client load runs again beside 2 abusive clients (prompts near the body limit, poison sampling values, streams
dropped after their first event): the normal clients should keep >= 80% of their throughput.

`transformers serve` is the `transformers` command of this environment (transformers' `serving` extra); without it,
or when it does not start, the table goes without it and says so. Everything runs offline.

    python benchmarks/bench_serve.py                    # about 5-10 minutes on 2 cores
    python benchmarks/bench_serve.py --requests 8 --max-tokens 32 --skip-transformers   # a quick look
    python benchmarks/bench_serve.py --smoke            # a 2-layer model on the committed fixtures, 1 and 4 clients
    python benchmarks/bench_serve.py --abuse --skip-transformers   # with the 2 abusive clients

The machine may be shared; the load generator and the server compete for the same cores. Read the ratios.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import CHINESE_POEMS, CHINESE_QUOTES, documents  # noqa: E402
from smoke import FIXTURES, add_smoke  # noqa: E402

from lmkit.configuration import LmkitConfig  # noqa: E402
from lmkit.exporting import export_model  # noqa: E402
from lmkit.modeling import LmkitForCausalLM  # noqa: E402
from lmkit.serve import default_threads  # noqa: E402
from lmkit.tokenization import TokenizerSpec, train_tokenizer  # noqa: E402

PROMPT_CHARS = 16  # the demo's eval prompts are 16 characters too
VARIANTS = {"logprobs 5": {"logprobs": 5}, "n 4": {"n": 4}}  # lmkit serve's runs with other requests
# (layers, heads, width): the demo's size before the sizing study, and a smoke run's
SIZES = {"demo": (4, 4, 192), "tiny": (2, 2, 32)}


def corpus_texts(corpus: str) -> list[str]:
    """The Chinese texts the tokenizer and the prompts come from: Debian's fortunes-zh, or the committed fixtures."""
    if corpus == "fortunes-zh":
        return documents(CHINESE_QUOTES + CHINESE_POEMS)
    return [json.loads(line)["text"] for name in ("zh-quotes.jsonl", "zh-poetry.jsonl")
            for line in (FIXTURES / name).open(encoding="utf-8")]


def build_model(directory: Path, texts: list[str], size: str) -> Path:
    """A random lmkit model (learned positions) with a char tokenizer, saved as a run dir would be."""
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=6000, min_frequency=2), texts, directory)
    torch.manual_seed(0)
    n_layer, n_head, n_embd = SIZES[size]
    config = LmkitConfig(
        vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        position_embedding_type="learned", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LmkitForCausalLM(config).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subprocess:
    """A server subprocess, started at once; `wait_ready` waits (bounded) until GET `ready_path` answers 200."""

    def __init__(self, argv: list[str], url: str, ready_path: str, log: Path, env: dict):
        self.argv, self.url, self.ready_path, self.log = argv, url, ready_path, log
        self.process = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, seconds: float) -> None:
        """Return once the server answers; stop it and raise RuntimeError if it exits or `seconds` pass first."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.process.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.argv} not ready after {seconds:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """(time to first text, latency, generated tokens) of one streamed completion."""
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:500]!r}")
        buffer = b""
        async for data in response.aiter_raw():  # events split by hand: cheaper than httpx's line decoder
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for raw in events:
                if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                    continue
                first, chunks, usage = _account(json.loads(raw[6:]), first, chunks, usage)
    end = time.perf_counter()
    return (first or end) - start, end - start, usage if usage is not None else chunks


def _account(event: dict, first: float | None, chunks: int, usage: int | None) -> tuple[float | None, int, int | None]:
    """Update (time of first text, text chunks, usage tokens) with one streamed event."""
    if event.get("usage"):
        usage = event["usage"]["completion_tokens"]
    for choice in event.get("choices") or []:
        text = choice.get("text") or (choice.get("delta") or {}).get("content")
        if text:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    return first, chunks, usage


async def abuse(http: httpx.AsyncClient, url: str, model: str, stop: asyncio.Event, counts: dict) -> None:
    """One abusive client until `stop`: a prompt near the 1 MB body limit, poison sampling values, a stream dropped
    after its first event, in turn. `counts` tallies the statuses it was answered."""
    # encoded once: what the abuse costs this load generator should not count against the server
    bodies = [json.dumps(body, ensure_ascii=False).encode() for body in (
        {"model": model, "prompt": "床" * 300_000, "max_tokens": 8},
        {"model": model, "prompt": "床前", "max_tokens": 16, "temperature": 1e-300},
        {"model": model, "prompt": "床前", "max_tokens": 16, "top_p": 1e-300, "temperature": 1.0},
    )]
    headers = {"Content-Type": "application/json"}
    turn = 0
    while not stop.is_set():
        if turn % 4 == 3:
            async with http.stream("POST", url, json={"model": model, "prompt": "床", "max_tokens": 64,
                                                      "stream": True, "ignore_eos": True}) as response:
                async for _ in response.aiter_raw():
                    break  # hang up after the first bytes
            status = response.status_code
        else:
            status = (await http.post(url, content=bodies[turn % 4], headers=headers)).status_code
        counts[status] = counts.get(status, 0) + 1
        turn += 1


async def load(url: str, model: str, prompts: list[str], clients: int, requests_per_client: int, max_tokens: int,
               extra: dict, abusers: int = 0) -> dict:
    """`clients` concurrent streaming clients, each sending `requests_per_client` requests back to back (beside
    `abusers` abusive clients, when given)."""
    results = []

    async def client_loop(index: int, http: httpx.AsyncClient):
        for r in range(requests_per_client):
            prompt = prompts[(index * requests_per_client + r) % len(prompts)]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    **extra}
            results.append(await one_request(http, url, body))

    limits = httpx.Limits(max_connections=clients + abusers + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await client_loop(0, http)  # warm-up, not counted
        results.clear()
        stop, abused = asyncio.Event(), {}
        abusing = [asyncio.create_task(abuse(http, url, model, stop, abused)) for _ in range(abusers)]
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*abusing)
    summary = summarise(results, elapsed)
    if abusers:
        summary["abuse_statuses"] = abused
    return summary


def summarise(results: list[tuple[float, float, int]], elapsed: float) -> dict:
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)

    def pct(values, q):
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {"requests": len(results), "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "latency_p50": pct(latency, 0.5), "latency_p95": pct(latency, 0.95)}


def in_process_reference(model_dir: Path, prompts: list[str], requests: int, max_tokens: int) -> dict:
    """One request at a time through `generate` in this process: the cost of serving without batching."""
    from transformers import PreTrainedTokenizerFast

    model = LmkitForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    results = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(requests + 1):
            ids = tokenizer(prompts[i % len(prompts)], return_tensors="pt", add_special_tokens=False).input_ids
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            latency = time.perf_counter() - t0
            if i == 0:  # warm-up
                start = time.perf_counter()
                continue
            results.append((float("nan"), latency, out.shape[1] - ids.shape[1]))
    return summarise(results, time.perf_counter() - start)


def fmt(seconds: float) -> str:
    return "-" if seconds != seconds else f"{1000 * seconds:.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each (system, clients), alternating the systems; the best is reported")
    parser.add_argument("--skip-transformers", action="store_true", help="do not run `transformers serve`")
    parser.add_argument("--transformers-flags", default="--continuous-batching",
                        help="extra flags for `transformers serve` (default: --continuous-batching)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch threads for every system (default: lmkit serve's default, the cores less one)")
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 16],
                        help="concurrency levels, comma-separated; the first should be 1 (default: 1,4,16)")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo", help="the model's size (default: demo)")
    parser.add_argument("--corpus", choices=("fortunes-zh", "fixtures"), default="fortunes-zh",
                        help="the texts of the tokenizer and the prompts: Debian's fortunes-zh (`make corpora`) or "
                             "tests/fixtures' zh-*.jsonl")
    parser.add_argument("--ready-seconds", type=float, default=300,
                        help="how long a server may take to answer /health before it counts as not starting")
    parser.add_argument("--variants", type=lambda text: [v for v in text.split(",") if v],
                        default=list(VARIANTS), help=f"lmkit serve's extra runs (default: {','.join(VARIANTS)})")
    parser.add_argument("--abuse", action="store_true",
                        help="also run the most clients beside 2 abusive ones (lmkit serve only)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_smoke(parser, requests=4, max_tokens=8, repeats=1, clients=[1, 4], size="tiny", corpus="fixtures",
              ready_seconds=120, abuse=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts = corpus_texts(args.corpus)
    prompts = [t.replace("\n", "")[:PROMPT_CHARS] for t in texts if len(t) > 2 * PROMPT_CHARS][:256]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    # the same torch threads for all: lmkit serve's --threads, and OMP_NUM_THREADS for transformers serve
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads)}
    table: dict[str, dict[int, dict]] = {}
    servers: dict[str, tuple[Subprocess, str, dict]] = {}
    try:
        model_dir = build_model(work / "model", texts, args.size)
        gpt2_dir = export_model(model_dir, work / "gpt2", format="gpt2")
        print(f"model: random {args.size}-sized lmkit model {SIZES[args.size]} (layers, heads, width), learned "
              f"positions ({model_dir}); GPT-2 export: {gpt2_dir}")
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}; torch threads {args.threads}")

        reference = "in-process generate, 1 at a time"
        table[reference] = {1: in_process_reference(model_dir, prompts, min(args.requests, 16), args.max_tokens)}

        port = free_port()
        lmkit_server = Subprocess([sys.executable, "-m", "lmkit", "serve", str(model_dir), "--port", str(port),
                                   "--threads", str(args.threads)], f"http://127.0.0.1:{port}", "/health",
                                  work / "lmkit.log", env)
        plain = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        servers["lmkit serve"] = (lmkit_server, str(model_dir), plain)
        for variant in args.variants:  # the same server, other requests
            servers[f"lmkit serve, {variant}"] = (lmkit_server, str(model_dir), {**plain, **VARIANTS[variant]})
        if args.skip_transformers:
            print("transformers serve: skipped (--skip-transformers)")
        else:
            started = start_transformers(args, gpt2_dir, work, env)
            if started:
                servers[started[0]] = started[1:]
        # the servers start side by side (each spends its first seconds importing torch and loading the model)
        starting = time.perf_counter()
        for name in list(servers):
            if name.startswith("lmkit serve,"):
                continue  # lmkit serve's variants: its own server
            try:
                servers[name][0].wait_ready(args.ready_seconds)
            except RuntimeError as error:
                if name == "lmkit serve":
                    raise
                print(f"{name}: skipped: it did not start: {error}")
                del servers[name]
                continue
            print(f"{name}: ready {time.perf_counter() - starting:.0f} s after its start")
        # both servers stay up; the systems take turns at each level, so a burst of load from elsewhere on the
        # machine does not land on one system only
        for clients in args.clients:
            for rep in range(args.repeats):
                for name in list(servers) if rep % 2 == 0 else list(servers)[::-1]:
                    server, model, extra = servers[name]
                    try:
                        result = asyncio.run(load(server.url + "/v1/completions", model, prompts, clients,
                                                  max(1, args.requests // clients), args.max_tokens, extra))
                    except Exception as error:  # report what it answered and go on with what can be measured
                        print(f"{name}, {clients} clients: failed: {str(error)[:800]}")
                        continue
                    best = table.setdefault(name, {}).get(clients)
                    if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
                        table[name][clients] = result
        if args.abuse:
            most = max(args.clients)
            server, model, extra = servers["lmkit serve"]
            table["lmkit serve, beside 2 abusive clients"] = {most: asyncio.run(load(
                server.url + "/v1/completions", model, prompts, most, max(1, args.requests // most),
                args.max_tokens, extra, abusers=2))}
            if server.process.poll() is not None:
                raise RuntimeError("lmkit serve died under abuse")
    finally:
        stopping = time.perf_counter()
        for server in {id(entry[0]): entry[0] for entry in servers.values()}.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"servers stopped in {time.perf_counter() - stopping:.0f} s")

    print(f"\n{args.max_tokens} greedy tokens per request, prompts of {PROMPT_CHARS} characters, best of "
          f"{args.repeats} runs; times in ms\n")
    print(f"{'system':<40} {'clients':>7} {'reqs':>5} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'lat p50':>8} {'lat p95':>8}")
    for system, rows in table.items():
        for clients, r in sorted(rows.items()):
            print(f"{system:<40} {clients:>7} {r['requests']:>5} {r['tokens_per_s']:>9.1f} {fmt(r['ttft_p50']):>9} "
                  f"{fmt(r['ttft_p95']):>9} {fmt(r['latency_p50']):>8} {fmt(r['latency_p95']):>8}")
    ours = table.get("lmkit serve", {})
    missing = [c for c in args.clients if c not in ours]
    if missing or 1 not in ours:
        print(f"\nlmkit serve has no result at {', '.join(map(str, missing or [1]))} clients: no ratios")
        return 1
    most = max(args.clients)
    print(f"\nlmkit serve, {most} clients vs 1: {ours[most]['tokens_per_s'] / ours[1]['tokens_per_s']:.2f}x aggregate "
          f"throughput" + (" (target >= 4x)" if most == 16 else ""))
    print(f"lmkit serve, p50 time to first token at 1 client: {1000 * ours[1]['ttft_p50']:.0f} ms (target < 100 ms)")
    alone = table[reference][1]["tokens_per_s"]
    print("lmkit serve vs in-process one-at-a-time generate: "
          + ", ".join(f"{c} clients {ours[c]['tokens_per_s'] / alone:.2f}x" for c in args.clients))
    for variant in args.variants:
        rows = table.get(f"lmkit serve, {variant}", {})
        if most in rows:
            ratio = rows[most]["tokens_per_s"] / ours[most]["tokens_per_s"]
            print(f"lmkit serve with {variant}, {most} clients: {ratio:.2f}x the throughput of plain requests"
                  + (" (target >= 0.85x)" if variant == "logprobs 5" else ""))
    abused = table.get("lmkit serve, beside 2 abusive clients", {}).get(most)
    if abused:
        print(f"lmkit serve beside 2 abusive clients, {most} normal ones: "
              f"{abused['tokens_per_s'] / ours[most]['tokens_per_s']:.2f}x their throughput (target >= 0.8x), p50 "
              f"latency {fmt(abused['latency_p50'])} vs {fmt(ours[most]['latency_p50'])} ms; abusive requests "
              f"answered {abused['abuse_statuses']}")
    theirs = next((rows for name, rows in table.items() if name.startswith("transformers serve")), None)
    if theirs:
        print("lmkit serve vs transformers serve (aggregate tokens/s): "
              + ", ".join(f"{c} clients {ours[c]['tokens_per_s'] / theirs[c]['tokens_per_s']:.2f}x"
                          for c in args.clients if c in theirs))
    if args.json:
        Path(args.json).write_text(json.dumps({k: {str(c): r for c, r in v.items()} for k, v in table.items()},
                                              indent=2))
    return 0


def start_transformers(args, gpt2_dir: Path, work: Path, env: dict):
    """Start `transformers serve` on the GPT-2 export: (name, server, model, extra fields), or None after saying why
    not."""
    command = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if command is None:
        print("transformers serve: skipped: no `transformers` command in this environment "
              "(pip install 'transformers[serving]')")
        return None
    port = free_port()
    flags = args.transformers_flags.split()
    name = f"transformers serve {' '.join(flags)}".strip()
    server = Subprocess([command, "serve", str(gpt2_dir), "--port", str(port), "--host", "127.0.0.1", "--device",
                         "cpu", *flags], f"http://127.0.0.1:{port}", "/health", work / "hf.log", env)
    # it refuses stream_options (so no usage in the stream: tokens are counted as text chunks, one per token there)
    return name, server, str(gpt2_dir), {}


if __name__ == "__main__":
    sys.exit(main())
