"""Command line: ``python -m lrp_ray.sweep`` and the ``lrp-ray`` console script."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import interrupts
from .errors import EXIT_INTERRUPTED
from .spec import BadRequest, SweepSpec, load_spec, merge_flags

__all__ = ["main", "build_parser"]

EPILOG = """\
Flags override the keys of --spec; keys left out of both take the defaults shown.
With no request at all (no --spec, --config, --weights, --images, --layers, --features): the bundled
demo model and sample images, features 0-3 of every encoder and decoder layer, and every detected car
(its concepts at every layer, their conditional maps, faithfulness), into ./lrp_out.

Detection targets (--target detections|both): relevance starts at each selected detection's class logit
and goes down to the input tokens once; at every requested layer each channel's relevance is a concept
(concepts/), and each detection's --top-concepts channels get a heatmap conditioned on them
(concept_maps/); detections/ lists the explained detections (box, score, map), concepts_by_class.csv
ranks the features each class uses, faithfulness/ (--faithfulness) holds deletion curves and the
pointing game.

Results (OUT): relevance/ (Parquet, partitioned by module and layer; pandas.read_parquet(OUT/"relevance")),
detection targets' detections/, concepts/, concept_maps/, faithfulness/ and concepts_by_class.csv,
--pixels' pixels/ (pixel maps of each feature's reference rows),
summary.csv, errors.csv (images that could not be used, with the reason), manifest.json.
Re-running the same request into the same OUT resumes it, with any "running" settings (actors, device,
cache budget, ...: they never change a number); a different request into a non-empty OUT is refused
unless --overwrite, naming what differs. Batch size and image order are part of the request (DETR pads a
batch to its largest image). Byte-identical images under different names are all processed (manifest.json
lists them under duplicate_images). An HTML report of OUT: python -m lrp_ray.report OUT

Ray: --address local starts a private Ray instance bound to 127.0.0.1; inside `ray job submit` the job's
cluster is used ($RAY_ADDRESS), and a relative --out is resolved against $LRP_RAY_RESULTS
(default ~/lrp_ray_results) on the head node, since the job's working dir is temporary.

Exit codes:
  0  all work done, every image used
  1  all work done, but some images could not be used (see errors.csv)
  2  bad request (unknown key, index out of range, missing files, OUT in use by another sweep, ...);
     nothing was started
  3  incomplete: some work items failed, no worker was left, a planned part is missing from OUT or
     requested heatmaps failed; run the same command again to resume
  4  results could not be written (disk full, read-only or blocked OUT); what OUT holds is complete
     (no partial files): fix the cause, then run the same command again to resume
  130 interrupted (Ctrl-C or SIGTERM); run the same command again to resume
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (bad request)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_or_auto(text: str) -> int | str:
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _default(name: str) -> str:
    field = SweepSpec.model_fields[name]
    default = field.default_factory() if field.default_factory is not None else field.default
    if default is None:
        return ""
    if isinstance(default, bool):
        return f" (default: {'on' if default else 'off'})"
    return f" (default: {default})"


def _help(name: str, extra: str = "") -> str:
    return (SweepSpec.model_fields[name].description or "") + extra + _default(name)


