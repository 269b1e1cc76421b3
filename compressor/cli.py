"""The ``compress`` command: a thin click shell over the Python API, with rich output.

    compress MODEL --decomp tr --target 5x --data DATA -o slim.safetensors
    compress inspect slim.safetensors
    compress eval slim.safetensors --data DATA

Every user mistake ends as ``error: <one line>`` on stderr with exit code 2, before any
output file exists; outputs are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import click
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .api import compare_outputs, compress, evaluate
from .budget import STOPPED, format_seconds
from .checkpoint import blueprint_in, export_program, load, nonfinite_tensors, read_blueprint, read_metadata, save
from .forms import FORM_CHOICES, FORMS, Group, check_form
from .quantize import dequantized
from .serving import FormChoice, choose, parse_shape, serve_as, serving, size_budget
from .data import TensorLoader, load_tensor_file, resolve_data
from .distributed import init_from_env, leave
from .surgery import set_training
from .trace import as_module
from .layers import TiedTNLinear, TNLayer, layer_class, paired_cores
from .model_files import import_arch, load_model
from .plot import check_available, plot_run
from .config import CompressConfig
from .errors import CheckpointError, CompressorError, DataError, ModelError, first_line
from .hf_folders import (SLIM_CHECKPOINT, folder_copies, folder_fidelity, is_model_folder, load_model_folder,
                         load_slim_folder, own_file, position_limit, slim_checkpoint_in, text_data)
from .files import OutputAppeared, probe_writable, read_safetensors, stale_temporaries, staged_outputs
from .resume import RunInterrupted

err_console = Console(stderr=True)
#: Tokens per example when `compress eval` reads text for a model folder.
EVAL_MAX_LENGTH = 128
#: A delivered ratio above this multiple of the target is pointed out in the summary.
OVERSHOOT = 1.05

# torch.export programs warn about a pytree API change when copied; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
out_console = Console()


class UserError(click.ClickException):
    """Printed as ``error: message`` with exit code 2 (bad input, not a bug)."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: D102 - click API
        click.echo(f"error: {self.format_message()}", err=True)


class DefaultGroup(click.Group):
    """``compress MODEL ...`` runs the main command; ``compress inspect|eval ...`` the others.

    Usage mistakes (a bad option value, a missing argument) are reported like every other
    user error: one ``error:`` line on stderr, exit code 2, no usage dump or traceback.
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run"] + list(args)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)


def _fail(exc: BaseException) -> None:
    raise UserError(str(exc)) from None


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compressor")
def main() -> None:
    """Shrink a trained PyTorch model with tensor-ring/train cores whose ranks are learned.

    \b
    compress MODEL --decomp tr --target 20x --data fashion-mnist -o slim.safetensors
    compress inspect slim.safetensors
    compress eval slim.safetensors --data fashion-mnist

    Run `compress run --help` for every option of the main command.
    """


# ------------------------------------------------------------------ helpers
def _load_data(spec: str, eval_spec: str | None) -> dict[str, Any]:
    """Train/test tensors of ``--data``; ``--eval-data`` replaces the held-out part."""
    data = resolve_data(spec)
    if eval_spec:
        x, y = load_tensor_file(eval_spec)
        data["test"] = (x, y)
    return data


class ProgressView:
    """Draws the fine-tuning progress bar; starts on the first event, so validation errors
    print alone, and closes itself at the end."""

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[phase]}"), TextColumn("loss {task.fields[loss]}"),
               TextColumn("ratio {task.fields[ratio]}"), TextColumn("acc {task.fields[acc]}"),
               TextColumn("test {task.fields[test]}"), TimeElapsedColumn(), TimeRemainingColumn()]

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.callback = None
        self.stage: tuple[str, float] | None = None  # the set-up step under way, since when
        self.spinner = None

    def _stage_done(self) -> None:
        """Log the set-up step that just ended, with its duration. A step that fails is never
        logged, so a bad input still prints its one error line alone."""
        if self.stage is not None:
            message, since = self.stage
            if self.spinner is not None:
                self.spinner.stop()
                self.spinner = None
            self.console.log(f"{message} ({time.perf_counter() - since:.1f} s)")
            self.stage = None

    def __call__(self, event) -> None:
        self._stage_done()
        if event.kind == "stage" and (self.progress is not None or event.step > 0):  # said during fine-tuning
            (self.progress.console if self.progress is not None else self.console).log(event.message)
            return
        if event.kind == "stage":  # set-up before fine-tuning: a spinner while it runs, a line when done
            self.stage = (event.message, time.perf_counter())
            if self.console.is_terminal:
                self.spinner = self.console.status(event.message)
                self.spinner.start()
            return
        if not self.console.is_terminal:  # a log file or a CI job: plain lines instead of a live bar
            if event.kind == "step":
                self.console.log(_step_line(event))
            elif event.kind in ("freeze", "force", "epoch") or (event.kind == "end" and event.message):
                self.console.log(_event_line(event))
            return
        if self.progress is None:
            self.progress = Progress(*self.columns, console=self.console, transient=False)
            self.progress.start()
            task = self.progress.add_task("fine-tuning", total=None, phase="", loss="-", ratio="-", acc="-", test="-")
            self.callback = _progress_callback(self.progress, task)
        self.callback(event)
        if event.kind == "end":
            if event.message:
                self.progress.console.log(event.message)
            self.close()

    def close(self) -> None:
        if self.spinner is not None:  # a set-up step that failed: it vanishes, the error speaks
            self.spinner.stop()
            self.spinner = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _progress_callback(progress: Progress, task_id):
    def callback(event) -> None:
        fields = {}
        if event.kind in ("step", "epoch", "freeze", "force", "end", "start"):
            if event.ratio == event.ratio:
                fields["ratio"] = f"{event.ratio:5.2f}x"
            if event.kind == "step":
                fields["loss"] = f"{event.task_loss:.3f}"
                if event.accuracy is not None:
                    fields["acc"] = f"{100 * event.accuracy:.1f}%"
            if event.kind == "epoch" and event.eval_accuracy is not None:
                fields["test"] = f"{100 * event.eval_accuracy:.2f}%"
            fields["phase"] = _phase(event)
            progress.update(task_id, total=event.total_steps or None, completed=event.step, **fields)
        if event.kind in ("freeze", "force", "epoch"):
            progress.console.log(_event_line(event))
    return callback


def _phase(event) -> str:
    """Which parameters the run is training at this event."""
    return "weights" if event.frozen else "gates+weights"


def _event_line(event) -> str:
    """The one line a freeze, a forced closing or an epoch's end is logged as."""
    if event.kind == "freeze":
        return (f"target reached at step {event.step}: gates frozen, slices pruned ({event.ratio:.2f}x)"
                + (f"; {event.message}" if event.message else ""))
    if event.kind == "force":
        return f"step {event.step}: {event.message} ({event.ratio:.2f}x)"
    if event.kind == "end":
        return event.message
    test = f", test accuracy {100 * event.eval_accuracy:.2f}%" if event.eval_accuracy is not None else ""
    return f"epoch {event.epoch}: ratio {event.ratio:.2f}x{test}"


