"""The ``mcpm`` command: one thin function per subcommand.

Every subcommand that takes a config also takes ``key=value`` overrides with dotted paths
(``model.hidden_size=128 generate.temperature=0.7``).

A user's mistake (a bad config, path, checkpoint, tokenizer or data source: a
:class:`mcpm.config.UserError`, or a missing, existing or unwritable file) is reported as
``mcpm COMMAND: error: MESSAGE`` with exit status 2; a traceback means a bug, and ``--debug``
(or ``MCPM_DEBUG=1``) shows it for any error.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from mcpm.config import UserError

DEFAULT_PROMPT = "def fibonacci(n):"


def _overrides_and_extras(items: list[str]) -> list[str]:
    bad = [x for x in items if "=" not in x]
    if bad:
        raise UserError(f"unexpected argument(s) {bad}; overrides look like key=value (e.g. "
                        "model.hidden_size=128)")
    return items


# -- convert ---------------------------------------------------------------------------------

def cmd_convert_from_hf(args) -> int:
    from mcpm.checkpoint import save_checkpoint
    from mcpm.hf import check_output_dir, read_hf_checkpoint

    check_output_dir(args.out, args.overwrite)  # before reading every tensor
    dtype = None if args.dtype == "keep" else args.dtype
    cfg, hf_config, params = read_hf_checkpoint(args.hf_dir, dtype=_np_dtype(dtype), progress=True)
    save_checkpoint(args.out, cfg, params, hf_config_template=hf_config,
                    aux_dir=args.hf_dir, overwrite=args.overwrite)
    print(f"wrote mcpm checkpoint {args.out} ({cfg.num_params() / 1e6:.1f}M parameters)")
    return 0


def cmd_convert_to_hf(args) -> int:
    from mcpm.api import load_params
    from mcpm.hf import check_output_dir, parse_size, write_hf_checkpoint

    parse_size(args.max_shard_size, "--max-shard-size")  # refuse before reading SRC
    check_output_dir(args.out, args.overwrite)
    cfg, template, params = load_params(args.src, progress=True)
    if args.dtype != "keep":
        params = {k: v.astype(_np_dtype(args.dtype)) for k, v in params.items()}
    write_hf_checkpoint(params, cfg, args.out, hf_config_template=template,
                        aux_dir=args.src, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, progress=True)
    print(f"wrote Hugging Face checkpoint {args.out}")
    return 0


def _np_dtype(name):
    if name is None:
        return None
    import ml_dtypes
    import numpy as np
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


# -- init / config ---------------------------------------------------------------------------

def cmd_init(args) -> int:
    from flax import nnx

    from mcpm.api import params_of
    from mcpm.checkpoint import save_checkpoint
    from mcpm.config import load_config
    from mcpm.hf import check_output_dir
    from mcpm.model import MiniCPM4

    cfg = load_config(args.config, _overrides_and_extras(args.overrides))
    check_output_dir(args.out, args.overwrite)
    if args.tokenizer is not None:
        _check_tokenizer_dir(args.tokenizer)
    model = MiniCPM4(cfg.model, rngs=nnx.Rngs(cfg.seed))
    save_checkpoint(args.out, cfg.model, params_of(model), aux_dir=args.tokenizer,
                    overwrite=args.overwrite)
    print(f"wrote randomly initialised checkpoint {args.out} "
          f"({cfg.model.num_params() / 1e6:.2f}M parameters)")
    return 0


def _check_tokenizer_dir(path: str) -> None:
    """``--tokenizer``: a directory holding tokenizer files (a tokenizer.model must load)."""
    from mcpm.hf import AUX_FILES
    from mcpm.tokenizer import TOKENIZER_FILE, Tokenizer

    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"--tokenizer {path} does not exist; give the directory that "
                                f"holds {TOKENIZER_FILE} (e.g. from `mcpm tokenizer train`)")
    if not d.is_dir():
        raise UserError(f"--tokenizer {path} is a file; give the directory that holds it "
                        f"({d.parent})")
    names = [n for n in AUX_FILES if n != "generation_config.json" and (d / n).is_file()]
    if not names:
        raise UserError(f"--tokenizer {path} holds no tokenizer files ({TOKENIZER_FILE}, "
                        "tokenizer.json, ...); give the directory of a trained tokenizer "
                        "(`mcpm tokenizer train --out DIR`)")
    if TOKENIZER_FILE in names:
        Tokenizer(d)  # refuses a file that is not a SentencePiece model


def cmd_config_show(args) -> int:
    import yaml

    from mcpm.config import load_config, to_dict
    cfg = load_config(args.config, _overrides_and_extras(args.overrides))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


# -- tokenizer ---------------------------------------------------------------------------------

def cmd_tokenizer_train(args) -> int:
    from mcpm.data.builtin_corpus import stdlib_source_files
    from mcpm.tokenizer import train_tokenizer

    files = args.input or stdlib_source_files()
    t0 = time.time()
    path = train_tokenizer(files, args.out, vocab_size=args.vocab_size,
                           max_sentences=args.max_sentences)
    print(f"trained a {args.vocab_size}-piece SentencePiece model on {len(files)} file(s) in "
          f"{time.time() - t0:.1f}s: {path}")
    return 0


# -- generate ----------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from mcpm.api import from_pretrained, load_params, model_from_params
    from mcpm.quant.packed import is_packed_checkpoint
    from mcpm.config import Config, load_config
    from mcpm.generation import stream_generate
    from mcpm.tokenizer import Tokenizer

    overrides = _overrides_and_extras(args.overrides)
    run_cfg = load_config(None, overrides, Config)
    # a checkpoint fixes the model; only how to run it may change
    run_keys = {"model.param_dtype", "model.compute_dtype"}
    keys = [o.split("=", 1)[0] for o in overrides]
    fixed = [k for k in keys if k.startswith("model.") and k not in run_keys]
    if fixed:
        raise UserError(f"only {sorted(run_keys)} can be overridden for a trained checkpoint, "
                        f"not {fixed}: its model is fixed")
    run_opts = {k[len("model."):]: getattr(run_cfg.model, k[len("model."):])
                for k in keys if k in run_keys}
    if is_packed_checkpoint(args.checkpoint):   # runs packed: ternary bytes unpacked per layer
        model = from_pretrained(args.checkpoint, **run_opts)
        cfg = model.config
    else:
        cfg, _, params = load_params(args.checkpoint, **run_opts)
        model = model_from_params(cfg, params)
    tok = Tokenizer(args.tokenizer or args.checkpoint, cfg.bos_token_id, cfg.eos_token_id)
    gen = run_cfg.generate
    prompt_ids = tok.encode(args.prompt)
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = ""
    t0 = time.time()
    for step in stream_generate(model, [prompt_ids], gen.max_new_tokens,
                                temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                seed=gen.seed):
        new.append(int(step[0]))
        text = tok.decode(new)
        if text.startswith(shown):  # print only what is new (pieces may merge)
            print(text[len(shown):], end="", flush=True)
            shown = text
    dt = time.time() - t0
    print(f"\n[{len(new)} tokens in {dt:.2f}s, {len(new) / max(dt, 1e-9):.1f} tok/s incl. "
          "compile]", file=sys.stderr)
    return 0


# -- train / aot --------------------------------------------------------------------------------

# bare keys accepted by `mcpm train` / `mcpm aot` for the train section's most used fields
TRAIN_ALIASES = ("workdir", "steps", "decay_from", "decay_steps", "init_from")


def load_with_aliases(path: str, items: list[str], aliases: tuple[str, ...], prefix: str):
    """The config at ``path`` with ``key=value`` ``items``, where a bare key in ``aliases`` is
    short for ``PREFIX.key``; errors quote the overrides as typed."""
    from mcpm.config import ConfigError, load_config
    typed = _overrides_and_extras(items)
    full = [f"{prefix}{x}" if x.split("=", 1)[0] in aliases else x for x in typed]
    try:
        return load_config(path, full)
    except ConfigError as e:
        message = str(e)
        for item in typed:
            if item.split("=", 1)[0] in aliases:
                message = message.replace(f"override {prefix}{item}", f"override {item}")
        raise ConfigError(message) from None


def _load_train_config(args):
    """``args.config`` with the train overrides (``steps=`` etc. short for ``train.steps=``)."""
    return load_with_aliases(args.config, list(args.overrides), TRAIN_ALIASES, "train.")


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` from flags or MCPM_COORDINATOR / MCPM_NUM_PROCESSES /
    MCPM_PROCESS_ID; ``--distributed auto`` lets JAX detect a TPU pod or cluster itself."""
    import os

    import jax
    coordinator = args.coordinator or os.environ.get("MCPM_COORDINATOR")
    if args.distributed == "off" or (args.distributed == "flags" and not coordinator):
        return
    if args.distributed == "auto":
        jax.distributed.initialize()
        return
    num = args.num_processes or int(os.environ.get("MCPM_NUM_PROCESSES", "0"))
    pid = args.process_id if args.process_id is not None else \
        int(os.environ.get("MCPM_PROCESS_ID", "-1"))
    if num < 1 or pid < 0:
        raise UserError("--coordinator needs --num-processes and --process-id (or "
                        "MCPM_NUM_PROCESSES and MCPM_PROCESS_ID)")
    if os.environ.get("JAX_PLATFORMS") == "cpu":  # CPU processes talk through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)