def build_parser(prog: str = "lrp-ray") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Layer-wise Relevance Propagation sweeps over DETR encoder/decoder "
                                       "features, distributed with Ray.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("request")
    g.add_argument("--spec", metavar="FILE", help="YAML job file with spec keys (see jobs/)")
    g.add_argument("--config", metavar="FILE", help=_help("config"))
    g.add_argument("--weights", metavar="FILE", help=_help("weights"))
    g.add_argument("--opt", metavar="KEY=VALUE", action="append", dest="overrides",
                   help="config override, repeatable (e.g. --opt MODEL.DETR.NUM_OBJECT_QUERIES=50)")
    g.add_argument("--images", metavar="DIR|GLOB", help=_help("images", "; jpg/jpeg/png/bmp/tif/webp"))
    g.add_argument("--module", choices=["encoder", "decoder", "both"], help=_help("module"))
    g.add_argument("--layers", metavar="SPEC", help=_help("layers"))
    g.add_argument("--features", metavar="SPEC", help=_help("features"))
    g.add_argument("--queries", metavar="SPEC", help=_help("queries"))
    g.add_argument("--rules", choices=["cp", "attnlrp"], help=_help("rules"))
    g.add_argument("--epsilon", type=float, help=_help("epsilon"))
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help=_help("precision"))
    g.add_argument("--batch-size", type=int, metavar="N", help=_help("batch_size"))
    g.add_argument("--feature-chunk", type=_int_or_auto, metavar="K|auto", help=_help("feature_chunk"))
    d = p.add_argument_group("detection targets (concept relevance of detections)")
    d.add_argument("--target", choices=["features", "detections", "both"], help=_help("target"))
    d.add_argument("--detections", metavar="SEL", help=_help("detections"))
    d.add_argument("--top-concepts", type=int, metavar="K", help=_help("top_concepts"))
    d.add_argument("--class-names", metavar="FILE", help=_help("class_names"))
    d.add_argument("--faithfulness", action="store_true", default=None, help=_help("faithfulness"))
    x = p.add_argument_group("pixel maps (LRP through input_proj and the backbone to the image)")
    x.add_argument("--pixels", metavar="topN", help=_help("pixels"))
    x.add_argument("--pixel-composite", metavar="NAME", help=_help("pixel_composite"))
    x.add_argument("--pixel-max-side", type=int, metavar="PX", help=_help("pixel_max_side"))
    r = p.add_argument_group("running")
    r.add_argument("--out", metavar="DIR", help=_help("out"))
    r.add_argument("--actors", type=_int_or_auto, metavar="N|auto", help=_help("actors"))
    r.add_argument("--gpus-per-actor", type=float, metavar="F", help=_help("gpus_per_actor"))
    r.add_argument("--cpus-per-actor", type=int, metavar="N", help=_help("cpus_per_actor"))
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help=_help("device"))
    r.add_argument("--compile", action="store_true", default=None, help=_help("compile"))
    r.add_argument("--address", metavar="local|auto|ray://HOST:PORT", help=_help("address"))
    x = r.add_mutually_exclusive_group()
    x.add_argument("--resume", action="store_true", default=None, help=_help("resume"))
    x.add_argument("--overwrite", action="store_true", default=None, help=_help("overwrite"))
    r.add_argument("--heatmaps", action="store_true", default=None, help=_help("heatmaps"))
    r.add_argument("--cache-budget-mb", type=int, metavar="MIB", help=_help("cache_budget_mb"))
    r.add_argument("--max-in-flight", type=int, metavar="N", help=_help("max_in_flight"))
    r.add_argument("--ping-timeout", type=float, metavar="S", dest="ping_timeout_s",
                   help=_help("ping_timeout_s"))
    r.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


_NOT_SPEC = {"spec", "no_progress"}

DEMO_FEATURES = "0-3"
"""Features swept on the bundled demo when nothing else is asked: every layer, a few features, so the
first run (and its --heatmaps) finishes in about a minute on 2 CPU cores."""
_REQUEST_KEYS = ("config", "weights", "images", "layers", "features")
DEMO_DETECTIONS = "class=car"
"""Detections explained on the bundled demo when nothing else is asked: every car the model finds."""
_DETECTION_KEYS = ("target", "detections", "top_concepts", "class_names", "faithfulness")


def parse_request(argv: Sequence[str] | None = None, prog: str = "lrp-ray") -> tuple[SweepSpec, Any]:
    args = build_parser(prog).parse_args(argv)
    data = load_spec(args.spec) if args.spec else {}
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SPEC}
    if not args.spec and all(flags.get(k) is None for k in _REQUEST_KEYS):
        flags["features"] = DEMO_FEATURES  # the bundled demo: a quick first run
        if all(flags.get(k) is None for k in _DETECTION_KEYS):  # ... that also explains the demo's cars
            flags.update(target="both", detections=DEMO_DETECTIONS, faithfulness=True)
        elif flags.get("target") is None:  # detection options alone: on top of the demo's features
            flags["target"] = "both"
            flags.setdefault("detections", None)
            flags["detections"] = flags["detections"] or DEMO_DETECTIONS
    return merge_flags(data, flags), args


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m lrp_ray.sweep" if sys.argv and sys.argv[0].endswith("__main__.py") else "lrp-ray"
    interrupts.install()  # Ctrl-C and SIGTERM (timeouts, Slurm, docker stop) stop at the next safe point
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:  # before or after the sweep's own handling (Ray start-up, model load)
        print(f"{prog}: interrupted; finished work items are kept: run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        interrupts.uninstall()


def _main(argv: Sequence[str] | None, prog: str) -> int:
    try:
        try:
            spec, args = parse_request(argv, prog)
        except SystemExit as exc:  # --help (0) or a flag argparse refused (2)
            return int(exc.code or 0)
        from .preparation import prepare

        interrupts.check()
        prep = prepare(spec)
    except BadRequest as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    from .cluster import bind_local_to_loopback
    from .execution import execute

    if spec.address == "local" or (spec.address is None and not os.environ.get("RAY_ADDRESS")):
        bind_local_to_loopback()

    def log_fn(line: str) -> None:
        print(line, flush=True)

    try:
        result = execute(prep, log_fn=log_fn, progress=False if args.no_progress else None)
    except BadRequest as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if result.manifest.get("error"):
        print(f"{prog}: error: {result.manifest['error']}", file=sys.stderr, flush=True)
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
