"""Rewards: one interface, a registry, weighted combinations from the command line.

A reward is a callable `(images, prompts, metadata) -> torch.Tensor (N,)` where images are float
(N, 3, H, W) in [0, 1] on any device, prompts a list of str, metadata a list of dicts (for the embedded
world: the prompt's shapes spec) or None.

    reward_fn = build_reward("shapes=1.0,jpeg_compressibility=0.1", device)
    rewards, parts = reward_fn(images, prompts, metadata)      # parts: {name: (N,)} for logging

Embedded (no weights): shapes, shapes_strict, jpeg_compressibility, jpeg_incompressibility.
Real (transformers; a hub id in the local cache by default, or local weights via `paths` / --reward-paths
name=path[|processor],...): pickscore, clipscore, hpsv2 (HPS v2.1), imagereward, aesthetic (LAION predictor v2:
needs its head file), ocr (TrOCR), vlm (yes/no judge). Remote: `remote:<url>`, a Flow-GRPO reward server (GenEval,
DeQA, UnifiedReward) spoken to over HTTP.
"""

import io
import os
import pickle
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch
from PIL import Image

from common import shapes

REAL_DEFAULT_PATHS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),  # (model, processor)
    "clipscore": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "vlm": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "hpsv2": ("xswu/HPSv2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),  # (repo of HPS_v2.1_compressed.pt, CLIP config)
    "imagereward": ("THUDM/ImageReward", "bert-base-uncased"),  # (repo of ImageReward.pt, tokenizer)
    "aesthetic": (None, "openai/clip-vit-large-patch14"),  # (head .pth: not on the hub, CLIP)
    "ocr": ("microsoft/trocr-base-printed", "microsoft/trocr-base-printed"),
}


def uint8_images(images):
    """(N, 3, H, W) floats in [0, 1] -> uint8 (N, 3, H, W), rounded; uint8 images as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(images):
    """(N, 3, H, W) in [0, 1] (or uint8) -> a uint8 (N, H, W, 3) numpy array."""
    return uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()


def _specs(prompts, metadata):
    metadata = metadata or [None] * len(prompts)
    return [m if shapes.is_spec(m) else shapes.parse_caption(p) for p, m in zip(prompts, metadata)]


def shapes_partial(images, prompts, metadata=None):
    """Mini-GenEval partial credit in [0, 1] (common/shapes.py `score`)."""
    return shapes.score(images, _specs(prompts, metadata))[0]


def shapes_strict(images, prompts, metadata=None):
    """Mini-GenEval strict pass/fail as 0/1."""
    return shapes.score(images, _specs(prompts, metadata))[1].float()


def jpeg_size_kb(images, quality=95):
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images, prompts=None, metadata=None):
    """-(JPEG size in kB at quality 95), as in DDPO / Flow-GRPO's compression task."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts=None, metadata=None):
    return jpeg_size_kb(images)


class PickScore:
    """PickScore (Kirstain et al. 2023): logit_scale * cos(image, text) of a CLIP-H model fine-tuned on Pick-a-Pic."""

    name = "pickscore"

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoProcessor

        default_model, default_processor = REAL_DEFAULT_PATHS[self.name]
        model_path, processor_path = model_path or default_model, processor_path or default_processor
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = self.load(model_path, processor_path, dtype).eval().requires_grad_(False).to(device)
        self.device, self.batch_size = device, batch_size

    def load(self, model_path, processor_path, dtype):
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_path, dtype=dtype)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            txt = self.processor(text=prompts[i:i + self.batch_size], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt")
            img_emb = self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device, self.model.dtype))
            txt_emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in txt.items()})
            img_emb, txt_emb = _features(img_emb), _features(txt_emb)
            cos = torch.nn.functional.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
            out.append(self.model.logit_scale.exp().float() * cos)
        return torch.cat(out).cpu()


def _features(x):
    return x if torch.is_tensor(x) else x.pooler_output


class CLIPScore(PickScore):
    """Cosine similarity of CLIP image and text embeddings (ViT-L/14 by default), in [-1, 1]."""

    name = "clipscore"

    def __call__(self, images, prompts, metadata=None):
        return super().__call__(images, prompts, metadata) / self.model.logit_scale.exp().float().cpu()


