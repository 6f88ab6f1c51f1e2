"""What streaming costs `serve` on its generation thread: 32 streams of a 2,000-token answer, with
the whole answer decoded again at every token (the streamer before incremental detokenization,
kept here as `FullDecoding`) against `infer.detokenize.RowText`, in the same run.

1. The streamer alone: the tokens of 32 real answers (alpaca_en_demo outputs and wiki_demo text,
   Qwen3 tokenizer) fed to it round by round, as generate() hands them over.
2. End to end: `HFEngine` generating 2,000 tokens for 32 streaming requests at once with a tiny
   random model that has Qwen3's vocabulary (its compute is small, so the streamer's cost shows),
   before (RowText replaced by FullDecoding) and after.
Both check that the text streamed is the same before and after."""

from __future__ import annotations

import asyncio
import json
import time

from common import SHARED, record, table, versions

STREAMS = 32
TOKENS = 2000
STOPS = ["\nUser:", "</answer>"]   # the usual kind: never in these answers, so every token is searched


class FullDecoding:
    """The streamer before: the whole answer decoded, searched for stops and cut at every token."""

    def __init__(self, tokenizer, lead: str = "", stops=()):
        self.tokenizer, self.lead, self.stops = tokenizer, lead, list(stops)
        self.tokens: list[int] = []
        self.sent = ""

    def text(self) -> str:
        from lmforge.shared.infer.detokenize import visible

        return visible(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.lead)

    def streamed(self) -> str:
        return self.sent

    def add(self, token: int, last: bool = False):
        from lmforge.shared.infer.detokenize import first_stop, safe_prefix

        self.tokens.append(token)
        text = self.text()
        cut = first_stop(text, self.stops)
        if cut is not None:
            text = text[:cut]
        safe = text if cut is not None or last else safe_prefix(text, self.stops)
        piece = ""
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            piece, self.sent = safe[len(self.sent):], safe
        return piece, cut is not None


