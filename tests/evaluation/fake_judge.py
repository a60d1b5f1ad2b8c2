"""FakeJudgeServer -- a TEST FIXTURE, not a judge: an OpenAI-compatible /v1/chat/completions on
127.0.0.1 that answers alpaca-eval's AlpacaEval 2 judge prompt the way GPT-4 Turbo's API does
(one token "m" or "M" with `logprobs.content[0].top_logprobs`). Its rule is fixed and known:
the LONGER output wins with probability 0.8. It records every request (model, auth header)
so tests can check what crossed the wire."""
from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def longer_is_first(prompt: str) -> bool:
    """alpaca-eval's clf template shows the two outputs as JSON-ish blocks of triple-quoted text."""
    outs = re.findall(r'"(?:output|answer)": """(.*?)"""', prompt, flags=re.S)
    return len(outs) == 2 and len(outs[0]) >= len(outs[1])


class FakeJudgeServer:
    def __init__(self, p_win: float = 0.8):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"model": req.get("model"), "auth": self.headers.get("Authorization"),
                                        "logprobs": req.get("logprobs")})
                first = longer_is_first("\n".join(m["content"] for m in req["messages"]))
                win, lose = math.log(p_win), math.log(1 - p_win)
                lm, lM = (win, lose) if first else (lose, win)
                tok = "m" if first else "M"
                body = {"id": "fake", "object": "chat.completion", "created": int(time.time()), "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": tok},
                                     "logprobs": {"content": [{
                                         "token": tok, "logprob": max(lm, lM), "bytes": list(tok.encode()),
                                         "top_logprobs": [{"token": "m", "logprob": lm, "bytes": [109]},
                                                          {"token": "M", "logprob": lM, "bytes": [77]}]}]}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