def _hub_file(path, filename):
    """A checkpoint file: `path` itself, `path`/`filename` for a directory, else `filename` of hub repo `path`."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return os.path.join(path, filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename)


def openclip_to_transformers(sd):
    """An OpenCLIP ViT CLIP state dict (HPSv2's checkpoints) -> transformers CLIPModel keys. OpenCLIP fuses q, k, v
    into one in_proj and multiplies by its projections (x @ proj) where transformers has Linear layers (x @ W.T)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k != "attn_mask"}
    out = {"logit_scale": sd.pop("logit_scale"), "text_projection.weight": sd.pop("text_projection").T,
           "visual_projection.weight": sd.pop("visual.proj").T,
           "text_model.embeddings.token_embedding.weight": sd.pop("token_embedding.weight"),
           "text_model.embeddings.position_embedding.weight": sd.pop("positional_embedding"),
           "vision_model.embeddings.class_embedding": sd.pop("visual.class_embedding"),
           "vision_model.embeddings.position_embedding.weight": sd.pop("visual.positional_embedding"),
           "vision_model.embeddings.patch_embedding.weight": sd.pop("visual.conv1.weight")}
    for src, dst in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm")):
        out.update({f"{dst}.{p}": sd.pop(f"{src}.{p}") for p in ("weight", "bias")})
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for k in list(sd):
        for src, dst in (("transformer.resblocks.", "text_model.encoder.layers."),
                         ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
            if not k.startswith(src):
                continue
            i, _, rest = k.removeprefix(src).partition(".")
            module, _, p = rest.rpartition(".")
            if module == "attn" and p in ("in_proj_weight", "in_proj_bias"):  # (3D, ...) -> q, k, v
                for name, t in zip("qkv", sd.pop(k).chunk(3)):
                    out[f"{dst}{i}.self_attn.{name}_proj.{p.removeprefix('in_proj_')}"] = t
            elif module in block:
                out[f"{dst}{i}.{block[module]}.{p}"] = sd.pop(k)
    if sd:
        raise ValueError(f"OpenCLIP keys with no place in a transformers CLIPModel: {sorted(sd)[:5]}")
    return out


class HPSv2(CLIPScore):
    """HPS v2.1 (Wu et al. 2023): cos(image, text) of an OpenCLIP ViT-H-14 fine-tuned on human preferences (HPD v2),
    ~0.2-0.35. HPS_v2.1_compressed.pt (hub repo xswu/HPSv2, OpenCLIP layout; or v2.0's HPS_v2_compressed.pt) is
    converted on load into a transformers CLIPModel with the config and processor of `processor_path` (default
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model it was fine-tuned from); a converted CLIPModel directory (with
    config.json) loads as is. HPSv2 resizes a tensor, the CLIP processor a PIL image: pixels differ by rounding."""

    name = "hpsv2"

    def load(self, model_path, processor_path, dtype):
        from transformers import CLIPConfig, CLIPModel

        if os.path.isfile(os.path.join(model_path, "config.json")):
            return CLIPModel.from_pretrained(model_path, dtype=dtype)
        ckpt = torch.load(_hub_file(model_path, "HPS_v2.1_compressed.pt"), map_location="cpu", weights_only=True)
        model = CLIPModel(CLIPConfig.from_pretrained(processor_path))
        try:
            missing, unexpected = model.load_state_dict(openclip_to_transformers(ckpt.get("state_dict", ckpt)),
                                                        strict=False)
        except RuntimeError as e:  # sizes differ
            missing, unexpected = [str(e).splitlines()[1].strip()], []
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise ValueError(f"HPS checkpoint {model_path} does not fit the CLIP config of {processor_path}: "
                             f"{(missing + unexpected)[:3]}")
        return model.to(dtype)


def _linear_head(sd):
    """The MLP head of the LAION aesthetic predictor and of ImageReward from its state dict ('layers.{i}.weight'):
    its Linear layers in index order. The Dropouts between them are identity at inference, and it has no
    activations (they are commented out in both originals): the head is affine."""
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    if not idx:
        raise ValueError(f"not an MLP head: no 'layers.<i>.weight' tensors among {list(sd)[:4]}")
    head = torch.nn.Sequential(*[torch.nn.Linear(*sd[f"layers.{i}.weight"].shape[::-1]) for i in idx])
    head.load_state_dict({f"{n}.{p}": sd[f"layers.{i}.{p}"] for n, i in enumerate(idx) for p in ("weight", "bias")})
    return head.eval().requires_grad_(False)


class Aesthetic:
    """LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor; DDPO's and Flow-GRPO's
    aesthetic reward), ~1-10: its MLP head on the L2-normalised CLIP ViT-L/14 image embedding. The head weights
    (sac+logos+ava1-l14-linearMSE.pth, from that repository, not on the hub) must be given: model_path."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoProcessor, CLIPModel

        if not model_path:
            raise ValueError(f"reward 'aesthetic' needs its MLP head: {AESTHETIC_HINT}")
        clip = processor_path or REAL_DEFAULT_PATHS["aesthetic"][1]
        self.processor = AutoProcessor.from_pretrained(clip)
        self.model = CLIPModel.from_pretrained(clip, dtype=dtype).eval().requires_grad_(False).to(device)
        self.head = _linear_head(torch.load(model_path, map_location="cpu", weights_only=True)).to(device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images, prompts=None, metadata=None):
        out = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            emb = _features(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device,
                                                                                                self.model.dtype)))
            emb = emb.float()
            out.append(self.head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1))
        return torch.cat(out).cpu()


def _pil_pixels(images, size, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    """(N, 3, H, W) in [0, 1] -> (N, 3, size, size) as torchvision's Resize(size, bicubic) + CenterCrop + ToTensor +
    Normalize do it on PIL images (BLIP's / ImageReward's preprocessing; CLIP's mean and std)."""
    out = []
    for a in to_uint8(images):
        img = Image.fromarray(a)
        w, h = img.size
        img = img.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.BICUBIC)
        left, top = round((img.size[0] - size) / 2), round((img.size[1] - size) / 2)
        out.append(torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1))
    return (torch.stack(out).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class ImageReward:
    """ImageReward v1.0 (Xu et al. 2023): BLIP's ViT-L/16 encodes the image (224 px); a BERT-base text encoder reads
    the prompt (35 tokens) cross-attending to the image patches; its [CLS] feature -> MLP head (768-1024-128-64-16-1)
    -> standardised with the training mean and std. Runs on transformers' BlipVisionModel + BlipTextModel, whose
    layers match BLIP's one to one: ImageReward.pt (hub repo THUDM/ImageReward, BLIP layout) is converted on load and
    every size is read from its tensor shapes (heads: 64 channels each, as in BLIP). Tokenizer: bert-base-uncased."""

    mean, std = 0.16717362830052426, 1.0333394966054072  # of the head's outputs on ImageReward's training set
    vision_keys = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                   ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
                   (".norm1", ".layer_norm1"), (".norm2", ".layer_norm2"), (".attn.qkv", ".self_attn.qkv"),
                   (".attn.proj", ".self_attn.projection")]

    def __init__(self, device, model_path=None, processor_path=None, batch_size=32, dtype=torch.float32):
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        path = _hub_file(model_path or REAL_DEFAULT_PATHS["imagereward"][0], "ImageReward.pt")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        vis, txt = ({k.removeprefix(p): v for k, v in sd.items() if k.startswith(p)}
                    for p in ("blip.visual_encoder.", "blip.text_encoder."))
        vis = {("post_layernorm." + k[5:] if k.startswith("norm.") else _renamed(k, self.vision_keys)): v
               for k, v in vis.items()}
        txt.pop("embeddings.position_ids", None)
        width, _, patch, _ = vis["embeddings.patch_embedding.weight"].shape
        vocab, hidden = txt["embeddings.word_embeddings.weight"].shape
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=len(vis["encoder.layers.0.mlp.fc1.bias"]),
            num_hidden_layers=_count(vis, "encoder.layers."), num_attention_heads=width // 64, patch_size=patch,
            image_size=patch * round((vis["embeddings.position_embedding"].shape[1] - 1) ** 0.5), layer_norm_eps=1e-6))
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width, num_attention_heads=hidden // 64,
            intermediate_size=len(txt["encoder.layer.0.intermediate.dense.bias"]),
            num_hidden_layers=_count(txt, "encoder.layer."), layer_norm_eps=1e-12, bos_token_id=None,
            max_position_embeddings=len(txt["embeddings.position_embeddings.weight"]), sep_token_id=None,
            pad_token_id=0), add_pooling_layer=False)
        for module, weights in ((self.vision, vis), (self.text, txt)):
            module.load_state_dict(weights)  # strict: every BLIP tensor has its place
            module.eval().requires_grad_(False).to(device, dtype)
        self.head = _linear_head({k.removeprefix("mlp."): v for k, v in sd.items() if k.startswith("mlp.")}).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or REAL_DEFAULT_PATHS["imagereward"][1])
        self.device, self.batch_size, self.dtype = device, batch_size, dtype

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        for i in range(0, len(prompts), self.batch_size):
            pix = _pil_pixels(images[i:i + self.batch_size], self.vision.config.image_size)
            img = self.vision(pixel_values=pix.to(self.device, self.dtype)).last_hidden_state  # (B, 1 + patches, W)
            tok = self.tokenizer(prompts[i:i + self.batch_size], padding="max_length", truncation=True, max_length=35,
                                 return_tensors="pt")
            feats = self.text(input_ids=tok["input_ids"].to(self.device),
                              attention_mask=tok["attention_mask"].to(self.device), encoder_hidden_states=img,
                              encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=self.device),
                              ).last_hidden_state[:, 0]  # [CLS]
            out.append((self.head(feats.float()).squeeze(-1) - self.mean) / self.std)
        return torch.cat(out).cpu()


