"""``python -m tooling.delta_profile --out docs/delta_profile.json [--against COMMIT]``: where a delta weight push's
CPU seconds go, outside Ray, step by step (issue 32).

The main job's model (SmolLM2-135M-Instruct in the rollout dtype, bf16) is the base; the next version moves a random
4% of its values by 1% (about what one learner step of the main job changes: 3.4-5.0% of the bf16 values in
docs/bench_main_job.json). Each step of `orchestrator.weights.delta.DeltaTransport.push` and of
`base.weight_delta.DeltaReceiver.receive` is timed on its own, one thread, ``--repeats`` times (min/median/max):
the learner's export (`serialize_buckets` + `seal`), the driver's decode of it, `encode`, packing the delta into
sealed buckets, and on the worker the checksum check, unpacking, `apply` and the re-serialization into the plain
buckets the engine loads. ``--against COMMIT`` times that commit's ``base/weight_delta.py`` (read with
``git show``) too, alternating with the current one, for a before/after of a change to the wire format.

Left out on purpose: Ray's object store and the engine's reload (`relayrl bench --only weight_push_delta` times the
whole push); a test in the suite (the figures are machine-dependent; the bit-exactness is tested in
tests/unit/test_weight_delta.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG = "deploy/examples/arithmetic_smollm2.toml"
CHANGED_FRAC = 0.04
STEP = 0.01  # relative move of a changed value


def _module_at(commit: str):
    """``base/weight_delta.py`` as it was at ``commit``, imported as a module of its own."""
    src = subprocess.run(["git", "show", f"{commit}:base/weight_delta.py"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"weight_delta_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def profile(config: str, repeats: int, against: str | None) -> dict:
    """Seconds of each step (``{step: {"min", "median", "max"}}``) and MB of the delta, per wire format.

    Raises:
        subprocess.CalledProcessError: ``against`` is no commit of this repository.
    """
    import torch

    import base.weight_delta as current
    from base.weight_buckets import iter_buckets, seal, serialize_buckets, verify_checksums
    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path
    from rollout.engine_args import checkpoint_files
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    cfg = load_config(config)
    dtype = getattr(torch, cfg.rollout.dtype)
    bb = cfg.weights.bucket_bytes
    prev = {}
    for f in checkpoint_files(resolve_model_path(cfg.model.path)):
        prev.update({k: v.to(dtype) for k, v in load_file(f).items()})
    gen = torch.Generator().manual_seed(0)
    new = {k: (v.float() + (torch.rand(v.shape, generator=gen) < CHANGED_FRAC).float() * v.float().abs()
               .clamp_min(1e-3) * STEP).to(dtype) for k, v in prev.items()}
    formats = {"current": current, **({against: _module_at(against)} if against else {})}
    times: dict[str, list[float]] = {}
    mb: dict[str, float] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    for rep in range(repeats):
        export = timed("learner: serialize + seal (export)", lambda: seal(serialize_buckets(new.items(), bb)))
        dec = timed("driver: verify + decode export", lambda: dict(iter_buckets(verify_checksums(export, "d", 1))))
        order = list(formats.items()) if rep % 2 == 0 else list(formats.items())[::-1]
        for tag, m in order:
            payload, entries = timed(f"{tag}: driver: encode", lambda: m.encode(prev, dec, 0.5))
            delta = timed(f"{tag}: driver: pack buckets + seal", lambda: seal(m.to_buckets(2, 1, payload, entries, bb)))
            mb[tag] = sum(map(len, delta)) / 1e6
            body = timed(f"{tag}: worker: verify", lambda: verify_checksums(delta, "w", 2))
            got = timed(f"{tag}: worker: unpack buckets", lambda: m.from_buckets(body))
            rebuilt = timed(f"{tag}: worker: apply", lambda: m.apply(prev, got[3], got[4]))
            timed(f"{tag}: worker: re-serialize for the engine", lambda: serialize_buckets(rebuilt.items(), bb))
            if m.digest(rebuilt) != m.digest(new):
                raise RuntimeError(f"{tag}: the rebuilt weights differ from the pushed ones")
    changed = sum(int(torch.count_nonzero(current._bits(prev[k]) ^ current._bits(new[k]))) for k in new) / sum(
        v.numel() for v in new.values())
    return {"config": config, "dtype": cfg.rollout.dtype, "changed_frac": changed, "repeats": repeats,
            "threads": 1, "delta_mb": mb,
            "seconds": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    """Profile and write the JSON (with the command and the commit it ran at)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/delta_profile.json")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--against", help="a commit whose base/weight_delta.py is timed too")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tooling.bench import git_state

    out = {"command": " ".join(["python -m tooling.delta_profile", *(argv if argv is not None else sys.argv[1:])]),
           **git_state(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **profile(a.config, a.repeats, a.against)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["seconds"].items():
        logger.info("%7.3f s (min %.3f, max %.3f)  %s", v["median"], v["min"], v["max"], k)
    logger.info("delta MB: %s; wrote %s", out["delta_mb"], a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