def _step_line(event) -> str:
    """A progress event as one plain line (for output that is not a terminal)."""
    acc = f" acc {100 * event.accuracy:.1f}%" if event.accuracy is not None else ""
    return (f"step {event.step}/{event.total_steps} {_phase(event)}: loss {event.task_loss:.4f} ratio {event.ratio:.3f}x"
            f" lambda {event.lam:.3g}{acc}")


def _fmt_ranks(r: list[int]) -> str:
    return "(" + ",".join(str(x) for x in r) + ")"


def _fmt_cores(cores) -> str:
    """What each core carries: ``mpo 25 · 2×4 · 3×4`` (a conv's window core, then (input × output)
    pairs) for a paired layout; the core modes for the others."""
    return "mpo " + " · ".join("×".join(str(m) for m in core) for core in cores)


def report_table(report) -> Table:
    t = Table(title=f"compressed with {report.decomp.upper()} — whole model {report.dense_params:,} → "
                    f"{report.params:,} parameters = {report.ratio:.2f}x", title_justify="left")
    for col in ("layer", "kind", "shape", "tensorization", "ranks initial → final", "params before → after"):
        t.add_column(col, overflow="fold")
    for l in report.layers:
        tz = f"in {_fmt_ranks(l.tensorization[0])} out {_fmt_ranks(l.tensorization[1])}"
        if l.paired:
            window = layer_class(l.kind).window(tuple(l.shape))
            tz = _fmt_cores(paired_cores(l.tensorization[0], l.tensorization[1], window))
        if l.kept_dense:
            t.add_row(l.name, l.kind, "×".join(map(str, l.shape)), tz,
                      f"{_fmt_ranks(l.initial_ranks)} → dense (factorized was not smaller)",
                      f"{l.params_before:,} → {l.params_after:,}")
            continue
        t.add_row(l.name, l.kind, "×".join(map(str, l.shape)), tz,
                  f"{_fmt_ranks(l.initial_ranks)} → {_fmt_ranks(l.final_ranks)}",
                  f"{l.params_before:,} → {l.params_after:,} ({l.params_before / l.params_after:.1f}x)")
    for s in report.skipped:
        t.add_row(s["name"], s["kind"], "", "", "[dim]dense: " + s["reason"] + "[/dim]", "")
    return t


# ------------------------------------------------------------------ compress MODEL
class ConfigChoice(click.Choice):
    """Shows a config field's choices in --help and completions but leaves the verdict to
    CompressConfig, so the CLI and the API reject a bad name with the same message."""

    def convert(self, value, param, ctx):  # noqa: D102 - click API
        return value


def config_option(name: str, *flags: str, **overrides: Any):
    """A click option generated from the CompressConfig field ``name`` (help, default, type,
    choices), so the CLI cannot drift from the API; ``flags`` default to ``--field-name``."""
    field_ = next(f for f in fields(CompressConfig) if f.name == name)
    hint = get_type_hints(CompressConfig)[name]
    flag = "--" + name.replace("_", "-")
    if hint is bool:  # a switch, off by default
        return click.option(*(flags or (flag,)), name, is_flag=True, help=field_.metadata["help"], **overrides)
    if hint == bool | None:  # on, off, or (unset) the tool chooses
        return click.option(*(flags or (f"{flag}/--no-{flag[2:]}",)), name, default=None,
                            help=field_.metadata["help"], **overrides)
    kind = next((t for t in (int, float) if t in (get_args(hint) or (hint,))), str)
    choices = field_.metadata.get("choices")
    kwargs: dict[str, Any] = {"help": field_.metadata["help"], "type": ConfigChoice(list(choices)) if choices else kind}
    if field_.default is not MISSING and field_.default is not None and not overrides.get("required"):
        kwargs.update(default=field_.default, show_default=True)  # None: "the tool chooses", said in the help
    kwargs.update(overrides)
    return click.option(*(flags or (flag,)), name, **kwargs)


