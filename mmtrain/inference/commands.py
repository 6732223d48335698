"""`ray_job.py caption`: its parser block and its `cmd_caption(args)`, kept here rather than in
ray_job.py, which is at the 450-line limit of tests/test_structure.py. Thin as ray_job.py's
commands are: parse, build the settings (`CaptionSettings`), call `caption.caption`. Torch-free
at import: every command builds this parser."""
from __future__ import annotations

from typing import Callable


def add_caption_command(sub, common: Callable, storage_options_of: Callable, set_address: Callable) -> None:
    """The `caption` subcommand; `common`, `storage_options_of` and `set_address` are
    ray_job.py's (--address and --storage-options: the same flags and errors as every command)."""
    sp = sub.add_parser("caption", help="caption a corpus with the model's caption decoder, one JSON line per sample")
    sp.add_argument("--model", required=True, help="a run directory (its latest checkpoint) or an exported .safetensors")
    sp.add_argument("--data", nargs="+", required=True, metavar="DATA", help="raw or preprocessed shards")
    sp.add_argument("--output", required=True, metavar="FILE.jsonl",
                    help="lines of key, source, caption (written whole, or not at all)")
    sp.add_argument("--max-len", type=int, metavar="N",
                    help="longest caption in tokens, BOS and EOS included (default and cap: the model's max_text_len)")
    sp.add_argument("--beams", type=int, default=1, metavar="K",
                    help="beam width; 1 is greedy (default 1); captions ranked by mean log-probability per token")
    sp.add_argument("--workers", type=int, default=2, metavar="N", help="model actors (default 2)")
    sp.add_argument("--batch-size", type=int, default=32, metavar="B", help="samples per generation call (default 32)")
    sp.add_argument("--gpus-per-worker", type=float, default=0, metavar="G", help="GPUs per model actor (default 0)")
    common(sp)
    sp.set_defaults(fn=lambda args: cmd_caption(args, storage_options_of(args), set_address))


def cmd_caption(args, storage_options: dict, set_address: Callable) -> int:
    from .caption import caption

    set_address(args)
    summary = caption(args.model, args.data, args.output, max_len=args.max_len, beams=args.beams,
                      workers=args.workers, batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker,
                      storage_options=storage_options)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The count, the settings, and two example captions."""
    expected, samples = summary["expected"], summary["samples"]
    skipped = "" if expected in (None, samples) else \
        f" ({expected - samples} of {expected} could not be decoded: see the warnings)"
    lines = [f"captioned {samples} samples in {summary['seconds']} s (beams {summary['beams']}, max length "
             f"{summary['max_len']}; {summary['empty_captions']} empty){skipped}: {summary['output']}"]
    return "\n".join(lines + [f"  {row['key']}: {row['caption']}" for row in summary["examples"]])
