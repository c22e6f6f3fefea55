"""What a JSON schema costs: structured against plain chat on the same pool, in one run.

Starts a private Redis, Ray Serve with the local profile's text pool (tiny Phi-3.5-mini on
vLLM's CPU backend, random weights) and one gateway replica, then sends chat requests through
REST (aiohttp to /v1/chat/completions), temperature 0:

* throughput: `json_schema` requests against plain ones, in alternating blocks of `--block`
  requests at concurrency `--concurrency`, so drift on the shared 2 cores hits both alike.
  Random weights never stop by themselves, so the lengths are fixed by construction: the
  schema is an object holding an array of exactly `--items` objects of enums and a boolean
  (its compact JSON has a bounded length), and plain requests use `ignore_eos`. Both modes get
  the same `max_tokens`: the longest structured output seen in the warm-up, plus a margin,
  so a plain request generates about as many tokens as a structured one. Tokens/s is the sum
  of `usage.completion_tokens` over the summed block wall time.
* first token: streamed `json_schema` requests at concurrency 1, alternating a schema never
  sent before (the same shape with one enum value made unique, so the pool compiles a new
  grammar) and one already used (its grammar cached), and a plain request for reference.
  Time to the first chunk with content.

Ends with
  RESULT structured json_schema_tps_ratio=X first_schema_ttft_ratio=Y
X = structured / plain tokens/s; Y = p50 TTFT of a new schema / p50 TTFT of a cached one.

  .venv/bin/python benchmarks/structured_outputs.py [--quick] [--requests 120] [--block 10]
      [--concurrency 4] [--items 6] [--enum-values 4] [--schemas 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from _common import REPO, ChatSession, local_phiserve, pct, sse_data

sys.path.insert(0, str(REPO))
SERVED, PROMPT = "phi-3.5-mini", "List the items as JSON."
MARGIN_TOKENS = 4


def item_schema(items: int, tag: str = "cached", enum_values: int = 4) -> dict[str, Any]:
    """An object whose compact JSON has a bounded length: `items` objects of enums and a bool.
    `tag`: one enum value, so schemas of the same shape differ (a new grammar per tag).
    `enum_values`: the colors to choose from; more make a larger grammar to compile."""
    colors = ["red", "green", "blue", f"c-{tag}"] + [f"v{k:05d}" for k in range(enum_values - 4)]
    item = {
        "type": "object",
        "properties": {
            "color": {"enum": colors},
            "ok": {"type": "boolean"},
            "size": {"enum": ["s", "m", "l"]},
        },
        "required": ["color", "ok", "size"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": item, "minItems": items, "maxItems": items}},
        "required": ["items"],
        "additionalProperties": False,
    }


class Client(ChatSession):
    timeout_s = 300.0

    def body(self, max_tokens: int, schema: dict[str, Any] | None, *, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": SERVED,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if schema is None:
            body["ignore_eos"] = True
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "items", "schema": schema},
            }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def unary(self, body: dict[str, Any]) -> tuple[int, str]:
        """(completion tokens, the text)."""
        async with self._session.post(self._url, data=json.dumps(body), headers=self._headers) as r:
            payload = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {payload[:300]!r}")
        answer = json.loads(payload)
        return int(answer["usage"]["completion_tokens"]), answer["choices"][0]["message"]["content"]

    async def ttft(self, body: dict[str, Any]) -> tuple[float, str]:
        """(seconds to the first chunk with content, the whole text)."""
        t0, first, text = time.perf_counter(), None, []
        async with self._session.post(self._url, data=json.dumps(body), headers=self._headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
            async for data in sse_data(r.content):
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                for choice in event.get("choices") or ():
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first if first is not None else time.perf_counter() - t0
                        text.append(piece)
        if first is None:
            raise RuntimeError("the stream carried no content")
        return first, "".join(text)


def check_output(text: str, items: int) -> None:
    """The output parses and has the schema's shape (else the benchmark measures nothing)."""
    value = json.loads(text)
    if len(value["items"]) != items or set(value["items"][0]) != {"color", "ok", "size"}:
        raise RuntimeError(f"output off the schema: {text[:200]}")