def _check_files(inputs: dict[str, Path], outputs: dict[str, Path], state_file: Path | None, force: bool,
                 resume: bool, main: bool = True) -> Path:
    """Check every path a run will write before any work; returns the state file's path. On the
    process that writes (``main``), every output location is probed (a file made and removed
    there) and what a killed run left half-written is swept (never a live run's temporaries)."""
    state_file = state_file or outputs["checkpoint"].with_suffix(".resume.pt")
    _check_outputs(inputs, list(outputs.values()) + [state_file], force, skip_existing=[state_file])
    _check_state_file(state_file, resume, force)
    for path in [*outputs.values(), state_file] if main else []:
        probe_writable(path, ModelError)
        for leftover in stale_temporaries(path):  # from a run killed while writing
            leftover.unlink(missing_ok=True)
    return state_file


def _check_state_file(state_file: Path, resume: bool, force: bool) -> None:
    """A fresh run must not silently discard an interrupted run's state, nor --resume start from nothing."""
    if resume and not state_file.exists():
        raise ModelError(f"there is no saved state at {state_file} to resume from (give its path with --state)")
    if not resume and state_file.exists() and not force:
        raise ModelError(f"{state_file} holds the state of an interrupted run: add --resume to continue it, "
                         "or --force to start over")


def _input_paths(model: Path, data_spec: str, eval_data: Path | None) -> dict[str, Path]:
    """The files and folders a run reads, by what the user called them: never written, even with --force."""
    data = Path(data_spec.split(":", 1)[1]) if data_spec.lower().startswith("fashion-mnist:") else Path(data_spec)
    named = {"the input model": model, "the --data": data, "the --eval-data": eval_data}
    return {what: path for what, path in named.items() if path is not None and path.exists()}


def _is_input(out: Path, inputs: dict[str, Path]) -> str | None:
    """What ``out`` would overwrite or write into: an input (also through a link), or a path inside
    the input model folder (a data folder is read for its .txt files alone)."""
    target = out.resolve()
    for what, path in inputs.items():
        if target == path.resolve() or (out.exists() and os.path.samefile(out, path)):
            return f"{what} {'folder' if path.is_dir() else 'file'}"
        if what == "the input model" and path.is_dir() and target.is_relative_to(path.resolve()):
            return f"inside {what} folder {path}"
    return None


def _check_outputs(inputs: dict[str, Path], outputs: list[Path], force: bool, skip_existing: list[Path] = ()) -> None:
    """Refuse before any work if an output would clobber an input (even with --force), an existing file
    or another output (``skip_existing``: outputs whose existence is judged elsewhere)."""
    seen: set[Path] = set()
    for out in outputs:
        if (what := _is_input(out, inputs)) is not None:
            raise ModelError(f"output {out} is {what}; inputs are never written, even with --force: choose "
                             "another path")
        if out.resolve() in seen:
            raise ModelError(f"{out} is named for two outputs; give each output its own path")
        seen.add(out.resolve())
        if out.exists() and out.is_dir():
            raise ModelError(f"{out} is a directory")
        if out.exists() and not force and out not in skip_existing:
            raise ModelError(f"{out} already exists; pass --force to overwrite it")


def _plan_outputs(model: Path, output: str | None, export_pt2: bool, plot: Path | None,
                  report_json: Path | None) -> dict[str, Path]:
    """Every file a run will write, by kind. A model folder in gives a model folder out:
    its config and tokenizer files beside the slim checkpoint (``copy:NAME`` kinds). For a
    single-file model, an ``-o`` ending in ``/`` (or naming a folder) is the folder to write in."""
    if is_model_folder(model):
        if export_pt2:
            raise ModelError("--export-pt2 is for single-file models; a model folder is written as a folder")
        folder = Path(output) if output else Path(model.name.rstrip("/") + "-slim")
        if folder.resolve() == model.resolve():
            raise ModelError(f"output {folder} is the input model folder; choose another folder")
        outputs = {"checkpoint": folder / SLIM_CHECKPOINT}
        outputs.update({f"copy:{src}": folder / src.name for src in folder_copies(model)})
    else:
        name = model.name.split(".")[0] + ".slim.safetensors"
        folder = output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())
        output = Path(output) / name if folder else Path(output) if output else Path(name)
        outputs = {"checkpoint": output, "pt2": output.with_suffix(".pt2") if export_pt2 else None}
    outputs.update({"plot": plot, "report": report_json})
    return {kind: path for kind, path in outputs.items() if path is not None}


def _read_inputs(model: Path, data_spec: str, eval_data: Path | None, arch: str | None, trust_pickle: bool,
                 batch_size: int, seed: int, max_length: int | None):
    """(original model, training loader, evaluation loader or None, example input) of a run."""
    if is_model_folder(model):
        original = load_model_folder(model, trust_pickle=trust_pickle)
        if eval_data or data_spec.lower() in ("digits", "fashion-mnist") or data_spec.endswith(".safetensors"):
            raise DataError("a model folder takes --data as text: a text file (one example per line) or a folder "
                            "of .txt files")
        train, _ = text_data(data_spec, model, max_length, seed, limit=position_limit(original))
        return original, TensorLoader(train, None, batch_size, shuffle=True, seed=seed), None, None
    original = load_model(model, arch=arch, trust_pickle=trust_pickle)
    data = _load_data(data_spec, str(eval_data) if eval_data else None)
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    train = TensorLoader(xtr, ytr, batch_size, shuffle=True, seed=seed)
    return original, train, (TensorLoader(xte, yte, 512) if yte is not None else None), xte[:8]