def cmd_train(args) -> int:
    return _train(args)[0]


def _train(args) -> tuple[int, dict | None]:
    """(exit status, the run's summary or None)."""
    from mcpm.train.loop import TrainingError, train

    cfg = _load_train_config(args)
    init_distributed(args)
    try:
        summary = train(cfg, progress=not args.no_progress, reinit=args.reinit,
                        restart_data=args.restart_data, confirm_schedule_change=args.yes)
    except TrainingError as e:
        print(f"mcpm train: stopped: {e}", file=sys.stderr)
        return 1, None
    if summary["preempted"]:
        how = "Ctrl-C" if summary["signal"] == "SIGINT" else summary["signal"]
        print(f"mcpm train: {how}: saved a checkpoint at step {summary['step']} in "
              f"{summary['run_dir']}; run the same command to resume", file=sys.stderr)
        # a preempted job ends cleanly for its scheduler; an interrupted command reports it
        return (130 if summary["signal"] == "SIGINT" else 0), summary
    loss = "n/a" if summary.get("loss") is None else f"{summary['loss']:.4f}"
    if summary.get("eval_loss") is not None:
        loss += f", held-out loss {summary['eval_loss']:.4f}"
    print(f"mcpm train: {summary['note']}; at step {summary['step']}, loss {loss}; "
          f"{summary['run_dir']}" + (f" (plot {summary['plot']})" if summary.get("plot")
                                     else ""))
    return 0, summary