def _renamed(key, pairs):
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def _count(sd, prefix):
    return 1 + max(int(k.removeprefix(prefix).split(".")[0]) for k in sd if k.startswith(prefix))


def edit_distance(a, b):
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    row = list(range(len(b) + 1))  # distances of a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def ocr_target(prompt, metadata=None):
    """The text the image should show: metadata["text"], else the prompt's first "quoted" span (Flow-GRPO)."""
    if isinstance(metadata, dict) and isinstance(metadata.get("text"), str):
        return metadata["text"]
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'the OCR reward needs the text to render in "double quotes" in the prompt: {prompt!r}')
    return parts[1]


def ocr_reward(recognised, target):
    """Flow-GRPO's OCR reward: 1 - d / len(target) on lower-case text without spaces, where d = 0 if the target
    occurs in the recognised text, else their edit distance capped at len(target); in [0, 1]."""
    rec, tgt = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        raise ValueError(f"the OCR reward's target text {target!r} is empty")
    return 1 - (0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))) / len(tgt)


class OCR:
    """Text rendering (Flow-GRPO's OCR task): `ocr_reward` of the text a transformers VisionEncoderDecoderModel reads
    in the whole image (TrOCR, greedy decoding). Flow-GRPO reads with PaddleOCR, which detects and reads every line;
    TrOCR reads one line, so multi-line text scores lower here."""

    def __init__(self, device, model_path=None, processor_path=None, batch_size=16, dtype=torch.float32,
                 max_new_tokens=48):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        model_path = model_path or REAL_DEFAULT_PATHS["ocr"][0]
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.model = VisionEncoderDecoderModel.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
        self.model.to(device)
        self.device, self.batch_size, self.max_new_tokens = device, batch_size, max_new_tokens

    @torch.no_grad()
    def recognise(self, images):
        texts = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor(images=list(to_uint8(images[i:i + self.batch_size])), return_tensors="pt")
            ids = self.model.generate(pix["pixel_values"].to(self.device, self.model.dtype), do_sample=False,
                                      num_beams=1, max_new_tokens=self.max_new_tokens)
            texts += self.processor.batch_decode(ids, skip_special_tokens=True)
        return texts

    def __call__(self, images, prompts, metadata=None):
        targets = [ocr_target(p, m) for p, m in zip(prompts, metadata or [None] * len(prompts))]
        return torch.tensor([ocr_reward(r, t) for r, t in zip(self.recognise(images), targets)], dtype=torch.float32)


