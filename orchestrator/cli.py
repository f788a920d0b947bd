"""`relayrl` command line: ``train`` a run from a TOML config, ``experiment``, ``bench``, ``trl-baseline``.

``relayrl experiment SPEC --out docs/x.md`` runs the variants of an experiment spec one after the
other and writes a comparison table.

``relayrl train CONFIG [key.sub=value ...]`` validates the config, resolves the model and data,
starts (or joins) Ray, runs the loop and writes a run dir (locally or on a storage URI). Errors a user
can fix (bad config value, missing model or data file, empty dataset, too few resources, storage that
cannot be written) print one line and exit 2; an actor that dies prints one line naming its log file and
exits 1. The console shows relayrl's own progress, warnings and errors; every component's full log is in
``<run_dir>/logs/`` (for a run on an object store, a driver-local dir it names) and ``-v`` shows it all
(`orchestrator.console`).

``relayrl report RUN [--out DIR]`` renders plots and a summary of a run dir (a local path or storage URI).

``relayrl scale RUN --rollout-workers N`` changes a running job's rollout worker count (RUN: its run dir,
local or a storage URI, or its name); ``--reward-model NAME=N`` the server count of its reward-model pool NAME.

``relayrl bench CONFIG [--out docs/benchmarks.md] [--only NAME ...] [--steps N] [key.sub=value ...]``
measures wrapper overhead, weight push, overlap/speedup and scaling on a run config and writes a table.

``relayrl trl-baseline CONFIG [key.sub=value ...]`` trains TRL's GRPOTrainer on the same config (the
external baseline; needs the ``trl`` extra) and writes a run dir the experiment tables read.

``relayrl config-reference [--out docs/config.md]`` writes every config field (type, default, bounds,
description) as Markdown tables, generated from the pydantic models.

The tooling subcommands (``experiment``, ``bench``, ``report``, ``trl-baseline``, ``config-reference``) import
`tooling` inside their functions: the core never imports it, and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("relayrl")
VERBOSE_HELP = "everything on the console: debug logging and every actor's vLLM/Ray/DeepSpeed output"
CONFIG_HELP = "run config (TOML), e.g. deploy/examples/arithmetic_smollm2.toml"


def _init_ray(cfg, logs_dir: Path | None = None, verbose: bool = False) -> None:
    """Start or join Ray. With ``logs_dir``, actor output goes to ``logs_dir/<component>.log`` and the
    console shows only relayrl's warnings and errors from the actors (`orchestrator.console`)."""
    import ray

    from base.user_code import ship_user_code
    from orchestrator import console

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not verbose:
        console.quiet_ray_logger()
    # every actor process formats its logging like the driver, so relayrl's own lines are recognised; the user
    # code the config named (imported when it loaded) goes to every node
    runtime_env = ship_user_code({"worker_process_setup_hook": console.WORKER_SETUP_HOOK})
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        logger.info("connected to Ray cluster at %s: %s", address, ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, runtime_env=runtime_env)
        logger.info("started a local Ray instance: %s", ray.cluster_resources())
    if logs_dir is not None:
        console.route_worker_logs(logs_dir, verbose)