def cmd_aot(args) -> int:
    from mcpm.train.aot import compile_train_step, format_report

    cfg = _load_train_config(args)
    batch = args.batch_size or cfg.data.batch_size
    seq_len = args.seq_len or cfg.data.seq_len
    report = compile_train_step(cfg, args.topology, batch, seq_len)
    print(format_report(report))
    if args.json:
        import json
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["fits"] else 1


# -- demo ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    """The quick start's main job: pretrain the tiny config on the built-in corpus (prepared
    and tokenized once), export the result to the official HF format, generate from it."""
    ns = argparse.Namespace
    print(f"== pretraining {Path(args.config).name} on the built-in corpus (the Python standard "
          "library's sources); the first run prepares the corpus and its tokenizer")
    rc, summary = _train(ns(config=args.config, overrides=list(args.overrides),
                            no_progress=False, distributed="off", coordinator=None,
                            num_processes=None, process_id=None, reinit=False, yes=False,
                            restart_data=False))
    if rc or summary["preempted"]:
        return rc
    from mcpm.train.loop import run_layout
    run_dir = run_layout(_load_train_config(args))[0]
    print("== exporting the trained model to the official Hugging Face format")
    cmd_convert_to_hf(ns(src=str(run_dir / "model"), out=str(run_dir / "hf"), dtype="keep",
                         max_shard_size="5GB", overwrite=True))
    print("== generating (greedy) from the exported checkpoint")
    return cmd_generate(ns(checkpoint=str(run_dir / "hf"), tokenizer=None, prompt=args.prompt,
                           overrides=["generate.max_new_tokens=48"]))


# -- parser --------------------------------------------------------------------------------------

def _int_at_least(lowest: int, text: str) -> int:
    what = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(0, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcpm", description="MiniCPM4 in JAX")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of any error (also MCPM_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="official HF checkpoints <-> mcpm checkpoints")
    csub = conv.add_subparsers(dest="direction", required=True)
    f = csub.add_parser("from-hf", help="HF_DIR -> mcpm checkpoint (orbax)")
    f.add_argument("hf_dir")
    f.add_argument("out")
    f.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="store parameters in this dtype (default: as in the files)")
    f.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    f.set_defaults(func=cmd_convert_from_hf)
    t = csub.add_parser("to-hf", help="mcpm checkpoint (or HF dir) -> official HF format")
    t.add_argument("src")
    t.add_argument("out")
    t.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    t.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.set_defaults(func=cmd_convert_to_hf)

    g = sub.add_parser("generate", help="stream text from a checkpoint")
    g.add_argument("checkpoint", help="mcpm checkpoint or HF directory")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--tokenizer", help="tokenizer.model or its directory (default: checkpoint's)")
    g.add_argument("overrides", nargs="*",
                   help="generate.max_new_tokens=64 generate.temperature=0.8 generate.top_k=50 "
                        "generate.top_p=0.9 generate.seed=0 model.compute_dtype=bfloat16")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("init", help="write a randomly initialised checkpoint for a config")
    i.add_argument("config")
    i.add_argument("out")
    i.add_argument("overrides", nargs="*", help="key=value, e.g. model.num_hidden_layers=2")
    i.add_argument("--tokenizer", help="directory whose tokenizer files to copy in")
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=cmd_init)

    c = sub.add_parser("config", help="inspect configs")
    csub2 = c.add_subparsers(dest="action", required=True)
    s = csub2.add_parser("show", help="print the resolved config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_config_show)

    tk = sub.add_parser("tokenizer", help="SentencePiece tokenizers")
    tsub = tk.add_subparsers(dest="action", required=True)
    tt = tsub.add_parser("train", help="train a tokenizer on local text files")
    tt.add_argument("--input", nargs="*", help="text files (default: the Python stdlib sources)")
    tt.add_argument("--out", required=True, help="directory for tokenizer.model")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--max-sentences", type=int, default=2_000_000)
    tt.set_defaults(func=cmd_tokenizer_train)

    tr = sub.add_parser("train", help="(resume) a sharded WSD pretraining run")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*",
                    help="key=value, e.g. workdir=runs/tiny steps=2000 seed=1 mesh.fsdp=2 "
                         "decay_from=1000 decay_steps=100 data.batch_size=16")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--reinit", action="store_true",
                    help="start over in a workdir that holds a run: the old run directory is "
                         "renamed to NAME.reinit-TIME beside it, never deleted")
    tr.add_argument("--yes", action="store_true",
                    help="accept a changed steps that makes the learning rate jump at the "
                         "resume step (e.g. extending a finished run re-warms it)")
    tr.add_argument("--restart-data", action="store_true",
                    help="resume a checkpoint whose data-iterator state is missing or from an "
                         "older pipeline, starting the data pipeline afresh (its first batches "
                         "are seen again)")
    tr.add_argument("--distributed", choices=["flags", "auto", "off"], default="flags",
                    help="multi-host: 'flags' uses --coordinator/... or MCPM_* variables when "
                         "given; 'auto' lets JAX detect the pod")
    tr.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-host)")
    tr.add_argument("--num-processes", type=int)
    tr.add_argument("--process-id", type=int)
    tr.set_defaults(func=cmd_train)

    a = sub.add_parser("aot", help="compile the train step for a TPU slice (no TPU needed) "
                                   "and report per-device HBM use; exit 1 if it does not fit")
    a.add_argument("config")
    a.add_argument("overrides", nargs="*", help="key=value, e.g. mesh.fsdp=64 mesh.data=-1")
    a.add_argument("--topology", required=True, help="e.g. v5p-64, v5e-256, v4-32, v5p:4x4x2")
    a.add_argument("--batch-size", type=_positive_int,
                   help="global batch (default: data.batch_size)")
    a.add_argument("--seq-len", type=_positive_int, help="default: data.seq_len")
    a.add_argument("--json", help="also write the report to this file")
    a.set_defaults(func=cmd_aot)

    d = sub.add_parser("demo", help="end-to-end demo on the tiny config (quick start)")
    d.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs"
                                           / "tiny.yaml"))
    d.add_argument("--prompt", default=DEFAULT_PROMPT)
    d.add_argument("overrides", nargs="*", help="key=value for the training run, e.g. steps=50")
    d.set_defaults(func=cmd_demo)

    from mcpm.tunnel.cli import register
    register(sub)
    from mcpm.quant.cli import register as register_quant
    register_quant(sub)
    return p


# -- errors ---------------------------------------------------------------------------------------

# OS errors that are the user's to fix (a path, its permissions, the disk), with what to do
_OS_HINTS = {errno.ENOENT: "check the path", errno.EEXIST: "choose another path",
             errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
             errno.EISDIR: "give a file", errno.ENOTDIR: "check the path",
             errno.ENAMETOOLONG: "use a shorter path", errno.EROFS: "write elsewhere",
             errno.ENOSPC: "free some space or write elsewhere",
             errno.EDQUOT: "free some space or write elsewhere"}


def _user_message(e: BaseException) -> str | None:
    """The one-paragraph message for an error the user can fix, or None for a bug."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _OS_HINTS and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where + ': ' if e.filename else ''}{e.strerror}; {_OS_HINTS[e.errno]}"
    if isinstance(e, (FileExistsError, FileNotFoundError)):  # mcpm's own, with a message
        return str(e)
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that clean-ups run as for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into :class:`Terminated` while a command runs (where nobody else handles it:
    ``mcpm train`` installs its own handler for its loop and puts this one back after)."""
    def raise_terminated(signum, frame):
        raise Terminated()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_as(prefix: str):
    """mcpm's own warnings as ``mcpm COMMAND: warning: MESSAGE`` lines (others as usual)."""
    package = str(Path(__file__).resolve().parent) + os.sep
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not str(Path(filename).resolve()).startswith(package):
            return original(message, category, filename, lineno, file, line)
        print(f"{prefix}: warning: {message}", file=file or sys.stderr)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _die_by(sig: int) -> None:
    """Clean-ups have run: end the process by ``sig`` with its default action."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (argparse stops positionals at the first option)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    debug = args.debug or os.environ.get("MCPM_DEBUG", "").strip() not in ("", "0")
    name = " ".join(["mcpm", args.command] + [getattr(args, a) for a in ("direction", "action")
                                              if getattr(args, a, None)])
    with _warnings_as(name), _sigterm_raises():
        try:
            return args.func(args)
        except KeyboardInterrupt as e:
            if debug:
                raise
            sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            print(f"{name}: interrupted" + (" (SIGTERM)" if sig == signal.SIGTERM else ""),
                  file=sys.stderr)
            if argv is None:  # the program itself: end by the signal, as shells expect, and
                _die_by(sig)  # skip a teardown that can crash while XLA threads are busy
            return 128 + sig
        except Exception as e:
            message = _user_message(e)
            if debug or message is None:
                raise
            print(f"{name}: error: {message}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
