"""A reward computed by a Flow-GRPO reward server over HTTP (`--reward remote:<url>`)."""

import io
import pickle
import socket
import urllib.error
import urllib.parse
import urllib.request
from time import sleep

import numpy as np
import torch
from PIL import Image

from common.rewards import to_uint8


def check_server(url, timeout=10.0):
    """ConnectionError (one line) unless something listens at the reward server's host and port."""
    u = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"reward server {url} is down or unreachable: {e}") from None


# a reward server URL's query options (`remote_server`) -> their type; the RemoteReward arguments they set
REMOTE_OPTIONS = {"retries": int, "timeout": float, "backoff": float}


def remote_server(name, where=None):
    """'remote:http://host:port/path?retries=5&timeout=60&backoff=2' (or the URL alone) -> (the URL requests go to,
    without the query; {option: value} for common.reward_models.RemoteReward: retries (more tries after a failed
    one), timeout (seconds a request waits), backoff (seconds before the first retry, doubling at each)). ValueError
    (one line, starting with `where`, default "reward '<name>'") naming a bad URL, an unknown option or a bad value."""
    where = where or f"reward {name!r}"
    try:
        u = urllib.parse.urlsplit(name.removeprefix("remote:"))
        ok = u.scheme in ("http", "https") and u.hostname and (u.port or True)
    except ValueError:  # e.g. a port that is not a number
        ok = False
    if not ok:
        raise ValueError(f"{where} needs the http(s) URL of a reward server, e.g. "
                         f"{'remote:' * name.startswith('remote:')}http://127.0.0.1:18085")
    options = {}
    for key, value in urllib.parse.parse_qsl(u.query, keep_blank_values=True):
        if key not in REMOTE_OPTIONS:
            raise ValueError(f"{where}: unknown option {key!r}; choose from: {', '.join(REMOTE_OPTIONS)}")
        try:
            v = options[key] = REMOTE_OPTIONS[key](value)
        except ValueError:
            v = float("nan")
        if not np.isfinite(v) or v < 0 or (key == "timeout" and v == 0):
            kind = {"retries": "a whole number >= 0", "timeout": "a number > 0"}.get(key, "a number >= 0")
            raise ValueError(f"{where}: option {key}={value!r} must be {kind}")
    return urllib.parse.urlunsplit(u._replace(query="")), options


class RemoteReward:
    """A Flow-GRPO reward server (yifan123/reward-server: GenEval, DeQA; UnifiedReward behind the same protocol):
    one HTTP POST per `batch_size` images of a pickled dict {"images": [JPEG bytes], "prompts": [str],
    "meta_datas": [dict], "only_strict": bool}; the answer is a pickled dict whose "scores" (GenEval: partial credit)
    or "outputs" (DeQA, UnifiedReward) hold one number per image. Metadata a prompt lacks is sent as {"prompt": ...};
    GenEval needs its own (a GenEval prompts file's JSON lines). `only_strict` True (training, as Flow-GRPO's
    training loop) lets the GenEval server skip GenEval's own `correct` check ("rewards" all 0); the evaluation
    (common.tools.geneval) sends False. Each request waits `timeout` seconds; a refused, reset or timed-out request
    and an HTTP 5xx answer are tried `retries` more time(s), `backoff` seconds after the first failure, doubling after
    each (at most 120 s, urllib3's cap; Flow-GRPO's client retries HTTP 500 up to 1000 times, factor 1 s); an HTTP 4xx
    answer is not retried. A server not listening fails at construction. The answer is unpickled: trusted servers only
    (as in Flow-GRPO)."""

    def __init__(self, url, batch_size=64, timeout=120.0, retries=1, backoff=1.0, only_strict=True):
        self.url, self.batch_size, self.timeout, self.retries = url, batch_size, timeout, retries
        self.backoff, self.only_strict = backoff, only_strict
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # servers sit next to the GPUs
        check_server(url, min(timeout, 10))

    def post(self, body):
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, body, {"Content-Type": "application/octet-stream"})
                with self.opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:  # the server's traceback: its last line says what went wrong
                err = f"answered HTTP {e.code}: {(e.read().decode(errors='replace').strip().splitlines() or [''])[-1]}"
                if e.code < 500:  # the request itself is wrong: sending it again cannot help
                    raise ConnectionError(f"reward server {self.url} {err} (not retried: a client error)") from None
            except OSError as e:  # refused, reset, timed out (URLError is an OSError)
                err = f"is down or unreachable: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                sleep(min(self.backoff * 2 ** attempt, 120.0))
        raise ConnectionError(f"reward server {self.url} {err} ({self.retries + 1} tries, backoff {self.backoff:g} s "
                              f"doubling, timeout {self.timeout:g} s)")

    def answers(self, images, prompts, metadata=None):
        """Yields (number of images, the server's unpickled answer) for each batch of `batch_size` images, in order."""
        prompts = list(prompts)
        metadata = [m if m is not None else {"prompt": p} for p, m in zip(prompts, metadata or [None] * len(prompts))]
        arrays = to_uint8(images)
        for i in range(0, len(prompts), self.batch_size):
            jpegs = []
            for a in arrays[i:i + self.batch_size]:
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="JPEG")  # PIL's default quality 75, as Flow-GRPO's client
                jpegs.append(buf.getvalue())
            yield len(jpegs), pickle.loads(self.post(pickle.dumps({
                "images": jpegs, "prompts": prompts[i:i + self.batch_size],
                "meta_datas": metadata[i:i + self.batch_size], "only_strict": self.only_strict})))

    def __call__(self, images, prompts, metadata=None):
        scores = []
        for n, answer in self.answers(images, prompts, metadata):
            values = next((answer[k] for k in ("scores", "outputs") if k in answer), None) \
                if isinstance(answer, dict) else None
            if values is None or len(values) != n:
                raise ValueError(f"reward server {self.url} answered {type(answer).__name__} "
                                 f"{sorted(answer) if isinstance(answer, dict) else ''}; expected a dict with 'scores' "
                                 f"or 'outputs' holding {n} numbers")
            scores += [float(v) for v in values]
        return torch.tensor(scores, dtype=torch.float32)
