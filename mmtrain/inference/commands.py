"""The commands that use a trained model: evaluate, embed, search, classify, caption, serve.

Their parser blocks and `cmd_X(args, h)` live here rather than in ray_job.py, which keeps the
data, training and cluster commands (and stays under the 450-line limit of
tests/test_structure.py). As thin as ray_job.py's commands: parse, call mmtrain/, print.
Torch-free at import: every command line builds this parser. `h` carries ray_job.py's shared
pieces (the --address/--storage-options flags and how they are read), so every command has the
same flags and the same one-line errors.
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class CommandHelpers:
    common: Callable            # common(sp, storage=True): adds --address (and --storage-options)
    storage_options: Callable   # storage_options(args) -> dict, a one-line UserError on bad JSON
    set_address: Callable       # set_address(args): --address -> RAY_ADDRESS


def add_use_commands(sub, h: CommandHelpers) -> None:
    for add in (_evaluate_command, _embed_command, _search_command, _classify_command, _caption_command,
                _serve_command):
        add(sub, h)


def _model_arg(sp) -> None:
    sp.add_argument("--model", required=True, help="a run directory (its latest checkpoint) or an exported .safetensors")


def _pool_args(sp, batch_size: int) -> None:
    sp.add_argument("--workers", type=int, default=2, metavar="N", help="model actors (default 2)")
    sp.add_argument("--batch-size", type=int, default=batch_size, metavar="B",
                    help=f"samples per forward pass (default {batch_size})")
    sp.add_argument("--gpus-per-worker", type=float, default=0, metavar="G", help="GPUs per model actor (default 0)")


# --- evaluate -----------------------------------------------------------------------------

def _evaluate_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("evaluate", help="retrieval recall@k, zero-shot accuracy, caption loss and BLEU-4 "
                                         "of a run's latest checkpoint (or an exported model)")
    sp.add_argument("--run-dir", "--model", dest="run_dir", required=True,
                    help="the run whose latest checkpoint is evaluated, or an exported model.safetensors")
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="held-out data (raw or preprocessed)")
    sp.add_argument("--output", help="write the results JSON here")
    _pool_args(sp, 64)
    sp.add_argument("--labels", help="zero-shot labels L1,L2,... that captions name (default: the corpus's "
                                     "subject names from its _corpus.json, when the data has one)")
    sp.add_argument("--template", default="a photo of {}", help="the zero-shot prompt (default 'a photo of {}')")
    sp.add_argument("--caption-max-len", type=int, default=None,
                    help="tokens per generated caption (default: the model's max_text_len)")
    sp.add_argument("--mlflow", metavar="URI", help="log the results into the run's MLflow run, tracked at URI "
                                                    "(default: the one RUN/mlflow.json records, else none)")
    h.common(sp)
    sp.set_defaults(fn=functools.partial(cmd_evaluate, h=h))


def cmd_evaluate(args, h: CommandHelpers) -> int:
    from mmtrain.evaluate import evaluate, parse_labels
    from mmtrain.mlflow_tracking import log_evaluation

    h.set_address(args)
    result = evaluate(args.run_dir, args.data, output=args.output, batch_size=args.batch_size,
                      workers=args.workers, gpus_per_worker=args.gpus_per_worker, labels=parse_labels(args.labels),
                      template=args.template, caption_max_len=args.caption_max_len,
                      storage_options=h.storage_options(args))
    print(json.dumps(result, indent=1, sort_keys=True))
    log_evaluation(args.run_dir, result, args.mlflow)  # into the run's MLflow run, if it has one
    return 0


# --- embed --------------------------------------------------------------------------------

def _embed_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("embed", help="embed a corpus with a trained model into a Lance table (resumable)")
    _model_arg(sp)
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="raw shards or preprocessed output")
    sp.add_argument("--output", required=True,
                    help="a new or empty folder: embeddings.lance, quarantine.lance, embed.json; re-run to resume")
    _pool_args(sp, 64)
    sp.add_argument("--shards-per-commit", type=int, metavar="N",
                    help="shards per Lance commit: what a kill can make a re-run redo (default: about an eighth "
                         "of the shards; a commit comes sooner when the rows waiting reach 256 MiB)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    h.common(sp)
    sp.set_defaults(fn=functools.partial(cmd_embed, h=h))


def cmd_embed(args, h: CommandHelpers) -> int:
    from .embed_job import EmbedConfig, embed, format_summary

    h.set_address(args)
    cfg = EmbedConfig(model=args.model, data=tuple(args.data), output=args.output, workers=args.workers,
                      batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
                      shards_per_commit=args.shards_per_commit, storage_options=h.storage_options(args),
                      progress=not args.quiet)
    info = embed(cfg, say=lambda line: print(line, file=sys.stderr))
    print(format_summary(info, args.output))
    return 0


# --- search -------------------------------------------------------------------------------

def _search_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("search", help="cross-modal nearest neighbours in an `embed` output")
    sp.add_argument("--index", required=True, metavar="OUT", help="the output folder (or URL) of `embed`")
    query = sp.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", metavar="FILE", help="an image query (JPEG, PNG, WebP)")
    query.add_argument("--audio", metavar="FILE", help="an audio query (WAV, FLAC, OGG, MP3)")
    sp.add_argument("--target", choices=("image", "text", "audio"),
                    help="the modality to find (default: image for a text query, text otherwise)")
    sp.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    sp.add_argument("--json", action="store_true", help="a JSON list of {key, source, caption, score, id}")
    sp.add_argument("--model", help="embed the query with this model (default: the one OUT/embed.json names)")
    sp.add_argument("--storage-options", metavar="JSON", help="fsspec options for OUT and the model's storage")
    sp.set_defaults(fn=functools.partial(cmd_search, h=h))


def cmd_search(args, h: CommandHelpers) -> int:
    from .search import format_results, read_query_file, search_corpus

    if args.text is not None:
        item = {"text": args.text}
    else:
        path, modality = (args.image, "image") if args.image is not None else (args.audio, "audio")
        item = {modality: read_query_file(path, modality)}
    results = search_corpus(args.index, item, target=args.target, k=args.k, model=args.model,
                            storage_options=h.storage_options(args))
    print(json.dumps(results, indent=1) if args.json else format_results(results))
    return 0


# --- classify -----------------------------------------------------------------------------

def _classify_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("classify", help="zero-shot classification of every sample into one of --labels")
    _model_arg(sp)
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="raw or preprocessed shards")
    sp.add_argument("--labels", required=True, metavar="L1,L2,...", help="the classes, comma-separated (2 or more)")
    sp.add_argument("--template", default="a photo of {}", help="the prompt, {} the label (default 'a photo of {}')")
    sp.add_argument("--output", required=True, metavar="FILE.jsonl", help="one JSON line per sample")
    _pool_args(sp, 64)
    h.common(sp)
    sp.set_defaults(fn=functools.partial(cmd_classify, h=h))


def cmd_classify(args, h: CommandHelpers) -> int:
    from .classify import classify, format_summary

    h.set_address(args)
    labels = [label.strip() for label in args.labels.split(",")]
    result = classify(args.model, args.data, labels, args.template, output=args.output, workers=args.workers,
                      batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
                      storage_options=h.storage_options(args))
    print(format_summary(result))
    return 0


# --- caption ------------------------------------------------------------------------------

def _caption_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("caption", help="caption a corpus with the model's caption decoder, one JSON line per sample")
    _model_arg(sp)
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="raw or preprocessed shards")
    sp.add_argument("--output", required=True, metavar="FILE.jsonl",
                    help="lines of key, source, caption (written whole, or not at all)")
    sp.add_argument("--max-len", type=int, metavar="N",
                    help="longest caption in tokens, BOS and EOS included (default and cap: the model's max_text_len)")
    sp.add_argument("--beams", type=int, default=1, metavar="K",
                    help="beam width; 1 is greedy (default 1); captions ranked by mean log-probability per token")
    _pool_args(sp, 32)
    h.common(sp)
    sp.set_defaults(fn=functools.partial(cmd_caption, h=h))


def cmd_caption(args, h: CommandHelpers) -> int:
    from .caption import caption

    h.set_address(args)
    summary = caption(args.model, args.data, args.output, max_len=args.max_len, beams=args.beams,
                      workers=args.workers, batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
                      storage_options=h.storage_options(args))
    print(format_caption_summary(summary))
    return 0


def format_caption_summary(summary: dict) -> str:
    """The count, the settings, and two example captions."""
    expected, samples = summary["expected"], summary["samples"]
    skipped = "" if expected in (None, samples) else \
        f" ({expected - samples} of {expected} could not be decoded: see the warnings)"
    if summary.get("rejected"):
        skipped += (f"; {summary['rejected']} could not be read or decoded: in the output with caption null, "
                    f"their reason and detail")
    lines = [f"captioned {samples} samples in {summary['seconds']} s (beams {summary['beams']}, max length "
             f"{summary['max_len']}; {summary['empty_captions']} empty){skipped}: {summary['output']}"]
    return "\n".join(lines + [f"  {row['key']}: {row['caption']}" for row in summary["examples"]])


# --- serve --------------------------------------------------------------------------------

def _absolute(path: str) -> str:
    """A local path as the replicas see it: they run in Ray's worker folders, not in ours."""
    import os

    return path if "://" in path else os.path.abspath(path)


def _serve_command(sub, h: CommandHelpers) -> None:
    sp = sub.add_parser("serve", help="the model over HTTP (Ray Serve): /embed /search /classify /caption /healthz")
    sp.add_argument("--model", required=True, help="a run directory or an exported .safetensors")
    sp.add_argument("--index", metavar="OUT", help="an `embed` output for /search")
    sp.add_argument("--host", default="127.0.0.1", help="listen here (default 127.0.0.1; there is no authentication)")
    sp.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000)")
    sp.add_argument("--replicas", type=int, default=1, help="copies of the model answering requests (default 1)")
    sp.add_argument("--gpus-per-replica", type=float, default=0, metavar="G", help="GPUs per model replica (default 0: CPU)")
    h.common(sp)
    sp.set_defaults(fn=functools.partial(cmd_serve, h=h))


def cmd_serve(args, h: CommandHelpers) -> int:
    from .serve import ServeConfig, serve_forever

    h.set_address(args)
    cfg = ServeConfig(model=_absolute(args.model), index=args.index and _absolute(args.index), host=args.host,
                      port=args.port, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                      storage_options=h.storage_options(args))
    serve_forever(cfg, say=lambda line: print(line, flush=True), warn=lambda line: print(line, file=sys.stderr))
    return 0
