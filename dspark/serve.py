"""``dspark serve``: an OpenAI-compatible HTTP endpoint over any ``TargetBackend``.

Serves a target hosted by our backends (and is what the server-regeneration tests talk to):

    GET  /health                 200 once the target is loaded
    GET  /v1/models              the served model name
    POST /v1/chat/completions    {"messages": [...], "max_tokens", "temperature", "seed", "chat_template_kwargs", ...}
    POST /v1/completions         {"prompt": str | [token ids], ...}

Requests are answered by one worker thread that batches whatever is queued (up to ``max_batch`` rows of one
temperature) into ``TargetBackend.generate``; each row samples from its own seed, so an answer depends on its
request alone (``seed`` given: reproducible). As vLLM with ``"return_token_ids": true``, every choice carries
``token_ids`` (the generated ids, stop token included) and the response ``prompt_token_ids``. Only plain
temperature sampling is implemented: a request asking for top-p < 1, top-k > 0 or min-p > 0 gets a 400 naming
the field rather than silently other sampling. ``fail_first`` (testing) answers the first N requests with 503.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400."""


@dataclass
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] | None = None
    error: str | None = None


def _sampling(body: dict, default_max_tokens: int) -> tuple[int, float, int]:
    """(max_tokens, temperature, seed) of a request; unsupported sampling settings are a BadRequest."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    temperature = body.get("temperature", 1.0)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(f"temperature must be a number >= 0, got {temperature!r}")
    for name, neutral in (("top_p", lambda v: v >= 1), ("top_k", lambda v: v <= 0), ("min_p", lambda v: v <= 0)):
        if body.get(name) is not None and not neutral(body[name]):
            raise BadRequest(f"dspark serve samples with temperature only; {name}={body[name]!r} is not supported")
    if body.get("n", 1) != 1:
        raise BadRequest(f"dspark serve answers n=1 only, got n={body.get('n')!r}")
    seed = body.get("seed")
    if seed is None:
        seed = random.getrandbits(62)
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest(f"seed must be an int in [0, 2**63), got {seed!r}")
    return max_tokens, float(temperature), seed


class TargetServer:
    """The batching worker and the HTTP server around one target."""

    def __init__(self, target, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 default_max_tokens: int = 256, fail_first: int = 0):
        self.target, self.model_name = target, model_name
        self.max_batch, self.default_max_tokens = max_batch, default_max_tokens
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self._fail_left = fail_first
        self._fail_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.worker = threading.Thread(target=self._work, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.worker.start()
        self.httpd.serve_forever()

    def should_fail(self) -> bool:
        with self._fail_lock:
            if self._fail_left > 0:
                self._fail_left -= 1
                return True
            return False

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            by_temperature: dict[float, list[_Job]] = {}
            for job in batch:
                by_temperature.setdefault(job.temperature, []).append(job)
            for temperature, jobs in by_temperature.items():
                self._run(jobs, temperature)

    def _run(self, jobs: list[_Job], temperature: float) -> None:
        try:
            # seed None: each row's generator is seeded with its request's seed (dspark.targets.sampling)
            out = self.target.generate([j.prompt_ids for j in jobs], max_new_tokens=max(j.max_tokens for j in jobs),
                                       temperature=temperature, batch_size=len(jobs), seed=None,
                                       indices=[j.seed for j in jobs])
            for job, tokens in zip(jobs, out):
                job.tokens = tokens[: job.max_tokens]
        except Exception as exc:  # one failed batch fails its requests with 500; the server keeps serving
            for job in jobs:
                job.error = f"{type(exc).__name__}: {exc}"
        for job in jobs:
            job.done.set()

    def complete(self, prompt_ids: list[int], body: dict) -> tuple[list[int], str]:
        """Generate for one request; returns (token ids, finish_reason)."""
        max_tokens, temperature, seed = _sampling(body, self.default_max_tokens)
        job = _Job(prompt_ids, max_tokens, temperature, seed)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(job.error)
        eos = self.target.tokenizer.eos_token_id
        finish = "stop" if job.tokens and job.tokens[-1] == eos else "length"
        return job.tokens, finish

    def chat_prompt_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with string content")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest(f"chat_template_kwargs must be an object, got {kwargs!r:.60}")
        tok = self.target.tokenizer
        if not getattr(tok, "chat_template", None):
            raise BadRequest("the served tokenizer has no chat template: use /v1/completions")
        encoded = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                          add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
        return list(encoded["input_ids"])

    def completion_prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            return list(self.target.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            return prompt
        raise BadRequest("prompt must be a non-empty string or a list of token ids")


def _handler(server: TargetServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # one line per request would drown the regeneration's own output
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if server.should_fail():
                return self._send(503, {"error": {"message": "injected failure (--fail-first)"}})
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                chat = self.path == "/v1/chat/completions"
                prompt = server.chat_prompt_ids(body) if chat else server.completion_prompt_ids(body)
                tokens, finish = server.complete(prompt, body)
            except (BadRequest, json.JSONDecodeError) as exc:
                return self._send(400, {"error": {"message": str(exc), "type": "BadRequestError"}})
            except Exception as exc:
                return self._send(500, {"error": {"message": str(exc), "type": "InternalServerError"}})
            text = server.target.tokenizer.decode(tokens, skip_special_tokens=True)
            choice = {"index": 0, "finish_reason": finish, "token_ids": tokens}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            self._send(200, {
                "id": f"cmpl-{time.monotonic_ns()}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": server.model_name, "choices": [choice],
                "prompt_token_ids": prompt,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(prompt) + len(tokens)},
            })

    return Handler