def _write_outputs(result, outputs: dict[str, Path], arch: str | None, example: torch.Tensor,
                   force: bool = False) -> list[Path]:
    """Write the checkpoint and every extra the user asked for, all or nothing; without ``force``
    an output another run wrote meanwhile is not replaced (:class:`~compressor.files.OutputAppeared`)."""
    rep = result.report
    extra = {"arch": arch} if arch else {}
    with staged_outputs(list(outputs.values()), overwrite=force) as tmp:
        save(result, tmp[outputs["checkpoint"]],
             extra={**extra, "report": {"accuracy": rep.accuracy, "dense_accuracy": rep.dense_accuracy}})
        if "pt2" in outputs:
            try:
                export_program(result.model, example, tmp[outputs["pt2"]])
            except Exception as exc:  # torch.export's own errors: say what failed, write nothing
                raise ModelError(f"could not export the slim model as a torch.export program "
                                 f"({first_line(exc, 200)}); nothing was written") from None
        if "plot" in outputs:
            plot_run(rep, tmp[outputs["plot"]])
        if "report" in outputs:
            tmp[outputs["report"]].write_text(json.dumps(rep.to_dict(), indent=2))
        for kind, path in outputs.items():
            if kind.startswith("copy:"):  # checked again as it is read: still the folder's own file
                src = Path(kind[len("copy:"):])
                tmp[path].write_bytes(own_file(src.parent, src.name).read_bytes())
    return list(outputs.values())


def _unwritten(exc: Exception, state_file: Path) -> CompressorError:
    """The one line a failed write at the end says: what failed, and where the trained run is kept.
    Writers fail in their own ways (``OSError``, torch's ``RuntimeError``, safetensors' own error),
    so any failure is said in one line; none costs the training."""
    again = "--resume once it can be written"
    if isinstance(exc, OutputAppeared):
        what = f"{exc.filename} appeared while this run was going (another run wrote it) and is left as it is"
        again = "--resume --force to replace it"
    elif isinstance(exc, OSError):
        what = f"could not write {exc.filename or 'the outputs'} ({exc.strerror or first_line(exc)})"
    elif isinstance(exc, CompressorError):
        what = str(exc).rstrip(".")
    else:
        what = f"could not write the outputs ({first_line(exc, 200, with_type=True)})"
    if state_file.exists():
        return CompressorError(f"{what}; no output was written. The trained run is kept in {state_file}: run the "
                               f"same command with {again}, without training again")
    return CompressorError(f"{what}; no output was written, and the run's state could not be kept either")


def _print_summary(rep, written: list[Path]) -> None:
    """Printed only after every file is written, so a failed run never shows a success table."""
    out_console.print(report_table(rep))
    if rep.accuracy is not None:
        out_console.print(f"test accuracy: dense {100 * rep.dense_accuracy:.2f}% → compressed {100 * rep.accuracy:.2f}%"
                          f" ({100 * (rep.accuracy - rep.dense_accuracy):+.2f} points)")
    start = rep.start or {}
    if start.get("accuracy") is not None:
        fitted = "outputs on the calibration batches" if start.get("whitened") else "weights"
        how = (f"each layer within {start['error']:.3g} of its {fitted}" if start.get("chosen") == "faithful" else
               "the generous ladder (no faithful start within dense size)" if start.get("chosen") == "ladder" else "")
        out_console.print(f"step 0, before training: accuracy {100 * start['accuracy']:.2f}%"
                          + (f" ({start['ratio']:.2f}x, {how})" if how else ""))
    delivered = rep.bytes_ratio if rep.quantize != "none" else rep.ratio
    out_console.print(_ratio_line(rep) + f" in {rep.seconds:.0f} s"
                      + (" — the controller closed extra slices to meet the target" if rep.forced else "")
                      + (" — more than 5 % past the target: the slices that closed last were large"
                         if delivered > OVERSHOOT * rep.target else ""))
    for line in spending_lines(rep):
        out_console.print(line)
    if rep.forms and "error" in rep.forms:
        out_console.print(f"served forms not timed: {rep.forms['error']}")
    elif rep.forms:
        out_console.print(forms_table(rep.forms))
    for w in written:
        out_console.print(f"wrote {w} ({w.stat().st_size:,} bytes)")


def _ratio_line(rep) -> str:
    """The delivered ratio against the target: in elements, or in bytes when the weights are quantized."""
    if rep.quantize == "none":
        return f"ratio {rep.ratio:.2f}x on disk (target {rep.target:g}x; parameters alone {rep.param_ratio:.2f}x)"
    return (f"{rep.quantize} file {rep.bytes_ratio:.2f}x smaller than the dense float32 file: {rep.bytes:,} of "
            f"{rep.dense_bytes:,} tensor bytes (target {rep.target:g}x in bytes, met at {rep.ratio:.2f}x in "
            f"elements, aimed at {rep.aimed_ratio:.2f}x; parameters alone {rep.param_ratio:.2f}x)")


def spending_lines(rep) -> list[str]:
    """What each phase of the fine-tune spent and why it stopped, from the report (nothing for a
    report without phases)."""
    if not rep.phases:
        return []
    lines = []
    for name, label in (("gates", "gate phase"), ("weights", "weight phase")):
        phase = rep.phases.get(name)
        if phase is None:
            continue
        tokens = f", {int(phase['tokens']):,} tokens" if phase["tokens"] else ""
        lines.append(f"{label}: {int(phase['steps']):,} steps, {int(phase['samples']):,} samples{tokens}, "
                     f"{format_seconds(phase['seconds'])}")
    stop = f"stopped at step {rep.steps:,} of {rep.planned_steps:,}: {STOPPED.get(rep.stopped, rep.stopped)}"
    if rep.time_budget is not None:
        stop += (f" (the run took {format_seconds(rep.seconds)} of its {format_seconds(rep.time_budget)} time "
                 f"budget, {100 * rep.seconds / rep.time_budget:.0f} %)")
    return lines + [stop]