def check_server(url, timeout=10.0):
    """ConnectionError (one line) unless something listens at the reward server's host and port."""
    u = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"reward server {url} is down or unreachable: {e}") from None


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


class VLMYesNo:
    """A VLM asked whether the image matches the prompt, as FDFO does (spec fdfo.md 6.1): Qwen2.5-VL chat template
    with a system turn, the image bilinearly resized to 504x504, one forward pass, and
    reward = 100 * sigmoid(logit["Yes"] - logit["No"]) at the last position, in [0, 100]. Works with any
    AutoModelForImageTextToText whose processor has a chat template and whose tokenizer has "Yes"/"No" tokens.
    (transformers' Qwen2.5-VL processor needs torchvision for its video processor.)"""

    system = "You are a helpful assistant."
    question = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
    answers = ("Yes", "No")

    def __init__(self, device, model_path=None, processor_path=None, batch_size=8, dtype=torch.float32, image_size=504):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_path = model_path or REAL_DEFAULT_PATHS["vlm"][0]
        self.processor = AutoProcessor.from_pretrained(processor_path or model_path)
        self.processor.tokenizer.padding_side = "left"  # the next-token logits sit at the last position
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False).to(device)
        ids = [self.processor.tokenizer.encode(w, add_special_tokens=False) for w in self.answers]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the tokenizer of VLM {model_path} splits the answers {self.answers} into {ids}; "
                             "need one token each")
        self.yes, self.no = ids[0][0], ids[1][0]
        self.device, self.batch_size, self.image_size = device, batch_size, image_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        prompts, out = list(prompts), []
        if self.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=(self.image_size,) * 2, mode="bilinear")
        for i in range(0, len(prompts), self.batch_size):
            imgs = [Image.fromarray(a) for a in to_uint8(images[i:i + self.batch_size])]
            msgs = [[{"role": "system", "content": [{"type": "text", "text": self.system}]},
                     {"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": self.question.format(prompt=p)}]}]
                    for p in prompts[i:i + self.batch_size]]
            text = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
            inputs = self.processor(text=text, images=imgs, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only the floating tensors (pixels)
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # vocab logits of the answer token
            out.append(100 * torch.sigmoid(logits[:, self.yes] - logits[:, self.no]))
        return torch.cat(out).cpu()


EMBEDDED_REWARDS = {"shapes": shapes_partial, "shapes_strict": shapes_strict,
                    "jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility}
REAL_REWARDS = {"pickscore": PickScore, "clipscore": CLIPScore, "hpsv2": HPSv2, "imagereward": ImageReward,
                "aesthetic": Aesthetic, "ocr": OCR, "vlm": VLMYesNo}
REWARDS = sorted([*EMBEDDED_REWARDS, *REAL_REWARDS])
CHOICES = ", ".join([*REWARDS, "remote:<url>"])
AESTHETIC_HINT = ("--reward-paths aesthetic=sac+logos+ava1-l14-linearMSE.pth "
                  "(christophschuhmann/improved-aesthetic-predictor)")


def parse_reward_spec(spec):
    """'shapes=1.0,jpeg_compressibility=0.1' (or 'shapes') -> {'shapes': 1.0, ...}. Raises ValueError with one line."""
    weights = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition("=")
        name = name.strip()
        if name.startswith("remote:"):
            try:
                u = urllib.parse.urlsplit(name.removeprefix("remote:"))
                ok = u.scheme in ("http", "https") and u.hostname and (u.port or True)
            except ValueError:  # e.g. a port that is not a number
                ok = False
            if not ok:
                raise ValueError(f"reward {name!r} needs the http(s) URL of a reward server, "
                                 "e.g. remote:http://127.0.0.1:18085")
        elif name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from: {CHOICES}")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"malformed reward weight {w!r} for {name!r} in --reward {spec!r}; "
                             "use name=float pairs, e.g. shapes=1.0,jpeg_compressibility=0.1") from None
        if not np.isfinite(weights[name]):
            raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
    if not weights:
        raise ValueError(f"empty --reward {spec!r}; choose from: {CHOICES}")
    return weights


def parse_reward_paths(text, spec=None):
    """--reward-paths 'aesthetic=head.pth,hpsv2=/ckpt/HPS_v2.1_compressed.pt,pickscore=MODEL|PROCESSOR' -> {name: path}.
    Checks the names, that a local-looking path (/, ., ~ or a .pt/.pth/.bin/.safetensors file) exists, and, given the
    --reward `spec`, that a reward without a default (aesthetic) has its path. Raises ValueError with one line."""
    paths = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, eq, path = (x.strip() for x in part.partition("="))
        if name not in REAL_REWARDS:
            raise ValueError(f"unknown reward {name!r} in --reward-paths {text!r}; "
                             f"choose from: {', '.join(REAL_REWARDS)}")
        if not path:
            raise ValueError(f"--reward-paths {text!r} gives no path for {name!r}; use name=path pairs, e.g. "
                             "aesthetic=sac+logos+ava1-l14-linearMSE.pth")
        for p in path.split("|"):
            if (p.startswith(("/", ".", "~")) or p.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
                    and not os.path.exists(os.path.expanduser(p)):
                raise ValueError(f"--reward-paths {name}={path}: {p!r} does not exist")
        paths[name] = os.path.expanduser(path)
    if spec and "aesthetic" in parse_reward_spec(spec) and "aesthetic" not in paths:
        raise ValueError(f"reward 'aesthetic' needs its MLP head: {AESTHETIC_HINT}")
    return paths


# --reward-dtype: the official Flow-GRPO code scores PickScore, ImageReward and the aesthetic predictor in fp32 (in
# bf16, PickScore's logit scale exp(ln 100) is 99.0: scores ~1 % low); bf16 / fp16 save memory (e.g. the 7B VLM)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RewardFn:
    """Weighted sum of registered rewards. Real reward models load on first construction, in `dtype` (the scripts:
    --reward-dtype, fp32 by default) on `device` (--reward-device, e.g. another GPU), scoring
    `batch_size` images at a time (default: each model's own). `paths` maps a real reward name to a model path (or
    'model_path|processor_path'), as a dict or as --reward-paths text; `remote:<url>` rewards need none."""

    def __init__(self, spec, device="cpu", paths=None, dtype=torch.float32, batch_size=None):
        self.weights = parse_reward_spec(spec)
        paths = parse_reward_paths(paths) if isinstance(paths, str) or paths is None else paths
        self.fns = {}
        for name in self.weights:
            kw = {"batch_size": batch_size} if batch_size else {}
            m, _, p = paths.get(name, "").partition("|")
            try:
                if name in EMBEDDED_REWARDS:
                    self.fns[name] = EMBEDDED_REWARDS[name]
                elif name.startswith("remote:"):
                    self.fns[name] = RemoteReward(name.removeprefix("remote:"), **kw)
                else:
                    self.fns[name] = REAL_REWARDS[name](device, m or None, p or None, dtype=dtype, **kw)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]  # the rest is in the chained traceback
                raise RuntimeError(f"reward {name!r} could not be set up: {type(e).__name__}: {first}") from e

    def __call__(self, images, prompts, metadata=None):
        parts = {}
        for name, fn in self.fns.items():
            try:
                parts[name] = fn(images, prompts, metadata).float().cpu()
            except Exception as e:
                raise RuntimeError(f"reward {name!r} failed on prompts {list(prompts)[:4]}"
                                   f"{'...' if len(prompts) > 4 else ''}: {type(e).__name__}: {e}") from e
        total = sum(self.weights[n] * r for n, r in parts.items())
        # an image with NaN/inf pixels (a diverged model) has no reward: NaN, so the scripts' non-finite guard
        # sees it instead of a reward computed from whatever the NaNs were cast to
        broken = ~torch.isfinite(images.float().flatten(1)).all(1).cpu()
        return total.masked_fill(broken, float("nan")), parts


def build_reward(spec, device="cpu", paths=None, dtype=torch.float32, batch_size=None):
    return RewardFn(spec, device, paths, dtype, batch_size)
