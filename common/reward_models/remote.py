"""A reward computed by a Flow-GRPO reward server over HTTP (`--reward remote:<url>`)."""

import io
import pickle
import time
import urllib.error
import urllib.request

import torch
from PIL import Image

from common.rewards import check_server, to_uint8


class RemoteReward:
    """A Flow-GRPO reward server (yifan123/reward-server: GenEval, DeQA; UnifiedReward behind the same protocol):
    one HTTP POST per `batch_size` images of a pickled dict {"images": [JPEG bytes], "prompts": [str],
    "meta_datas": [dict], "only_strict": True}; the answer is a pickled dict whose "scores" (GenEval: partial credit)
    or "outputs" (DeQA, UnifiedReward) hold one number per image. Metadata a prompt lacks is sent as {"prompt": ...};
    GenEval needs its own (a GenEval prompts file's JSON lines). Each request waits `timeout` seconds and is tried
    `retries` more time(s); a server not listening fails at construction. The answer is unpickled: trusted servers
    only (as in Flow-GRPO)."""

    def __init__(self, url, batch_size=64, timeout=120.0, retries=1):
        self.url, self.batch_size, self.timeout, self.retries = url, batch_size, timeout, retries
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
            except OSError as e:  # refused, reset, timed out (URLError is an OSError)
                err = f"is down or unreachable: {getattr(e, 'reason', e)}"
            if attempt < self.retries:
                time.sleep(1)
        raise ConnectionError(f"reward server {self.url} {err} ({self.retries + 1} tries, timeout {self.timeout:g} s)")

    def __call__(self, images, prompts, metadata=None):
        prompts, scores = list(prompts), []
        metadata = [m if m is not None else {"prompt": p} for p, m in zip(prompts, metadata or [None] * len(prompts))]
        arrays = to_uint8(images)
        for i in range(0, len(prompts), self.batch_size):
            jpegs = []
            for a in arrays[i:i + self.batch_size]:
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="JPEG")  # PIL's default quality 75, as Flow-GRPO's client
                jpegs.append(buf.getvalue())
            answer = pickle.loads(self.post(pickle.dumps({"images": jpegs, "prompts": prompts[i:i + self.batch_size],
                                                          "meta_datas": metadata[i:i + self.batch_size],
                                                          "only_strict": True})))
            values = next((answer[k] for k in ("scores", "outputs") if k in answer), None) \
                if isinstance(answer, dict) else None
            if values is None or len(values) != len(jpegs):
                raise ValueError(f"reward server {self.url} answered {type(answer).__name__} "
                                 f"{sorted(answer) if isinstance(answer, dict) else ''}; expected a dict with 'scores' "
                                 f"or 'outputs' holding {len(jpegs)} numbers")
            scores += [float(v) for v in values]
        return torch.tensor(scores, dtype=torch.float32)