def output_options(command):
    """The options about what a run writes and keeps: outputs, overwriting, resumable state."""
    options = [
        click.option("-o", "--output", type=click.Path(), default=None,
                     help="slim checkpoint to write (default: MODEL name + .slim.safetensors); a path ending in / "
                          "(or an existing folder) is the folder to write it in; for a model folder, the folder out"),
        click.option("--force", is_flag=True, help="overwrite an existing output file"),
        click.option("--export-pt2", is_flag=True,
                     help="also write the slim model as a torch.export program (OUT.pt2)"),
        click.option("--plot", type=click.Path(path_type=Path), default=None,
                     help="PNG with learned ranks and training curves"),
        click.option("--report-json", type=click.Path(path_type=Path), default=None,
                     help="write the full report as JSON"),
        config_option("checkpoint_every"),
        click.option("--state", "state_file", type=click.Path(path_type=Path), default=None,
                     help="where the run's resumable state is kept (default: OUTPUT with suffix .resume.pt)"),
        click.option("--resume", is_flag=True,
                     help="continue the interrupted run saved in --state; give the same model, data and options"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def form_options(default: str, what: str):
    """``--form`` and ``--serve-shape``: how the slim model's factorized layers are served (see forms.py)."""
    def decorate(command):
        command = click.option("--serve-shape", "serve_shapes", multiple=True, metavar="SHAPE",
                               help="an input shape the model serves, e.g. 1x1 and 8x128 (token ids: batch x "
                                    "tokens) or 256x1x28x28; a leading part (256) takes the rest from the data; "
                                    "repeatable [default: 1x1 and 8x128 for token ids, else batch 1 and 256]")(command)
        return click.option("--form", type=ConfigChoice(list(FORM_CHOICES)), default=default, show_default=True,
                            help=f"{what}: cores (as stored), factors (two standard Linear/Conv2d/Embedding "
                                 "modules per layer), dense, or auto (each layer's fastest at --serve-shape "
                                 "within the size target, timed on this machine)")(command)
    return decorate


def _form_args(form: str, serve_shapes: tuple[str, ...]) -> tuple[str, list[tuple[int, ...]]]:
    """The checked ``--form`` and parsed ``--serve-shape`` values (before any work)."""
    return check_form(form), [parse_shape(s) for s in serve_shapes]


def _served(model, form: str, shapes: list, example: Any, blueprint, convert: bool) -> FormChoice:
    """The forms ``model`` (in cores) is served in, timed at the served shapes; converted when asked."""
    budget = size_budget(blueprint.dense_params, blueprint.element_target())  # an int8 run's aimed ratio
    if convert:
        return serve_as(model, form, budget=budget, shapes=shapes, example=example)[1]
    return choose(model, form, budget=budget, serve=serving(model, shapes, example))


def _with_forms(result, form: str, shapes: list, example: Any):
    """``result`` with the forms its model would be served in, in the report. A model the timing
    cannot run (a program traced at one fixed shape) gets the reason instead: the run stands."""
    try:
        forms = _served(result.model, form, shapes, example, result.blueprint, convert=False).to_dict()
    except Exception as exc:  # any failure of a forward on made-up inputs: said, never fatal
        forms = {"asked": form, "error": first_line(exc, 200, with_type=not isinstance(exc, CompressorError))}
    return dataclasses.replace(result, report=dataclasses.replace(result.report, forms=forms))


def _speedups(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}x" if v == v else "-" for v in values) or "-"


def forms_table(forms: dict[str, Any]) -> Table:
    """The served forms (``FormChoice.to_dict()``): per layer its form, size and measured speed-ups."""
    shapes = " / ".join("x".join(map(str, s)) for s in forms["shapes"])
    budget = f", budget {forms['budget']:,}" if forms.get("budget") else ""
    t = Table(title=f"served as {forms['asked']}: {forms['cores_params']:,} → {forms['params']:,} parameters"
                    f"{budget} (the file keeps the cores){f'; timed at {shapes}' if shapes else ''}",
              title_justify="left")
    for col in ("layer", "form", "params", "speed-up vs cores", "vs dense"):
        t.add_column(col, overflow="fold")
    for layer in forms["layers"]:
        t.add_row(" + ".join(layer["members"]), layer["form"], f"{layer['params'][layer['form']]:,}",
                  _speedups(layer["speedup_vs_cores"]), _speedups(layer["speedup_vs_dense"]))
    return t


#: The CompressConfig fields the main command offers, in --help order.
RUN_CONFIG = ("quantize", "epochs", ("lam", "--lambda"), "sigma", "gate_margin", "rank", "tensorization",
              "rank_select", "penalty", "init",
              "calibration_batches", "start",
              "start_error", "max_steps", "early_stop", "early_stop_patience", "early_stop_min_delta", "gate_fraction",
              "refit", "distill_loss", "distill_hidden", "log_every", "lr", "device")


def config_options(command):
    """Every :data:`RUN_CONFIG` field as an option of ``command``."""
    command = config_option("bf16")(command)
    command = config_option("time_budget", type=str, metavar="DURATION")(command)  # "10m": CompressConfig parses it
    command = config_option("skip", multiple=True, show_default=False)(command)
    for entry in reversed(RUN_CONFIG):
        name, *flags = (entry,) if isinstance(entry, str) else entry
        command = config_option(name, *flags)(command)
    return command


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@config_option("decomp")
@config_option("target", required=True)
@click.option("--data", "data_spec", required=True,
              help="fashion-mnist[:DIR], digits, or a .safetensors file with 'inputs' (and optional 'labels'); "
                   "for a model folder: a text file (one example per line) or a folder of .txt files")
@click.option("--max-length", type=int, default=None,
              help="tokens per text example (model folders; longer lines are truncated) [default: 128, or the "
                   "model's max_position_embeddings if fewer]")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help=".safetensors with held-out inputs/labels")
@click.option("--arch", default=None, help="package.module:factory building the architecture for a state-dict MODEL")
@click.option("--trust-pickle", is_flag=True,
              help="allow MODEL to be a pickled module or a .pt2 with pickled parts (runs code from the file!)")
@config_options
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="training batch size, per process (under torchrun each of N processes takes this many)")
@config_option("seed")
@output_options
@form_options("auto", "the forms the summary and report say the model is served in (the file keeps the cores)")
def run(model: Path, data_spec: str, max_length: int | None, eval_data: Path | None, output: str | None,
        arch: str | None, trust_pickle: bool, batch_size: int, force: bool, export_pt2: bool, plot: Path | None,
        report_json: Path | None, state_file: Path | None, resume: bool, form: str, serve_shapes: tuple[str, ...],
        **settings: Any) -> None:
    """Compress MODEL to --target and write a slim safetensors checkpoint.

    Ctrl-C (or SIGTERM) stops after the current step and saves the run's state; the same
    command with --resume continues it from there. Under torchrun the processes fine-tune
    data-parallel; rank 0 prints and writes the files.
    """
    world = init_from_env()
    try:
        config = CompressConfig(**settings)  # the config options above: validated once, here
        form, shapes = _form_args(form, serve_shapes)
        if batch_size <= 0:
            raise DataError(f"--batch-size must be positive, got {batch_size}")
        outputs = _plan_outputs(model, output, export_pt2, plot, report_json)
        state_file = _check_files(_input_paths(model, data_spec, eval_data), outputs, state_file, force, resume,
                                  main=world.main)
        if plot:
            check_available()  # before minutes of training, not after
        original, train, test, example = _read_inputs(model, data_spec, eval_data, arch, trust_pickle,
                                                      batch_size, config.seed, max_length)
        result = _compress_showing_progress(original, train, test, config, state_file, resume, world.main)
        try:
            if world.main:  # what the slim model is served as: in the report and summary, not in the file
                result = _with_forms(result, form, shapes, example)
            written = _write_outputs(result, outputs, arch, example, force) if world.main else []
        except Exception as exc:  # a full disk, a folder gone read-only: the training is not lost
            raise _unwritten(exc, state_file) from None
        world.barrier()  # every rank ends once the files are written
        leave()
        if world.main:
            state_file.unlink(missing_ok=True)  # the result is safe: nothing left to resume
    except CompressorError as exc:
        _fail(exc)
    except KeyboardInterrupt as stop:
        _interrupted(stop, state_file, quiet=not world.main)
    if world.main:
        _print_summary(result.report, written)


