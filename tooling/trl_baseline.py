"""TRL's `GRPOTrainer` on a relayrl run config: the external baseline of the time-to-accuracy benchmark.

    relayrl trl-baseline CONFIG [key.sub=value ...]

The same TOML (and overrides) a ``relayrl train`` run takes sets the model, data, prompt format,
reward, sampling and optimiser, so the comparison is like for like by construction:
``prompts_per_step x group_size`` completions per optimizer step (``num_generations = group_size``),
``micro_batch_size`` completions per forward/backward, AdamW with relayrl's lr / weight decay /
grad clip / warmup and a constant schedule, PPO clip ``[1-clip_low, 1+clip_high]`` (``learner.loss``'s), GRPO group
normalised advantages, token-mean loss over the batch (TRL's ``dapo`` loss type; ``loss_agg =
constant`` maps to ``dr_grpo``), no KL unless ``kl_coef > 0``. TRL runs synchronously in one
process (generate with HF ``generate``, then train) on every CPU core; that is how TRL runs without
a GPU.

Held-out accuracy is measured exactly as in relayrl, but after training so it never touches the
clock: every ``eval_every`` steps (and the last) the policy is written as one bf16 safetensors file
(the write is excluded from the clock), and at the end one vLLM engine answers the held-out problems
greedily with the base model (step 0) and then with each file loaded in turn, scored by the same
strict exact match.

The run dir (``output_dir/name-<time>/``) holds ``metrics.jsonl`` (``step``,
``perf/train_seconds``, ``perf/step_seconds``, ``rollout/reward_mean``, ``eval/accuracy``) and
``summary.json`` like a relayrl run, so `tooling.experiment` tables read both. Training stops
at ``num_steps`` or once ``time_budget_s`` of training clock is spent.

Requires ``pip install trl`` (the ``trl`` extra); it is not part of the default install. The
command line (argument parsing, one-line errors) is `orchestrator.cli`'s; this module has no ``main``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
logger = logging.getLogger("relayrl.trl_baseline")


def grpo_config_kwargs(cfg, out_dir: str, use_cpu: bool) -> dict:
    """`trl.GRPOConfig` keyword arguments equivalent to the relayrl run config ``cfg``.

    Raises:
        ValueError: a setting TRL has no equivalent for (advantage estimator other than grpo/drgrpo,
            a loss with behaviour correction other than the on-policy PPO clip, several PPO
            minibatches). `RunConfig` has already checked that the step batch divides into micro batches.
    """
    rc, lc = cfg.rollout, cfg.learner
    batch = cfg.prompts_per_step * rc.group_size
    if lc.advantage.type not in ("grpo", "drgrpo"):
        raise ValueError(f"learner.advantage = {lc.advantage.type!r} has no TRL GRPOTrainer equivalent (grpo, drgrpo)")
    if lc.loss.type not in ("ppo_tis", "ppo"):
        raise ValueError(f"learner.loss = {lc.loss.type!r} has no TRL equivalent here (ppo_tis and ppo are the "
                         "same PPO clip when training is on-policy, as TRL's is)")
    if lc.ppo_minibatches != 1:
        raise ValueError(f"learner.ppo_minibatches = {lc.ppo_minibatches}: the baseline maps one optimizer "
                         "step per batch only")
    return dict(
        output_dir=out_dir, max_steps=cfg.num_steps, seed=cfg.seed, use_cpu=use_cpu,
        bf16=lc.dtype == "bf16", gradient_checkpointing=False,
        learning_rate=lc.lr, weight_decay=lc.weight_decay, max_grad_norm=lc.grad_clip,
        warmup_steps=lc.warmup_steps, lr_scheduler_type="constant_with_warmup" if lc.warmup_steps else "constant",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        per_device_train_batch_size=lc.micro_batch_size,
        gradient_accumulation_steps=batch // lc.micro_batch_size,
        num_generations=rc.group_size, max_completion_length=rc.max_tokens,
        temperature=rc.temperature, top_p=rc.top_p,
        epsilon=lc.loss.clip_low, epsilon_high=lc.loss.clip_high, beta=lc.kl_coef, num_iterations=1,
        loss_type="dapo" if lc.loss_agg == "token_mean" else "dr_grpo",
        scale_rewards="group" if lc.advantage.type == "grpo" else "none",
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
    )


def _reward_fn(completions, answer, **_) -> list[float]:
    from rollout.rewards import score_response

    return [score_response(c[-1]["content"] if isinstance(c, list) else c, a)[0]
            for c, a in zip(completions, answer)]


def _clock(cfg, wdir: Path, records: dict[int, dict]):
    """A TRL callback that keeps the training clock without the policy writes, writes a policy (bf16
    safetensors) at each eval step under ``wdir``, records per-step figures into ``records`` and stops
    training at ``time_budget_s``."""
    import torch
    from transformers import TrainerCallback

    from base.weight_buckets import serialize_buckets

    class Clock(TrainerCallback):
        """Training clock without the policy writes; saves policies, stops at the time budget."""

        def __init__(self):
            self.t0 = self.last = 0.0
            self.paused = 0.0

        def save(self, model, step: int) -> None:
            t = time.perf_counter()
            named = ((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
            (wdir / f"step-{step}.safetensors").write_bytes(serialize_buckets(named, 1 << 40)[0])
            self.paused += time.perf_counter() - t

        def on_train_begin(self, args, state, control, **_):
            self.t0 = self.last = time.perf_counter()
            self.paused = 0.0

        def on_step_end(self, args, state, control, model=None, **_):
            now = time.perf_counter()
            train_s = now - self.t0 - self.paused
            step = state.global_step
            records.setdefault(step, {})["step"] = step
            records[step].update({"perf/train_seconds": train_s, "perf/step_seconds": now - self.last})
            over = cfg.time_budget_s and train_s >= cfg.time_budget_s
            if over or step == cfg.num_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                self.save(model, step)
            if over:
                control.should_training_stop = True
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "reward" in logs:
                r = records.setdefault(state.global_step, {"step": state.global_step})
                r["rollout/reward_mean"] = float(logs["reward"])
                if "completions/mean_length" in logs:
                    r["rollout/response_tokens_mean"] = float(logs["completions/mean_length"])

    return Clock()


def train(cfg, run_dir: Path) -> dict:
    """Train with TRL, then evaluate the saved policies; writes and returns the run summary."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.models import resolve_model_path
    from rollout.tasks import build_messages, load_problems

    dc = cfg.data
    model_path = resolve_model_path(cfg.model.path)
    train_problems, eval_problems = load_problems(dc, "train"), load_problems(dc, "eval")
    ds = Dataset.from_list([{"prompt": build_messages(p.question, dc.instruction, dc.one_shot), "answer": p.answer}
                            for p in train_problems])
    wdir = run_dir / "policies"
    wdir.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}

    clock = _clock(cfg, wdir, records)
    torch.manual_seed(cfg.seed)
    use_cpu = not torch.cuda.is_available()
    args = trl.GRPOConfig(**grpo_config_kwargs(cfg, str(run_dir / "trl"), use_cpu))
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward_fn, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[clock])
    logger.info("TRL %s GRPOTrainer: %d train / %d held-out problems, %d torch threads", trl.__version__,
                len(train_problems), len(eval_problems), torch.get_num_threads())
    t_start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t_start
    del trainer, model
    accuracies = evaluate_policies(cfg, model_path, wdir, eval_problems)
    for step, acc in accuracies.items():
        records.setdefault(step, {"step": step})["eval/accuracy"] = acc
    recs = [records[s] for s in sorted(records)]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    # like a relayrl summary: the newest value of every key (step and training seconds of the last step)
    summary = {**{k: v for r in recs for k, v in r.items()},
               "trainer": f"trl {trl.__version__} GRPOTrainer", "wall_seconds_with_policy_writes": wall}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_policies(cfg, model_path: str, wdir: Path, problems: list) -> dict[int, float]:
    """Greedy strict exact-match accuracy of the base model and every ``step-N.safetensors`` under ``wdir``:
    ``{0: base accuracy, N: accuracy}``.

    Each policy file is deleted once evaluated.

    One vLLM engine (the run's rollout dtype and KV cache) answers ``problems`` with the base model
    (step 0), then loads each policy in place, as a relayrl rollout worker does after a weight push.
    """
    from rollout.engine import VLLMEngine
    from rollout.tasks import greedy_accuracy

    rc, dc = cfg.rollout, cfg.data
    if not problems:
        return {}
    engine = VLLMEngine(model_path, rc.dtype, rc.kv_cache_memory_bytes, rc.max_model_len,
                        kv_cache_seqs=len(problems), block_size=rc.block_size)

    def acc() -> float:
        return greedy_accuracy(engine, problems, dc.instruction, dc.one_shot, cfg.eval_max_tokens or rc.max_tokens)

    out = {0: acc()}  # the engine starts with the base model: step 0
    logger.info("base model: held-out accuracy %.3f", out[0])
    for step, path in sorted((int(p.stem.split("-")[1]), p) for p in wdir.glob("step-*.safetensors")):
        engine.load_weights([path.read_bytes()])
        out[step] = acc()
        logger.info("%s: held-out accuracy %.3f", path.name, out[step])
        path.unlink()  # 269 MB each for SmolLM2; the accuracy is what is kept
    return out


def run_baseline(config: str | None, overrides: list[str]) -> tuple[Path, dict]:
    """`relayrl trl-baseline CONFIG [overrides]`: train in a new run dir; returns ``(run dir, summary)``.

    Raises:
        ConfigError: the config cannot be loaded or validated.
        ValueError: a setting TRL has no equivalent for (checked before any model is loaded).
        RuntimeError: trl is not installed (the message says how to install it).
    """
    from orchestrator.config import load_config

    cfg = load_config(config, overrides)
    grpo_config_kwargs(cfg, "", True)  # refuse unmappable settings before loading anything
    try:
        import trl  # noqa: F401
    except ImportError:
        raise RuntimeError("the TRL baseline needs trl: .venv/bin/pip install 'trl==1.16.0'") from None
    run_dir = Path(cfg.output_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    return run_dir, train(cfg, run_dir)