def cmd_train(args: argparse.Namespace) -> int:
    from base import storage
    from orchestrator import console
    from orchestrator.checkpoint import find_run_to_resume, latest_checkpoint
    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path
    from orchestrator.run_outputs import create_run, logs_dir_of
    from rollout.tasks import load_problems

    cfg = load_config(args.config, args.overrides)
    explicit = args.resume not in (None, "auto")
    # a bad scheme, missing credentials or a missing bucket fail here, before anything starts
    storage.check_writable(args.resume if explicit else cfg.output_dir)
    train_problems = load_problems(cfg.data, "train")
    eval_problems = load_problems(cfg.data, "eval")
    run, ckpt = None, None
    if explicit:  # an explicit run dir must have a checkpoint
        run, ckpt = args.resume, latest_checkpoint(args.resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {args.resume}: no complete checkpoint under "
                                    f"{storage.join(run, 'checkpoints')}")
    elif args.resume == "auto" or cfg.checkpoint.resume == "auto":
        run = find_run_to_resume(cfg.output_dir, cfg.name)
        ckpt = latest_checkpoint(run) if run else None
        if ckpt is None:
            logger.info("resume: no run named %r with a complete checkpoint under %s; starting fresh",
                        cfg.name, cfg.output_dir)
    model_path = resolve_model_path(cfg.model.path)
    if ckpt is None:
        run = create_run(cfg.output_dir, cfg.name, cfg.model_dump())
    logs_dir = console.log_to_files(logs_dir_of(run))
    if ckpt is not None:
        logger.info("resuming %s from %s", run, storage.basename(ckpt))
    logger.info("run dir %s; model %s; %d train / %d held-out problems", run, model_path,
                len(train_problems), len(eval_problems))
    logger.info("full logs of every component: %s/<component>.log (-v: all of it on the console)", logs_dir)
    _init_ray(cfg, logs_dir, args.verbose)
    from orchestrator.loop import train

    summary = train(cfg, run, model_path, train_problems, eval_problems, progress=not args.quiet,
                    resume_from=ckpt)
    print(json.dumps({k: summary.get(k) for k in ("step", "eval/accuracy", "eval/gain", "eval/gain_se",
                                                  "time/elapsed_s", "final_model")}))
    if summary.get("eval/gain") is not None:
        from orchestrator.metrics import gain_line

        print(gain_line(summary["eval/accuracy"], summary["eval/gain"], summary.get("eval/gain_se"),
                        len(eval_problems)))
    print(f"run dir: {run}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from orchestrator.control import scale

    pools = {}
    for item in args.reward_model or []:
        name, sep, n = item.partition("=")
        if not sep or not name or not n.strip().lstrip("-").isdigit():
            raise ValueError(f"--reward-model {item!r} is not NAME=N (a [[reward_models]] pool's name and a "
                             "server count, e.g. --reward-model judge=2)")
        pools[name] = int(n)
    print(json.dumps(scale(args.run, args.rollout_workers, args.address, reward_models=pools)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tooling.report import write_report

    for path in write_report(args.run, args.out):
        print(path)
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from orchestrator.models import resolve_model_path

    print(resolve_model_path(args.model))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from tooling.experiment import run_experiment

    print(run_experiment(args.spec, args.out, args.only or None, args.variant_timeout))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from tooling.bench import run_bench

    command = shlex.join(["relayrl", "bench", args.config, *(["--out", args.out] if args.out else []),
                          *(x for name in args.only or [] for x in ("--only", name)), "--steps", str(args.steps),
                          *args.overrides])
    print(run_bench(args.config, args.overrides, args.out, args.only or None, args.steps, command, _init_ray))
    return 0


def cmd_trl_baseline(args: argparse.Namespace) -> int:
    from tooling.trl_baseline import run_baseline

    run_dir, summary = run_baseline(args.config, args.overrides)
    print(json.dumps({k: summary[k] for k in ("step", "perf/train_seconds", "eval/accuracy") if k in summary}))
    print(f"run dir: {run_dir}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from tooling.config_reference import render

    text = render()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a TOML run config")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-6")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (CI/logs)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--resume", nargs="?", const="auto", metavar="RUN_DIR",
                   help="continue RUN_DIR (a local path or storage URI such as s3://bucket/runs/x) from its "
                   "latest complete checkpoint; without a value, the newest '<output_dir>/<name>-*' run that "
                   "has one (fresh start if none)")
    p.set_defaults(fn=cmd_train)


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="run the variants of an experiment spec and write a table")
    p.add_argument("spec", help="experiment spec (TOML), e.g. deploy/experiments/off_policy.toml")
    p.add_argument("--out", help="Markdown file to write (a .json with the raw summaries goes next to it)")
    p.add_argument("--only", action="append", help="run only this variant (repeatable)")
    p.add_argument("--variant-timeout", type=float, default=3600.0, help="seconds per variant before it is killed")
    p.set_defaults(fn=cmd_experiment)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark wrapper overhead, weight push, overlap and scaling on a config")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.num_workers=1")
    p.add_argument("--out", help="Markdown file to write (a .json with the raw measurements goes next to it)")
    p.add_argument("--only", action="append",
                   help="run only this benchmark (repeatable): wrapper, generation, weight_push, weight_push_delta, "
                   "lora, learner_paths, learner_layouts, learner_memory, overlap, speedup, scaling")
    p.add_argument("--steps", type=int, default=4, help="learner steps of each real run (step 1 is not counted)")
    p.set_defaults(fn=cmd_bench)


def _add_trl_baseline(sub) -> None:
    p = sub.add_parser("trl-baseline", help="TRL's GRPOTrainer on a run config (the external baseline; needs trl)")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    p.set_defaults(fn=cmd_trl_baseline)


def _add_scale(sub) -> None:
    p = sub.add_parser("scale", help="change the number of rollout workers or reward-model servers of a running job")
    p.add_argument("run", help="a running job's run dir, local or a storage URI (s3://bucket/runs/...), or its name")
    p.add_argument("--rollout-workers", type=int, help="rollout workers wanted")
    p.add_argument("--reward-model", action="append", metavar="NAME=N",
                   help="servers wanted in the [[reward_models]] pool NAME (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.set_defaults(fn=cmd_scale)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="PNG plots and a one-page summary of a run dir")
    p.add_argument("run", help="a run dir or its storage URI (runs/<name>-<timestamp>, s3://bucket/runs/...)")
    p.add_argument("--out", help="write the report here (a local path or URI; default: RUN/report)")
    p.set_defaults(fn=cmd_report)


def _add_prepare_model(sub) -> None:
    p = sub.add_parser("prepare-model", help="convert/resolve a model to a local HF dir and print it")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(fn=cmd_prepare_model)


def _add_config_reference(sub) -> None:
    p = sub.add_parser("config-reference", help="every config field (type, default, bounds, description) as Markdown")
    p.add_argument("--out", help="Markdown file to write, e.g. docs/config.md (default: stdout)")
    p.set_defaults(fn=cmd_config_reference)


SUBCOMMANDS = (_add_train, _add_experiment, _add_bench, _add_trl_baseline, _add_scale, _add_report,
               _add_prepare_model, _add_config_reference)  # in the order ``--help`` lists them
TAKES_OVERRIDES = ("train", "bench", "trl-baseline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line as a namespace (``fn``: the subcommand's function); dotted overrides may follow
    options (``train cfg.toml --resume run key=value``). Exits 2 with argparse's usage line on a bad one."""
    parser = argparse.ArgumentParser(prog="relayrl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.cmd not in TAKES_OVERRIDES or any("=" not in x or x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relayrl`` console script; returns the exit code: 0, 2 for an error a user can fix
    (one line on stderr), 1 for an actor that died (one line naming its log)."""
    args = parse_args(argv)
    from orchestrator import console
    from orchestrator.config import ConfigError

    console.setup_console(args.verbose)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, TimeoutError, ConnectionError) as e:
        print(f"relayrl: error: {console.error_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not type(e).__module__.startswith("ray."):  # a bug: the whole traceback
            raise
        print(f"relayrl: error: {console.error_line(e)}", file=sys.stderr)  # an actor died: one line
        return 1


if __name__ == "__main__":
    sys.exit(main())