def _compress_showing_progress(original: Any, train: Any, test: Any, config: CompressConfig, state_file: Path,
                               resume: bool, main: bool) -> Any:
    """``compress`` with the progress view on stderr (rank 0 only), closed however the run ends."""
    view = ProgressView(err_console) if main else None
    try:
        return compress(original, train, config=config, eval_loader=test, callback=view,
                        state_file=state_file, resume=resume, keep_state=True)
    finally:
        if view is not None:
            view.close()


def _interrupted(stop: KeyboardInterrupt, state_file: Path | None, quiet: bool = False) -> None:
    """Ctrl-C: say what was kept and how to go on (rank 0 only: ``quiet`` on the others);
    exit 128 + the signal number."""
    if isinstance(stop, RunInterrupted):
        leave()  # every rank stopped at the same step: none is left inside a collective
        if not quiet:
            click.echo(f"{stop}; run the same command with --resume to continue", err=True)
        sys.exit(stop.exit_code)
    if quiet:
        sys.exit(130)
    saved = " (the last saved state is kept for --resume)" if state_file and state_file.exists() else ""
    click.echo(f"interrupted: no output was written{saved}", err=True)
    sys.exit(130)


# ------------------------------------------------------------------ inspect
@main.command("inspect")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the metadata as JSON")
@click.option("--forms", "time_forms", is_flag=True,
              help="also time every layer's forms on this machine and show the ones --form picks (needs the "
                   "architecture: a model folder has it, a file needs --base or --arch)")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="the original model (for --forms)")
