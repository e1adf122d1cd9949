"""Regeneration through OpenAI-compatible servers (vLLM, SGLang, ``dspark serve``).

A target served by an engine (a V4-class model cannot be regenerated in-process on a training node) answers the
training prompts over HTTP. Every server first passes a health probe; then ``server_max_in_flight`` worker
threads per server take prompts from one shared queue (a faster server takes more) and post them with
``requests``: a per-request timeout, retries with exponential backoff on connection errors, timeouts, 429 and
5xx, and an immediate failure on other 4xx. The main thread writes the answers in prompt order as the prefix
completes (``dspark.data.output.ResumableJsonl``), so a kill at any point loses nothing on rerun. Prompts that fail
for good go, in order, to ``train.errors.jsonl`` with their reason; so do answers dropped by
``length_policy=drop``. Rows come from the returned token ids when the server gives them (vLLM and ``dspark
serve`` with ``return_token_ids``), else from re-tokenising the text (exact for most BPE vocabularies, not all).

Sampling parameters go at the top level of the request body, where both vLLM and SGLang read them (``top_k``,
``min_p`` and ``chat_template_kwargs`` are their extensions of the OpenAI schema). Each request carries the seed
``prompt_seed(seed, index)``: a server that honours per-request seeds gives the same answers on a rerun.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dspark.config import LengthPolicy, Thinking, choices
from dspark.data.regenerate import conversation_row, unit_id
from dspark.targets.sampling import prompt_seed

LENGTH_POLICIES = choices(LengthPolicy)
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class RetryableError(RuntimeError):
    """A failure worth another try: connection refused or reset, timeout, 429, 5xx."""


@dataclass(kw_only=True)
class ServerOptions:
    urls: list[str]
    endpoint: str = "chat"
    model: str = ""
    max_in_flight: int = 8
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 0.5  # first retry delay; doubles up to 30 s
    max_new_tokens: int = 192
    max_seq_len: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int = 0
    thinking: str = "default"
    length_policy: str = "keep"
    samples_per_prompt: int = 1  # answers per prompt; unit u = prompt u // S, seeded by (seed, u)

    @classmethod
    def from_config(cls, data) -> "ServerOptions":
        return cls(urls=list(data.servers), endpoint=data.server_endpoint, model=data.server_model,
                   max_in_flight=data.server_max_in_flight, timeout_s=data.server_timeout_s,
                   max_retries=data.server_max_retries, max_new_tokens=data.max_new_tokens,
                   max_seq_len=data.max_seq_len, temperature=data.regen_temperature, top_p=data.top_p,
                   top_k=data.top_k, min_p=data.min_p, seed=data.seed, thinking=data.thinking,
                   length_policy=data.length_policy, samples_per_prompt=data.samples_per_prompt)

    def validate(self) -> None:
        if not self.urls:
            raise ValueError("server regeneration needs at least one server URL (--server http://host:port)")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"data.server_endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.length_policy not in LENGTH_POLICIES:
            raise ValueError(f"data.length_policy must be one of {', '.join(LENGTH_POLICIES)}, "
                             f"got {self.length_policy!r}")
        if self.thinking not in choices(Thinking):
            raise ValueError(f"data.thinking must be default, on or off, got {self.thinking!r}")
        for name in ("max_in_flight", "max_new_tokens", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError(f"server_timeout_s must be > 0 and server_max_retries >= 0, got {self.timeout_s} and "
                             f"{self.max_retries}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.samples_per_prompt < 1 or (self.samples_per_prompt > 1 and self.temperature == 0):
            raise ValueError(f"samples_per_prompt must be >= 1, and 1 at temperature 0 (greedy answers are "
                             f"identical), got {self.samples_per_prompt} at temperature {self.temperature:g}")

    def settings(self) -> dict:
        """What changes the answers (URLs and concurrency do not)."""
        return {"source": "server", "endpoint": self.endpoint, "model": self.model, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens, "max_seq_len": self.max_seq_len, "thinking": self.thinking,
                "length_policy": self.length_policy,
                **({"samples_per_prompt": self.samples_per_prompt} if self.samples_per_prompt != 1 else {})}


def _session():
    import requests

    session = requests.Session()
    session.headers["Content-Type"] = "application/json"
    return session


def probe(url: str, timeout_s: float = 10.0) -> list[str]:
    """Health probe of one server; returns the model ids it serves. Raises ValueError with one line if down."""
    import requests

    session = _session()
    try:
        health = session.get(f"{url}/health", timeout=timeout_s)
        models = session.get(f"{url}/v1/models", timeout=timeout_s)
    except requests.RequestException as exc:
        raise ValueError(f"server {url} is not reachable ({type(exc).__name__}); start it or fix --server") from None
    if health.status_code != 200 or models.status_code != 200:
        raise ValueError(f"server {url} is not healthy (/health {health.status_code}, /v1/models "
                         f"{models.status_code})")
    return [m["id"] for m in models.json().get("data", [])]


def request_body(opts: ServerOptions, model: str, prompt, seed: int) -> dict:
    """The JSON body of one request, as vLLM and SGLang read it; ``prompt`` = messages (chat) or token ids."""
    body = {"model": model, "max_tokens": opts.max_new_tokens, "temperature": opts.temperature, "seed": seed,
            "top_p": opts.top_p, "return_token_ids": True}
    if opts.top_k > 0:
        body["top_k"] = opts.top_k
    if opts.min_p > 0:
        body["min_p"] = opts.min_p
    if opts.endpoint == "chat":
        body["messages"] = prompt
        if opts.thinking != "default":
            body["chat_template_kwargs"] = {"enable_thinking": opts.thinking == "on"}
    else:
        body["prompt"] = prompt
    return body


def post_with_retries(session, url: str, body: dict, opts: ServerOptions, stop: threading.Event) -> dict:
    """POST ``body``; retry what is retryable with backoff; raise RuntimeError with the reason when it fails for
    good."""
    import requests

    delay, last = opts.backoff_s, ""
    for attempt in range(opts.max_retries + 1):
        if stop.is_set():
            raise RuntimeError("stopped")
        try:
            response = session.post(url, json=body, timeout=opts.timeout_s)
        except requests.Timeout:
            last = f"timeout after {opts.timeout_s:g} s"
        except requests.ConnectionError as exc:
            last = f"connection error ({type(exc).__name__})"
        else:
            if response.status_code == 200:
                return response.json()
            text = response.text[:200].replace("\n", " ")
            last = f"HTTP {response.status_code}: {text}"
            if response.status_code != 429 and response.status_code < 500:
                raise RuntimeError(last)  # the request itself is wrong: retrying cannot help
        if attempt < opts.max_retries:
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    raise RuntimeError(f"gave up after {opts.max_retries + 1} attempts; last: {last}")


def answer_ids(tokenizer, response: dict) -> tuple[list[int], str]:
    """(generated ids with the stop token when it stopped, finish_reason) of a response."""
    choice = response["choices"][0]
    finish = choice.get("finish_reason") or "stop"
    ids = choice.get("token_ids")
    if ids is None:  # a server without token ids: re-tokenise the text, add the stop token it stripped
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if finish == "stop" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return list(ids), finish


class _Dispatcher:
    """Shared work queue + completed results, with a bound on how far ahead of the write cursor work may run."""

    def __init__(self, todo: list[int], window: int):
        self.todo, self.next, self.window = todo, 0, window
        self.results: dict[int, tuple[str, object]] = {}
        self.written = 0  # position in ``todo`` of the next result to write
        self.cond = threading.Condition()

    def take(self, stop: threading.Event) -> int | None:
        with self.cond:
            while self.next < len(self.todo) and self.next - self.written >= self.window and not stop.is_set():
                self.cond.wait(0.5)
            if self.next >= len(self.todo) or stop.is_set():
                return None
            self.next += 1
            return self.next - 1

    def put(self, pos: int, result) -> None:
        with self.cond:
            self.results[pos] = result
            self.cond.notify_all()


def regenerate_with_servers(tokenizer, prompts: list[str], prefixes: list[list[int]], keep: list[int], output,
                            errors, opts: ServerOptions, progress: bool = False) -> dict:
    """Answer the kept prompts not yet settled in ``output``/``errors`` through the servers; returns counts."""
    from tqdm import tqdm

    S = opts.samples_per_prompt
    settled = {r["id"] for r in output.rows} | {r["id"] for r in errors.rows}
    todo = [u for u in (i * S + k for i in keep for k in range(S)) if unit_id(u, S) not in settled]
    model = served_model(opts)
    stop = threading.Event()
    dispatcher = _Dispatcher(todo, window=4 * opts.max_in_flight * len(opts.urls))

    def work(url: str) -> None:
        session = _session()
        endpoint = url.rstrip("/") + ENDPOINTS[opts.endpoint]
        while (pos := dispatcher.take(stop)) is not None:
            u = todo[pos]
            i = u // S
            prompt = [{"role": "user", "content": prompts[i]}] if opts.endpoint == "chat" else prefixes[i]
            try:
                response = post_with_retries(session, endpoint, request_body(opts, model, prompt,
                                                                             prompt_seed(opts.seed, u)), opts, stop)
                dispatcher.put(pos, ("ok", answer_ids(tokenizer, response)))
            except Exception as exc:  # recorded in the error file, never lost
                dispatcher.put(pos, ("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    threads = [threading.Thread(target=work, args=(url,), daemon=True)
               for url in opts.urls for _ in range(opts.max_in_flight)]
    for t in threads:
        t.start()
    counts = {"written": 0, "failed": 0, "dropped": 0, "truncated": 0}
    bar = tqdm(total=len(todo), desc="regenerate (server)", disable=not progress, unit="prompt")
    try:
        while dispatcher.written < len(todo):
            with dispatcher.cond:
                while dispatcher.written not in dispatcher.results:
                    dispatcher.cond.wait(0.5)
                ready = []
                while dispatcher.written in dispatcher.results:
                    ready.append((todo[dispatcher.written], dispatcher.results.pop(dispatcher.written)))
                    dispatcher.written += 1
                dispatcher.cond.notify_all()
            _write_ready(tokenizer, prompts, prefixes, ready, output, errors, opts, counts)
            bar.update(len(ready))
    finally:
        stop.set()
        bar.close()
        for t in threads:
            t.join(timeout=opts.timeout_s + 5)
    return counts


def served_model(opts: ServerOptions) -> str:
    """The model every server must serve (``opts.model``, or the first one the first server lists)."""
    models = {url: probe(url) for url in opts.urls}
    model = opts.model or next(iter(models.values()))[0]
    for url, served in models.items():
        if model not in served:
            raise ValueError(f"server {url} does not serve model {model!r} (it serves {', '.join(served) or 'none'})")
    return model


class ServerGenerate:
    """The servers as a ``dspark.data.grow`` generator: a list of chat requests posted concurrently
    (``max_in_flight`` per server), each seeded with its own seed; returns (ids, finish_reason) or the failure."""

    def __init__(self, tokenizer, opts: ServerOptions, model: str):
        from concurrent.futures import ThreadPoolExecutor

        self.tokenizer, self.opts, self.model = tokenizer, opts, model
        self.pool = ThreadPoolExecutor(max_workers=opts.max_in_flight * len(opts.urls))
        self.local = threading.local()
        self.lock, self.threads = threading.Lock(), 0
        self.stop = threading.Event()

    def _endpoint_and_session(self):
        if not hasattr(self.local, "session"):  # each worker thread keeps one server and one connection
            with self.lock:
                url, self.threads = self.opts.urls[self.threads % len(self.opts.urls)], self.threads + 1
            self.local.session = _session()
            self.local.endpoint = url.rstrip("/") + ENDPOINTS[self.opts.endpoint]
        return self.local.endpoint, self.local.session

    def _one(self, request: list[dict], prefix: list[int] | None, seed: int, opts: ServerOptions):
        endpoint, session = self._endpoint_and_session()
        prompt = request if opts.endpoint == "chat" else prefix
        try:
            response = post_with_retries(session, endpoint, request_body(opts, self.model, prompt, seed), opts,
                                         self.stop)
            return answer_ids(self.tokenizer, response)
        except Exception as exc:  # the caller records the reason; nothing is lost
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def __call__(self, requests: list[list[dict]], seeds: list[int], max_new_tokens: int | None = None,
                 prefixes: list[list[int]] | None = None) -> list:
        from dataclasses import replace

        from dspark.data.multiturn import render_ids

        opts = replace(self.opts, max_new_tokens=max_new_tokens or self.opts.max_new_tokens)
        if opts.endpoint == "completions" and prefixes is None:
            prefixes = [render_ids(self.tokenizer, r, generation_prompt=True) for r in requests]
        futures = [self.pool.submit(self._one, r, None if prefixes is None else prefixes[k], seed, opts)
                   for k, (r, seed) in enumerate(zip(requests, seeds))]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)


def regenerate_turns_with_servers(tokenizer, turns: list[list[str]], keep: list[int], output, errors,
                                  opts: ServerOptions, followups: int = 0, progress: bool = False) -> dict:
    """Multi-turn conversations through the servers, turn by turn (``dspark.data.multiturn.regenerate_turns``:
    each request carries the regenerated history and the seed in-process regeneration uses), in chunks of
    conversations written in order; returns counts. A chunk writes its failures, then its rows, each fsynced: a
    kill between the two leaves the rows unsettled, so a rerun regenerates them and the rows stay in order."""
    from tqdm import tqdm

    from dspark.data.multiturn import regenerate_turns

    settled = {r["id"] for r in output.rows} | {r["id"] for r in errors.rows}
    todo = [c for c in keep if unit_id(c) not in settled]
    gen = ServerGenerate(tokenizer, opts, served_model(opts))
    chunk = 4 * opts.max_in_flight * len(opts.urls)
    counts = {"written": 0, "failed": 0, "dropped": 0, "truncated": 0}
    try:
        for lo in tqdm(range(0, len(todo), chunk), desc="regenerate turns (server)", disable=not progress,
                       unit="chunk"):
            units = todo[lo : lo + chunk]
            rows, failed = regenerate_turns(gen, tokenizer, turns, units, seed=opts.seed,
                                            max_seq_len=opts.max_seq_len, followups=followups,
                                            length_policy=opts.length_policy)
            errors.append([{"id": unit_id(c), "prompt": turns[c][0], "reason": failed[c]} for c in units
                           if c in failed])
            output.append(rows)
            counts["written"] += len(rows)
            counts["dropped"] += sum(reason.startswith("dropped") for reason in failed.values())
            counts["failed"] += sum(not reason.startswith("dropped") for reason in failed.values())
            counts["truncated"] += sum(bool(r.get("truncated")) for r in rows)
    finally:
        gen.close()
    return counts


def _write_ready(tokenizer, prompts, prefixes, ready, output, errors, opts: ServerOptions, counts: dict) -> None:
    """Append the in-order results: rows to ``output``, failures and drops to ``errors`` (each file fsynced in
    prompt order, so every prompt up to the last one written in either file is settled)."""
    for u, (kind, value) in ready:
        row_id, i = unit_id(u, opts.samples_per_prompt), u // opts.samples_per_prompt
        if kind == "failed":
            errors.append([{"id": row_id, "prompt": prompts[i], "reason": value}])
            counts["failed"] += 1
            continue
        ids, finish = value
        if finish == "length" and opts.length_policy == "drop":
            errors.append([{"id": row_id, "prompt": prompts[i], "reason": "dropped: finish_reason=length"}])
            counts["dropped"] += 1
            continue
        row = conversation_row(tokenizer, row_id, prompts[i], prefixes[i], ids, opts.max_seq_len)
        if finish == "length":
            counts["truncated"] += 1
            if opts.length_policy == "mark":
                row["truncated"] = True
        output.append([row])
        counts["written"] += 1


def load_tokenizer(name_or_path: str):
    """The target's tokenizer alone (server regeneration never loads the weights)."""
    from transformers import AutoTokenizer

    from dspark.targets.source import resolve_target_source

    source, gguf_file, _ = resolve_target_source(name_or_path)
    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def wait_for(url: str, timeout_s: float) -> None:
    """Poll ``url``'s health until it answers (for scripts and tests that start a server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            probe(url, timeout_s=2.0)
            return
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