async def run_block(client: Client, body: dict[str, Any], count: int, concurrency: int) -> tuple[int, float]:
    """`count` requests at `concurrency`; (completion tokens, wall seconds)."""
    left, tokens = [count], [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            n, _ = await client.unary(body)
            tokens[0] += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens[0], time.perf_counter() - t0


async def bench(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    schema = item_schema(args.items, enum_values=args.enum_values)
    print(f"  schema: {len(json.dumps(schema, separators=(',', ':')))} bytes as compact JSON", flush=True)
    await client.open(args.concurrency)
    try:
        # Warm-up and calibration: the structured output's length fixes both modes' max_tokens.
        lengths = []
        for _ in range(args.warmup):
            n, text = await client.unary(client.body(1024, schema))
            check_output(text, args.items)
            lengths.append(n)
        max_tokens = max(lengths) + MARGIN_TOKENS
        bodies = {"plain": client.body(max_tokens, None), "structured": client.body(max_tokens, schema)}
        await run_block(client, bodies["plain"], args.warmup, args.concurrency)
        print(
            f"  structured output: {min(lengths)}-{max(lengths)} tokens; max_tokens={max_tokens} for both",
            flush=True,
        )
        totals = {mode: [0, 0.0, 0] for mode in bodies}  # tokens, seconds, requests
        for _ in range(max(1, args.requests // args.block)):
            for mode, body in bodies.items():  # alternate blocks: the same conditions for both
                tokens, seconds = await run_block(client, body, args.block, args.concurrency)
                totals[mode][0] += tokens
                totals[mode][1] += seconds
                totals[mode][2] += args.block
        # Time to first token: a new schema each time against the one used all along (and,
        # for reference, a plain request).
        # Room to finish: a new schema's output may pick longer enum values than the warm-up's.
        new, cached, plain, room = [], [], [], 2 * max_tokens
        for k in range(args.schemas):
            tag = f"{os.getpid()}-{k}"
            seconds, text = await client.ttft(
                client.body(room, item_schema(args.items, tag, args.enum_values), stream=True)
            )
            check_output(text, args.items)
            new.append(seconds)
            seconds, text = await client.ttft(client.body(room, schema, stream=True))
            check_output(text, args.items)
            cached.append(seconds)
            seconds, _ = await client.ttft(client.body(max_tokens, None, stream=True))
            plain.append(seconds)
    finally:
        await client.close()
    return {
        "totals": totals,
        "max_tokens": max_tokens,
        "ttft_new": new,
        "ttft_cached": cached,
        "ttft_plain": plain,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> tuple[float, float]:
    totals = result["totals"]
    print(f"\nthroughput, concurrency {args.concurrency}, max_tokens {result['max_tokens']}:")
    print("| mode | requests | tokens/request | tokens/s |")
    print("|---|---|---|---|")
    tps = {}
    for mode, (tokens, seconds, requests) in totals.items():
        tps[mode] = tokens / seconds
        print(f"| {mode} | {requests} | {tokens / requests:.1f} | {tps[mode]:.1f} |")
    new, cached = pct(result["ttft_new"], 0.5), pct(result["ttft_cached"], 0.5)
    assert new is not None and cached is not None
    print(f"\ntime to first token, streamed, concurrency 1, {args.schemas} of each:")
    print("| schema | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|")
    print(f"| new (grammar compiled) | {new:.1f} | {pct(result['ttft_new'], 0.99):.1f} |")
    print(f"| cached | {cached:.1f} | {pct(result['ttft_cached'], 0.99):.1f} |")
    print(
        f"| none (plain request) | {pct(result['ttft_plain'], 0.5):.1f} | {pct(result['ttft_plain'], 0.99):.1f} |"
    )
    return tps["structured"] / tps["plain"], new / cached


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=120, help="measured requests per mode")
    parser.add_argument("--block", type=int, default=10, help="requests per alternating block")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (throughput)")
    parser.add_argument("--items", type=int, default=6, help="objects in the schema's array")
    parser.add_argument("--enum-values", type=int, default=4, help="colors per item (>= 4): schema size")
    parser.add_argument("--schemas", type=int, default=20, help="new and cached schemas each (first token)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up requests per mode")
    parser.add_argument("--quick", action="store_true", help="smoke run: --requests 20 --schemas 5")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.schemas = 20, 5

    with local_phiserve("structured-bench-") as phiserve:
        print(
            f"phiserve ready: {phiserve.base}; {args.requests} requests per mode in blocks of {args.block} "
            f"at concurrency {args.concurrency}, {args.items} items per output",
            flush=True,
        )
        result = asyncio.run(bench(Client(phiserve.base, phiserve.key), args))
    tps_ratio, ttft_ratio = report(result, args)
    print(
        f"\nRESULT structured json_schema_tps_ratio={tps_ratio:.3f} first_schema_ttft_ratio={ttft_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
