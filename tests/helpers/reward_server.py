"""Fake Flow-GRPO-protocol reward servers on 127.0.0.1 (an http.server thread) for the `remote:<url>` reward and
`python -m common.tools.geneval`: each unpickles the request {"images": [JPEG], "prompts", "meta_datas",
"only_strict"}, logs it and what it answered.

    FakeRewardServer()             -> {key: mean pixel / 255 + len(prompt) per image}; HTTP errors, delays on demand
    FakeRewardServer(answer=geneval_answer)   -> GenEval's answer format (yifan123/reward-server app_geneval.py)
"""

import hashlib
import http.server
import io
import pickle
import threading
import time

import numpy as np
from PIL import Image

# gen_eval.py `compute_geneval`'s required_keys: every answer's group fields hold each of them
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_answer(data, start):
    """The answer of GenEval's server (app_geneval.py `inference`: the five lists of gen_eval.py `compute_geneval`)
    to `data`, whose first image is the server's image number `start`. Verdicts are made up from the image number n,
    so that they differ between images and tags: strict pass (exact counts) when n % 3 == 0, GenEval's (looser)
    correct when n % 3 != 2 - a strict pass is also correct -, 0 when only_strict as the real server answers; the
    partial credit is (n % 5) / 4 plus a hash of the JPEG bytes / 1e6 (so it depends on the image sent). Group
    fields: per tag, each image's verdict where the image has that tag, -10.0 elsewhere."""
    out = {"scores": [], "rewards": [], "strict_rewards": [], "group_rewards": {t: [] for t in GENEVAL_TAGS},
           "group_strict_rewards": {t: [] for t in GENEVAL_TAGS}}
    for n, (jpeg, meta) in enumerate(zip(data["images"], data["meta_datas"]), start):
        strict, correct = float(n % 3 == 0), 0.0 if data["only_strict"] else float(n % 3 != 2)
        out["scores"].append((n % 5) / 4 + int(hashlib.sha256(jpeg).hexdigest()[:4], 16) / 1e6)
        out["rewards"].append(correct)
        out["strict_rewards"].append(strict)
        for t in GENEVAL_TAGS:
            out["group_rewards"][t].append(correct if t == meta["tag"] else -10.0)
            out["group_strict_rewards"][t].append(strict if t == meta["tag"] else -10.0)
    return out


class FakeRewardServer:
    """A Flow-GRPO-protocol reward server on 127.0.0.1 (`url`). By default it scores each image as mean pixel value /
    255 + len(prompt) and answers {key: scores, "rewards": zeros} pickled; `answer(data, start)` (e.g.
    `geneval_answer`) replaces that, `start` being the number of images answered before. The first `fail_first`
    requests answer HTTP `fail_code` with a traceback-like body; each waits `delay` seconds first. Logged: `requests`
    (unpickled), `paths` (the request paths), `answers` (the dicts sent back), `scores` (all scores, in order)."""

    def __init__(self, key="scores", fail_first=0, delay=0.0, fail_code=500, answer=None):
        self.key, self.fail_first, self.delay, self.fail_code, self.answer = key, fail_first, delay, fail_code, answer
        self.requests, self.paths, self.answers, self.scores = [], [], [], []
        self.lock, server = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(data)
                    server.paths.append(self.path)
                    failed = len(server.requests) <= server.fail_first
                time.sleep(server.delay)
                with server.lock:
                    if failed:
                        body, code = b"Traceback (most recent call last):\nKeyError: 'tag'\n", server.fail_code
                    else:
                        answer = server.compute(data)
                        server.answers.append(answer)
                        server.scores += answer.get("scores", answer.get(server.key, []))
                        body, code = pickle.dumps(answer), 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()  # quick to shut down

    def compute(self, data):
        if self.answer is not None:
            return self.answer(data, len(self.scores))
        scores = [float(np.asarray(Image.open(io.BytesIO(j))).mean() / 255 + len(p))
                  for j, p in zip(data["images"], data["prompts"])]
        return {self.key: scores, "rewards": [0.0] * len(scores)}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
