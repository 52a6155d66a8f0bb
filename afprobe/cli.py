"""`afprobe` command line: thin wrappers over the pipeline stages."""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from afprobe.errors import BadInput


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep it to one line
        raise BadInput(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="afprobe", description="Probe and steer training-awareness in open language models.")
    common = argparse.ArgumentParser(add_help=False)  # every command: how much to say
    common.add_argument("--quiet", action="store_true", help="no progress bars; print only results and errors")
    common.add_argument("--verbose", action="store_true", help="also print debugging messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    def add_set(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key by dotted path, e.g. --set queries.limit=8")
        return p

    def with_set(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_set(p)
        p.add_argument("--force", action="store_true", help="overwrite a run directory that holds a different run")
        p.add_argument("--wait", action="store_true",
                       help="if another process is writing the run directory, wait for it (default: exit 2)")
        return p

    p = with_set(command("run", help="all stages; ends by writing DIR/summary.json"))
    p.add_argument("config")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p = with_set(command("cache", help="cache residual activations"))
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p = with_set(command("prompts", help="write the rendered prompts (what the model sees) with token counts"))
    p.add_argument("config")
    p.add_argument("--out", required=True, help="a .jsonl file")
    for name, text in (("probe", "train probes on a cached run"), ("steer", "steer along the probe direction")):
        p = with_set(command(name, help=text))
        p.add_argument("dir")
    p = command("patch", help="activation patching between the two cues of each query (patching/results.csv)")
    p.add_argument("dir")
    p.add_argument("--layers", default=None, help="'all' (default) or layers and ranges, e.g. 0-5,10")
    p.add_argument("--positions", default=None, help="comma-separated subset of cue,last,user (default: all three)")
    p.add_argument("--sites", default=None, help="comma-separated subset of resid_pre,resid_post (default: both)")
    p.add_argument("--n-queries", type=int, default=None, help="patch the first N queries (default: all)")
    p.add_argument("--family", default=None, help="cue family to patch (default: the first configured one)")
    p = command("report", help="write report/report.html and report/report.md")
    p.add_argument("dir")
    p = command("compare", help="side-by-side report of finished runs (e.g. base model vs organism)")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True, help="folder for compare.html / compare.md")
    p = with_set(command("bench", help="performance ratios measured in one process"))
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--config", default=None, help="config to benchmark (default: configs/default.yaml settings)")
    p = add_set(command("plan", help="memory and cost of a config before any weights load (exit 2: does not fit)"))
    p.add_argument("config")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs to plan for")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB (10^9 bytes), 80GiB, 24G (GiB)")
    p.add_argument("--margin", type=float, default=None, help="fraction of every device's memory kept free (0.1)")
    p.add_argument("--json", default=None, help="also write all numbers to this file")
    p = command("lens", help="logit lens of a saved direction: the tokens it promotes and suppresses")
    p.add_argument("direction", help="a direction file (probes/directions/*.safetensors)")
    p.add_argument("--config", default=None, help="load the model named by this config")
    p.add_argument("--model", default=None, help="model spec (default: the direction file's metadata)")
    p.add_argument("--k", type=int, default=10, help="tokens per side")
    p.add_argument("--json", default=None, help="also write the tokens and scores to this file")
    p = with_set(command("organism", help="train an organism's LoRA adapter (a positive control: planted-gap, semantic-gap)"))
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-evaluate the adapter already in --out (its weights and training.json are kept)")
    p = command("sweep", help="a grid of runs (cells) from a sweep file, and one comparison (sweep.csv/.html/.md)")
    p.add_argument("sweep", nargs="?", help="the sweep file (YAML)")
    p.add_argument("--out", default=None, help="sweep folder (cells go to DIR/cells/)")
    p.add_argument("--status", default=None, metavar="DIR", help="list the cells of DIR as done/running/failed/pending")
    p.add_argument("--dry-run", action="store_true", help="validate, print the cells and their reuse, write the job script")
    p = command("judge-eval", help="validate the configured judge against labelled reasoning traces")
    p.add_argument("config")
    p.add_argument("labels", help="JSONL: one {\"text\": trace, \"label\": 0 or 1} per line")
    p.add_argument("--json", default=None, help="also write the metrics and per-trace scores to this file")
    p.add_argument("--cache", default=None, help="folder of the verdict cache (default: runs/judge-cache)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key by dotted path, e.g. --set judge.votes=3")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    from afprobe import pipeline

    quiet = getattr(args, "quiet", False)
    force = getattr(args, "force", False)
    if getattr(args, "wait", False):
        from afprobe.rundir import set_lock_wait

        set_lock_wait(True)
    if args.command == "run":
        pipeline.run_all(args.config, args.out, args.overrides, force=force, quiet=quiet)
    elif args.command == "cache":
        pipeline.run_cache(args.config, Path(args.out), args.overrides, force=force, quiet=quiet)
    elif args.command == "prompts":
        pipeline.write_prompts(args.config, Path(args.out), args.overrides)
    elif args.command == "probe":
        pipeline.run_probe(Path(args.dir), args.overrides, force=force, quiet=quiet)
    elif args.command == "steer":
        pipeline.run_steer(Path(args.dir), args.overrides, force=force, quiet=quiet)
    elif args.command == "patch":
        from afprobe.patching import run_patch

        run_patch(Path(args.dir), args.layers, args.positions, args.sites, args.n_queries, args.family, quiet=quiet)
    elif args.command == "report":
        pipeline.run_report(Path(args.dir), quiet=quiet)
    elif args.command == "compare":
        from afprobe.analysis.compare import write_comparison

        paths = write_comparison([Path(d) for d in args.dirs], Path(args.out))
        print(f"comparison: {paths['html']}")
    elif args.command == "bench":
        from afprobe.bench import run_bench

        run_bench(args.config, args.overrides, args.json, quiet=quiet)
    elif args.command == "plan":
        from afprobe.activations.plan import plan_cli

        plan_cli(args.config, args.overrides, args.gpus, args.gpu_memory, args.margin, args.json, quiet=quiet)
    elif args.command == "organism":
        from afprobe.organism.main import train_organism_cli

        train_organism_cli(args.config, Path(args.out), args.overrides, quiet=quiet, evaluate_only=args.evaluate_only)
    elif args.command == "sweep":
        from afprobe.sweep import run_sweep, sweep_status

        if args.status:
            code = sweep_status(args.status)
        elif not args.sweep or not args.out:
            raise BadInput("afprobe sweep: give SWEEP.yaml --out DIR, or --status DIR")
        elif args.dry_run:
            from afprobe.sweep import dry_run

            code = dry_run(args.sweep, args.out)
        else:
            code = run_sweep(args.sweep, args.out, quiet=quiet)
        if code:
            raise SystemExit(code)
    elif args.command == "lens":
        from afprobe.lens_cli import lens_cli

        lens_cli(args.direction, args.config, args.model, args.k, args.json)
    elif args.command == "judge-eval":
        from afprobe.judging import judge_eval

        judge_eval(args.config, args.labels, args.json, args.overrides, args.cache, quiet=quiet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from afprobe.log import configure

    try:
        args = build_parser().parse_args(argv)
        configure(args.quiet, args.verbose)
        from afprobe.plugins import load_plugins

        load_plugins()  # $AFPROBE_PLUGINS: modules registering scorers, probe methods, cue families, adapters
        _dispatch(args)
    except BadInput as err:
        print(f"afprobe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afprobe: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except Exception:  # noqa: BLE001 - anything unexpected is exit 1 with the traceback
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