def answers(tokenizer) -> list[list[int]]:
    """32 different 2,000-token stretches of real text."""
    rows = json.loads((SHARED / "data" / "llamafactory" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    text = "\n\n".join(r["output"] for r in rows) + (SHARED / "data" / "llamafactory" / "wiki_demo.txt").read_text(
        encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    step = (len(ids) - TOKENS) // STREAMS
    return [ids[i * step:i * step + TOKENS] for i in range(STREAMS)]


def streamer_alone(tokenizer, rows: list[list[int]], kind) -> dict:
    """Feed the rows to `kind` round by round -> CPU seconds (this thread's: other programs on the
    machine do not count), per-round cost early and late, the text."""
    streams = [kind(tokenizer, " ", STOPS) for _ in rows]
    texts = [[] for _ in rows]
    rounds: list[float] = []
    start = time.thread_time()
    for step in range(TOKENS):
        t = time.thread_time()
        for r, row in enumerate(streams):
            piece, _ = row.add(rows[r][step], last=step == TOKENS - 1)
            texts[r].append(piece)
        rounds.append(time.thread_time() - t)
    return {"seconds": time.thread_time() - start, "first": sum(rounds[:100]) / 100 * 1e3,
            "last": sum(rounds[-100:]) / 100 * 1e3, "texts": ["".join(t) for t in texts]}


def tiny_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def timed(kind):
    """`kind` with the CPU time its add() takes on the generation thread summed up (in `spent`)."""

    class Timed(kind):
        spent = [0.0]

        def add(self, token, last=False):
            start = time.thread_time()
            try:
                return super().add(token, last)
            finally:
                self.spent[0] += time.thread_time() - start

    return Timed


def end_to_end(model, tokenizer, kind, tokens: int = TOKENS) -> dict:
    """32 streaming requests generated at once by HFEngine -> the generation thread's CPU seconds
    (torch on one thread, so the model's work is there too) and the streamer's share of them,
    tokens, the streamed texts. CPU times, unlike the wall clock, leave out other programs sharing
    the machine."""
    from lmforge.shared.infer import engines

    saved, engines.RowText = engines.RowText, timed(kind)
    try:
        engine = engines.HFEngine(model, tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")], max_batch=STREAMS)
        run, spent = engine._run, [0.0]

        def timed_run(jobs):
            start = time.thread_time()
            try:
                return run(jobs)
            finally:
                spent[0] += time.thread_time() - start

        engine._run = timed_run

        async def one(i: int) -> tuple[str, int]:
            prompt = tokenizer(f"Tell story number {i}.", add_special_tokens=False).input_ids
            job = engines.Job(prompt_ids=prompt, max_tokens=tokens, temperature=0, stop=STOPS)
            pieces, made = [], 0
            async for event in engine.generate(job):
                if event.get("done"):
                    made = event["choices"][0]["completion_tokens"]
                else:
                    pieces.append(event["text"])
            return "".join(pieces), made

        async def all_of():
            return await asyncio.gather(*(one(i) for i in range(STREAMS)))

        start = time.perf_counter()
        results = asyncio.run(all_of())
        return {"seconds": time.perf_counter() - start, "thread": spent[0], "streamer": engines.RowText.spent[0],
                "tokens": sum(t for _, t in results), "texts": [t for t, _ in results]}
    finally:
        engines.RowText = saved


def main() -> None:
    import torch
    from lmforge.shared.infer.detokenize import RowText
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "qwen3"))
    rows = answers(tokenizer)
    before, after = streamer_alone(tokenizer, rows, FullDecoding), streamer_alone(tokenizer, rows, RowText)
    assert before["texts"] == after["texts"], "the incremental streamer streamed other text"
    model = tiny_model(tokenizer)
    torch.set_num_threads(1)
    with torch.no_grad():
        end_to_end(model, tokenizer, RowText, tokens=100)   # warm-up: the first generate() is slower
        e2e_before = end_to_end(model, tokenizer, FullDecoding)
        e2e_after = end_to_end(model, tokenizer, RowText)
    assert e2e_before["texts"] == e2e_after["texts"], "the engine streamed other text"
    body = table(["32 streams x 2,000 tokens", "whole answer decoded per token (before)", "incremental (after)",
                  "speed-up"],
                 [["streamer alone: CPU time in all (s)", f"{before['seconds']:.2f}", f"{after['seconds']:.2f}",
                   f"{before['seconds'] / after['seconds']:.0f}x"],
                  ["streamer alone: CPU ms per round of 32 tokens, rounds 1-100", f"{before['first']:.2f}",
                   f"{after['first']:.2f}", ""],
                  ["streamer alone: CPU ms per round of 32 tokens, rounds 1901-2000", f"{before['last']:.2f}",
                   f"{after['last']:.2f}", f"{before['last'] / after['last']:.0f}x"],
                  ["HFEngine end to end: the streamer's CPU time on the generation thread (s)",
                   f"{e2e_before['streamer']:.2f}", f"{e2e_after['streamer']:.2f}",
                   f"{e2e_before['streamer'] / e2e_after['streamer']:.0f}x"],
                  ["HFEngine end to end: the generation thread's CPU time, model included (s)",
                   f"{e2e_before['thread']:.1f}", f"{e2e_after['thread']:.1f}",
                   f"{e2e_before['thread'] / e2e_after['thread']:.2f}x"],
                  ["HFEngine end to end: tokens per CPU second of the generation thread",
                   f"{e2e_before['tokens'] / e2e_before['thread']:.0f}",
                   f"{e2e_after['tokens'] / e2e_after['thread']:.0f}", ""]])
    chars = sum(len(t) for t in after["texts"]) // STREAMS
    body += (f"\n\nThe streamer alone: 32 real answers of {TOKENS:,} tokens (about {chars:,} characters each; "
             f"alpaca_en_demo outputs and wiki_demo text, Qwen3 tokenizer), stop strings {STOPS} that never "
             f"match, fed round by round as generate() hands tokens over. Before, a round's cost grows with "
             f"the answers' length (quadratic in all); after, it stays flat. End to end: `HFEngine` with a "
             f"random 2-layer model of hidden size 64 and Qwen3's vocabulary ({len(tokenizer):,} tokens), "
             f"{STREAMS} greedy requests of max_tokens {TOKENS:,} in one batch, {e2e_after['tokens']:,} tokens "
             f"generated in all, torch on one thread; CPU times are the measure (the wall clock also counted "
             f"other programs on this shared machine). Both streamed exactly the same text before and after. "
             f"{versions('torch', 'transformers', 'tokenizers')}.")
    record("stream", "serve streaming: the streamer's cost at 32 streams x 2,000 tokens, before and after "
                     "incremental detokenization", "python tests/bench/run.py bench_stream", body)


if __name__ == "__main__":
    main()