@click.option("--arch", default=None, help="package.module:factory building the architecture (for --forms)")
@click.option("--trust-pickle", is_flag=True, help="allow --base to be pickled (runs code from the file!)")
@form_options("auto", "with --forms, the forms to show")
def inspect_cmd(checkpoint: Path, as_json: bool, time_forms: bool, base: Path | None, arch: str | None,
                trust_pickle: bool, form: str, serve_shapes: tuple[str, ...]) -> None:
    """Per-layer ranks, sizes in each form and the whole-model ratio of a slim CHECKPOINT."""
    try:
        form, shapes = _form_args(form, serve_shapes)
        folder = checkpoint if checkpoint.is_dir() else None
        if folder is not None:  # a compressed model folder
            checkpoint = slim_checkpoint_in(checkpoint)
        meta = read_metadata(checkpoint)
        tensors = read_safetensors(checkpoint, CheckpointError, "checkpoint")
        weights = dequantized(checkpoint, meta, tensors)  # (its scales are finite and positive)
    except CompressorError as exc:
        _fail(exc)
    bad = nonfinite_tensors(tensors)
    file_bytes = checkpoint.stat().st_size
    if as_json:
        shown = {k: v for k, v in meta.items() if k != "tensor_names"}
        shown["file_bytes"] = file_bytes
        click.echo(json.dumps({**shown, "nonfinite_tensors": bad} if bad else shown, indent=2))
        return
    out_console.print(_layers_table(checkpoint, meta, weights))
    out_console.print(_bytes_line(meta, tensors, file_bytes))
    if bad:
        out_console.print(f"[bold red]not finite:[/bold red] {len(bad)} of {len(tensors)} tensors hold NaN or "
                          f"infinite values: {', '.join(bad[:5])}" + (", ..." if len(bad) > 5 else ""))
    acc = meta.get("extra", {}).get("report", {}).get("accuracy")
    if acc is not None:
        out_console.print(f"test accuracy at compression time: {100 * acc:.2f}%")
    if time_forms:
        try:
            out_console.print(forms_table(_timed_forms(checkpoint, folder, base, arch, trust_pickle, form, shapes)))
        except CompressorError as exc:
            _fail(exc)


def _layers_table(checkpoint: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Table:
    """One row per factorized layer: modes, ranks, and its size in each form (a form that alone
    would take the model past its size target in dim, marked over). ``tensors`` are the file's,
    dequantized (no scales)."""
    params = sum(t.numel() for t in tensors.values())
    dense = meta.get("dense_params")
    target = meta.get("extra", {}).get("target")
    budget = size_budget(dense, blueprint_in(meta).element_target())  # an int8 file: the element ratio its run aimed at
    t = Table(title=f"{checkpoint} — {params:,} parameters"
                    + (f", dense {dense:,} → {dense / params:.2f}x" if dense else "")
                    + (f"; target {target:g}x allows {budget:,}" if budget else ""), title_justify="left")
    for col in ("layer", "kind", "decomp", "modes", "ranks", "params", "as factors", "as dense"):
        t.add_column(col)
    for group in _stored_groups(checkpoint, meta, tensors):
        s = meta["layers"][group.name]["spec"]
        modes, n = TNLayer.spec_size(s)  # the layer class knows its own modes (merge_spatial convs too)
        sizes = {f: group.params(f) for f in FORMS}
        room = (budget if budget else params) - params
        cells = ["-" if sizes[f] is None else f"{sizes[f]:,}" if sizes[f] - sizes["cores"] <= room
                 else f"[dim]{sizes[f]:,} (over)[/dim]" for f in ("factors", "dense")]
        shown = _fmt_cores(group.layer.pairs()) if group.layer.paired else _fmt_ranks(modes)
        t.add_row(" + ".join(group.members), s["kind"], s["decomp"], shown, _fmt_ranks(s["ranks"]),
                  f"{n:,}", *cells)
    return t


def _stored_groups(checkpoint: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Group]:
    """Every factorized layer of a checkpoint rebuilt from its spec and tensors (no base model), with
    its tied heads: what :class:`~compressor.forms.Group` sizes each form of."""
    layers = {}
    for name, entry in meta["layers"].items():
        try:
            layer = TNLayer.from_spec(entry["spec"])
            layer.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        except (CompressorError, KeyError, RuntimeError, TypeError, ValueError) as exc:
            _fail(ModelError(f"{checkpoint}: layer {name!r} has an unreadable spec ({first_line(exc)})"))
        layers[name] = layer
    heads: dict[str, list] = {}
    for name, entry in meta.get("tied", {}).items():
        if entry["kind"] == TiedTNLinear.kind:
            head = TiedTNLinear(layers[entry["source"]], bias=entry["bias"])
            if head.bias is not None:
                head.bias.data.copy_(tensors[f"{name}.bias"])
            heads.setdefault(entry["source"], []).append((name, head))
    return [Group(name, layer, tuple(heads.get(name, ()))) for name, layer in layers.items()]


def _timed_forms(checkpoint: Path, folder: Path | None, base: Path | None, arch: str | None, trust_pickle: bool,
                 form: str, shapes: list) -> dict[str, Any]:
    """``compress inspect --forms``: the slim model rebuilt, every layer's forms timed at the served shapes."""
    if folder is not None:
        model = load_slim_folder(folder)
    elif base is not None or arch:
        original = load_model(base, arch=arch, trust_pickle=trust_pickle) if base is not None else None
        model = load(checkpoint, base=original if original is not None else (lambda: import_arch(arch)))
    else:
        raise ModelError("--forms times the layers in the model: give --base ORIGINAL_MODEL or --arch "
                         "package.module:factory")
    return _served(model, form, shapes, None, read_blueprint(checkpoint), convert=False).to_dict()


def _bytes_line(meta: dict[str, Any], tensors: dict[str, torch.Tensor], file_bytes: int) -> str:
    """The file's bytes, what its tensors take, and (quantized) how many are int8 and the ratio to the
    dense float32 file's tensors."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    line = f"file {file_bytes:,} bytes, tensors {data:,}"
    quant = meta.get("quantization")
    if quant is None:
        return line
    dense = meta.get("dense_params")
    made = escape(str(quant.get("quantizer", "?"))[:80])
    line += f", {len(quant['tensors'])} of them {quant['scheme']} with float32 scales ({made})"
    return line + (f", dense float32 {4 * dense:,} → {4 * dense / data:.2f}x in bytes" if dense else "")


# ------------------------------------------------------------------ eval
@main.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", required=True,
              help="fashion-mnist[:DIR], digits, or a .safetensors file; for a model folder, a text file")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="the original model file or folder (to rebuild the architecture and compare outputs)")
@click.option("--arch", default=None, help="package.module:factory (when --base is a state dict, or no --base)")
@click.option("--trust-pickle", is_flag=True,
              help="allow --base to be a pickled module or a .pt2 with pickled parts (runs code from the file!)")
@click.option("--batch-size", type=int, default=512, show_default=True)
@form_options("cores", "the form the slim model is evaluated in")
def eval_cmd(checkpoint: Path, data_spec: str, base: Path | None, arch: str | None, trust_pickle: bool,
             batch_size: int, form: str, serve_shapes: tuple[str, ...]) -> None:
    """Accuracy of CHECKPOINT on the test split of DATA, and fidelity to the original model."""
    try:
        served = _form_args(form, serve_shapes)
    except CompressorError as exc:
        _fail(exc)
    if checkpoint.is_dir():
        return _eval_folder(checkpoint, data_spec, base, trust_pickle, batch_size, served)
    try:
        meta = read_metadata(checkpoint)
        if base is not None:
            original = load_model(base, arch=arch, trust_pickle=trust_pickle)
        elif arch:
            original = None
        else:
            # The recorded factory is only a hint: importing and calling code named by a file
            # someone else made is the user's decision, so it must come from the command line.
            recorded = meta.get("extra", {}).get("arch")
            hint = f" (it was made with --arch {recorded})" if recorded else ""
            raise ModelError(f"say which architecture the checkpoint belongs to{hint}: --base ORIGINAL_MODEL "
                             "or --arch package.module:factory")
        slim = load(checkpoint, base=original if original is not None else (lambda: import_arch(arch)))
        x, y = _load_data(data_spec, None)["test"]
        choice = _served(slim, *served, x[:8], read_blueprint(checkpoint), convert=True)
        t0 = time.perf_counter()
        rows = _eval_rows(slim, original, x, y, batch_size)
    except CompressorError as exc:
        _fail(exc)
    _print_metrics(f"{checkpoint} on {data_spec} ({x.shape[0]:,} samples, {time.perf_counter() - t0:.1f} s)", rows)
    _print_served(choice)


def _eval_rows(slim, original, x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> list[tuple[str, str]]:
    """Accuracy of the slim model (and the original's), and how closely it follows the original."""
    loader = TensorLoader(x, y, batch_size)
    rows = []
    if y is not None:
        rows.append(("accuracy (compressed)", f"{100 * evaluate(slim, loader):.2f}%"))
    ref = set_training(as_module(original), False) if original is not None else None
    check = compare_outputs(slim, TensorLoader(x, None, batch_size), ref)
    if ref is not None and y is not None:
        rows.append(("accuracy (original)", f"{100 * evaluate(ref, loader):.2f}%"))
    return rows + _fidelity_rows(check, ref is not None)


def _print_served(choice: FormChoice) -> None:
    """Which forms the evaluated model was in (nothing to say for the stored cores)."""
    if choice.asked == "cores":
        return
    if choice.shapes:
        out_console.print(forms_table(choice.to_dict()))
    else:
        counts = ", ".join(f"{n} {form}" for form, n in choice.counts().items())
        out_console.print(f"evaluated as {choice.asked}: {counts} ({choice.params:,} parameters)")


def _fidelity_rows(check, compared: bool) -> list[tuple[str, str]]:
    """Rows of what :func:`compare_outputs` saw: NaN/Inf outputs said as such, never as a difference of 0."""
    rows = []
    for who, bad in (("compressed", check.nonfinite), ("original", check.reference_nonfinite)):
        if bad:
            rows.append((f"outputs ({who})", f"not finite: NaN/Inf for {bad:,} of {check.examples:,} examples"))
    if not compared:
        return rows
    rows.append(("top-1 agreement with original", f"{100 * check.agreement:.2f}%"))
    if check.max_difference is None:
        rows.append(("max |logit difference|", "not finite (no example has finite outputs from both models)"))
    else:
        over = " (over the examples finite in both)" if check.nonfinite or check.reference_nonfinite else ""
        rows.append(("max |logit difference|", f"{check.max_difference:.4f}{over}"))
    return rows


def _print_metrics(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value")
    for r in rows:
        t.add_row(*r)
    out_console.print(t)


def _eval_folder(folder: Path, text: str, base: Path | None, trust_pickle: bool, batch_size: int,
                 served: tuple[str, list]) -> None:
    """A compressed model folder on text: perplexity (causal LMs) and fidelity to --base."""
    try:
        slim = load_slim_folder(folder)
        choice = _served(slim, *served, None, read_blueprint(slim_checkpoint_in(folder)), convert=True)
        t0 = time.perf_counter()
        n, rows = folder_fidelity(folder, text, base, EVAL_MAX_LENGTH, min(batch_size, 64), trust_pickle, slim)
    except CompressorError as exc:
        _fail(exc)
    _print_metrics(f"{folder} on {text} ({n:,} examples, {time.perf_counter() - t0:.1f} s)", rows)
    _print_served(choice)


if __name__ == "__main__":  # pragma: no cover
    main()
