"""`ft`: the command line. Each command is a thin shell over one module.

The one place allowed to import every stage: finetune (training), eval and export. Elsewhere the
direction is one way, finetune ← export ← eval (export uses finetune's recipes, registry and data;
eval also uses export's GGUF runtime); nothing in finetune but this file imports eval or export.

Exit codes (finetune/errors.py): 0 success, 1 a bug in ft, 2 a problem the user can fix (one message,
no traceback), 3 an eval gate failed, 4 an export failed verification.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from finetune import allocator, logs
from finetune.errors import (EXIT_GATE_FAILED, EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, EXIT_VERIFY_FAILED,
                             GateFailed, Interrupted, UserError, VerifyFailed)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune an open-weight model on your data, prove it helps, ship a GGUF.")
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

SET_HELP = "override a recipe key, e.g. --set train.lr=1e-4 (repeatable)"


@app.command()
def train(
    recipe: str = typer.Argument(..., help="recipe YAML file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output: Optional[str] = typer.Option(None, help="run folder (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run folder first"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes (GPUs) on this host, launched through accelerate"),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="hosts taking part (run the same command on each)"),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="this host's index, 0 to nnodes-1"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="address of the node-rank-0 host"),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1024, max=65535,
                                              help="its port (default distributed.master_port)"),
):
    """4-bit LoRA SFT of the recipe's base model on its data; writes a run folder."""
    from finetune.distributed import world
    from finetune.recipe import load_recipe
    from finetune.run import run_for
    from finetune.train.runner import train as run_training

    loaded = load_recipe(recipe, set_)
    run = run_for(loaded.name, output)
    if (nproc > 1 or nnodes > 1) and world().size == 1:
        args = [recipe, *(a for o in set_ for a in ("--set", o)), *(["--output", output] if output else []),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]
        _launch(loaded, args, nproc, nnodes, node_rank, master_addr, master_port or loaded.distributed.master_port)
        return
    main_rank = world().main
    if main_rank:
        err.print(f"[bold]ft train[/bold] {loaded.name} → {run.root}")
    summary = run_training(loaded, run, resume=resume, overwrite=overwrite, console=err if main_rank else None,
                           checks=[_eval_can_run], rehearsal=_rehearsal_rows)
    if not main_rank:
        return  # rank 0 reports, evaluates and writes; the others are done
    import gc

    from finetune.lm_head import release_workspace

    gc.collect()  # the trained model (trainer, callbacks and model refer to each other) before eval loads another
    release_workspace()  # the loss head's kept tiles
    allocator.release_freed_memory()
    start, end = summary.heldout_loss_start, summary.heldout_loss_end
    if end is None:  # a sharded run finished from its last checkpoint (runner.finish)
        out.print("held-out loss after training: not measured on this resume (ft eval measures it)")
    else:
        out.print(f"held-out loss: {start:.4f} → {end:.4f}" if start is not None else f"held-out loss: {end:.4f}")
    out.print(f"adapter: {run.adapter}")
    if loaded.eval.after_train:
        _evaluate(run)


def _eval_can_run(recipe, splits) -> str:
    """eval's check, handed to finetune (which cannot import eval): the metrics the held-out
    answers call for, and every eval.require gate among them. Imported late: `ft train` must
    import unsloth, when it trains with it, before anything imports transformers."""
    from eval.runner import check_before_training

    return check_before_training(recipe, splits)


def _rehearsal_rows(recipe, model, prep, progress):
    """train.rehearsal's rows, made by eval (its generation and general prompts), handed to finetune."""
    from eval.rehearsal import rehearsal_rows
    from eval.runner import base_identity

    return rehearsal_rows(recipe, model, prep, base_identity(prep.base.path), progress)


def _launch(recipe, args: list[str], nproc: int, nnodes: int, node_rank: int, addr: str, port: int) -> None:
    """Check what can be checked once, here, then start every process through accelerate."""
    import subprocess

    from finetune.distributed import launch_command
    from finetune.run import run_for
    from finetune.train.plan import plan_training

    if node_rank >= nnodes:
        raise UserError(f"--node-rank {node_rank} with --nnodes {nnodes}", "--node-rank", f"use 0 to {nnodes - 1}")
    # every check ft train makes before loading weights, once, before any process starts
    plan = plan_training(recipe, run_for(recipe.name, None).root, nproc * nnodes, [_eval_can_run]).batches
    err.print(f"[bold]ft train[/bold] {recipe.name}: {nproc * nnodes} processes ({recipe.distributed.strategy}), "
              f"{plan.micro_batch} × {plan.grad_accum} per process, global batch {plan.global_batch}")
    code = subprocess.call(launch_command(args, nproc, nnodes, node_rank, addr, port))
    if code:
        sys.exit(code)


def _evaluate(run, overrides: list[str] = (), gguf: bool = False, served=None) -> None:
    from eval.report import json_shapes_note, served_lines, table
    from eval.runner import check_gates, evaluate

    err.print("[bold]ft eval[/bold]: base vs fine-tuned" + (" vs the exported GGUF" if gguf or served else "")
              + (f" vs the server at {served.url}" if served else "") + " on the held-out set")
    report = evaluate(run, overrides=overrides, gguf=gguf, served=served,
                      progress=lambda line: err.print(f"  {line}", markup=False, highlight=False))
    out.print(table(report, run.root.name))
    if report.json_shapes:
        out.print(json_shapes_note(report), markup=False, highlight=False)
    if report.general:
        out.print(report.general.verdict(), markup=False, highlight=False)
    if report.served:
        for line in served_lines(report.served):
            out.print(line, markup=False, highlight=False)
    for gate in report.gates:
        out.print(gate.message())
    out.print(f"report: {run.eval_dir / 'report.md'}")
    check_gates(report)


@app.command("eval")
def eval_(
    run: Optional[str] = typer.Argument(None, help="run folder (default: the newest under runs/)"),
    set_: list[str] = typer.Option([], "--set", help="override an eval key, e.g. --set eval.require.json_valid=0.5"),
    gguf: bool = typer.Option(False, "--gguf", help="add the exported GGUF (run ft export first) as a column"),
    served_url: Optional[str] = typer.Option(None, "--served", help="also ask a running OpenAI-compatible server "
                                             "(Ollama: http://localhost:11434) and compare it with the GGUF"),
    model: Optional[str] = typer.Option(None, "--model", help="--served: the server's model name (default: the "
                                        "one it lists)"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="--served: requests in flight at once"),
    timeout: float = typer.Option(300.0, "--timeout", min=1, help="--served: seconds to wait for one answer"),
    request_field: list[str] = typer.Option([], "--request-field", help="--served: KEY=VALUE added to every request "
                                            "as your application sends it (VALUE in YAML), e.g. repeat_penalty=1"),
):
    """Compare base and fine-tuned on the held-out set; exit 3 if a recipe gate fails."""
    from eval.runner import ServedRequest
    from finetune.run import find_run

    bad = [o for o in set_ if not o.startswith("eval.")]
    if bad:
        raise UserError(f"ft eval only overrides eval.* keys, not {bad[0]}", "--set",
                        "change training settings in the recipe and train again")
    chosen = find_run(run)
    logs.attach(chosen.root / "logs" / "eval.log")
    if not served_url and (model is not None or concurrency != 1 or timeout != 300.0 or request_field):
        raise UserError("--model, --concurrency, --timeout and --request-field apply to --served", "--served",
                        "add --served URL (the server to ask), or drop them")
    served = (ServedRequest(served_url, model, concurrency, timeout, _request_fields(request_field))
              if served_url else None)
    _evaluate(chosen, set_, gguf, served)


def _request_fields(pairs: list[str]) -> dict:
    import yaml

    fields = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--request-field {pair!r} is not KEY=VALUE", "--request-field",
                            "e.g. --request-field repeat_penalty=1")
        fields[key] = yaml.safe_load(value)
    return fields


@app.command()
def export(
    run: Optional[str] = typer.Argument(None, help="run folder (default: the newest under runs/)"),
    quant: str = typer.Option(None, help="q4_k_m, another llama.cpp type (README), f16, bf16, or auto: the smallest "
                              "that keeps the held-out scores (default: the recipe's export.quant)"),
    imatrix: bool = typer.Option(True, "--imatrix/--no-imatrix",
                                 help="calibrate the quantization on the run's training conversations"),
    keep_f16: bool = typer.Option(False, "--keep-f16", help="keep the 16-bit intermediate GGUF"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip tokenizer/logit/stop verification"),
    format_: str = typer.Option("gguf", "--format", help="gguf, or hf to also write merged safetensors"),
    renderer: bool = typer.Option(False, "--renderer", help="Modelfile uses Ollama's built-in RENDERER/PARSER"),
    ollama: Optional[str] = typer.Option(None, "--ollama", help="run `ollama create NAME` when ollama is installed"),
):
    """Merge the adapter into the base, write GGUF, quantize, write a Modelfile, verify."""
    from export.quantize import FTYPES, SIXTEEN_BIT
    from export.runner import export_run, ollama_create
    from finetune.recipe import load_recipe
    from finetune.run import find_run

    chosen = find_run(run)
    logs.attach(chosen.root / "logs" / "export.log")
    recipe = load_recipe(chosen.recipe)
    quant = quant or recipe.export.quant
    if quant not in (*SIXTEEN_BIT, *FTYPES, "auto"):
        raise UserError(f"unknown --quant '{quant}'", "--quant",
                        f"use one of: {', '.join((*SIXTEEN_BIT, *FTYPES, 'auto'))}")
    if format_ not in ("gguf", "hf"):
        raise UserError(f"unknown --format '{format_}'", "--format", "use gguf or hf")
    err.print(f"[bold]ft export[/bold] {chosen.root} → {chosen.export_dir} ({quant})")
    progress = lambda m: err.print(f"  {m}", markup=False, highlight=False)  # noqa: E731
    choose_quant = None
    if quant == "auto":
        from eval.quant_choice import chooser

        choose_quant = lambda prep: chooser(recipe, prep, chosen.export_dir, progress)  # noqa: E731
    report = export_run(chosen, quant, keep_f16=keep_f16, verify=not no_verify, hf=format_ == "hf",
                        renderer=renderer, progress=progress, calibrated=imatrix, choose_quant=choose_quant)
    if report.auto:
        out.print(f"auto chose {report.quant} (every candidate's size and scores: "
                  f"{chosen.export_dir / 'quant_auto.json'})")
    verify_note = "verified" if report.verify else "not verified (--no-verify)"
    out.print(f"wrote {chosen.export_dir}")
    for name, size in report.files.items():
        out.print(f"  {name}  {size / 2**20:,.1f} MiB")
    out.print(f"{verify_note}; peak memory {report.peak_rss_mib:,.0f} MiB; {report.seconds:.0f} s")
    modelfile_path = chosen.export_dir / "Modelfile"
    if ollama:
        out.print(ollama_create(ollama, modelfile_path))
    else:
        out.print(f"next: ollama create {recipe.name} -f {modelfile_path}")


@app.command()
def chat(
    run: Optional[str] = typer.Argument(None, help="run folder (default: the newest under runs/)"),
    gguf: bool = typer.Option(False, "--gguf", help="chat with the exported GGUF through llama.cpp (run ft export first)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="answer this one message and exit (scriptable)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="answer length limit (default: the recipe's eval.max_new_tokens)"),
    no_system_prompt: bool = typer.Option(False, "--no-system-prompt",
                                          help="send no system message, as ft eval's general prompts are sent"),
):
    """Talk to the fine-tune in the terminal, with the served template and system prompt."""
    from eval.chat import interactive, open_chat
    from finetune.run import find_run

    chosen = find_run(run)
    logs.attach(chosen.root / "logs" / "chat.log")
    session = open_chat(chosen, gguf, max_new_tokens, system_prompt=not no_system_prompt)
    if prompt is not None:
        session.reply(prompt, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    interactive(session)


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="recipe YAML file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    show: int = typer.Option(0, "--show", min=0, help="also print N rows as the model sees them, trained tokens marked"),
    split: str = typer.Option("train", "--split", help="--show: train (training rows) or heldout (served prompts)"),
    tokens: bool = typer.Option(False, "--tokens", help="--show: one line per token (position, id, trained, token)"),
):
    """Check a recipe without training: keys, files, data, model, chat template, metrics, memory."""
    from finetune.validate import validate as validate_recipe

    if split not in ("train", "heldout"):
        raise UserError(f"unknown --split '{split}'", "--split", "use train or heldout")
    validated = validate_recipe(recipe, set_, checks=[_eval_can_run])
    for line in validated.report:
        out.print(f"[green]ok[/green] {line}")
    if show:
        if validated.plan.prep is None:
            raise UserError(f"--show needs the base model's tokenizer: {validated.plan.not_checked}", "--show",
                            "run it where the model can be downloaded, or point model.base at a local folder")
        _show(validated.recipe, validated.plan.prep, show, split, tokens, validated.plan.rehearsal_share)


def _show(recipe, prep, count: int, split: str, tokens: bool, rehearsal: float = 0.0) -> None:
    from finetune import show as show_mod

    rows = (show_mod.training_rows(prep, recipe, count) if split == "train"
            else show_mod.heldout_rows(prep, count))
    markers = not out.is_terminal or out.no_color  # piped, or NO_COLOR: colour cannot carry the marking
    legend = (f"trained tokens between {show_mod.TRAINED_OPEN} and {show_mod.TRAINED_CLOSE}" if markers
              else "[bold green]trained tokens in green[/bold green], [cyan]special tokens in cyan[/cyan]")
    for line in show_mod.describe(prep, recipe, split):
        out.print(line, markup=False, highlight=False)
    out.print(legend, highlight=False)
    for index, row in enumerate(rows, 1):
        out.print(show_mod.header(row, index, prep.base.family.end_of_turn, prep.tokenizer), markup=False,
                  highlight=False)
        if tokens:
            out.print("\n".join(show_mod.token_lines(prep.tokenizer, row.input_ids, row.labels)), markup=False,
                      highlight=False)
        else:
            out.print(show_mod.as_text(show_mod.segments(prep.tokenizer, row.input_ids, row.labels), markers),
                      highlight=False)
    if split == "train" and rehearsal:
        _show_rehearsal(recipe, prep, count, markers, rehearsal)
    available = len(prep.splits.train if split == "train" else prep.splits.heldout)
    if len(rows) < count:
        out.print(f"(the {split} split has {available} examples: {len(rows)} rows shown)", markup=False,
                  highlight=False)
    if split == "train":
        out.print(show_mod.summarize(prep, recipe).line(), markup=False, highlight=False)


def _show_rehearsal(recipe, prep, count: int, markers: bool, share: float) -> None:
    """train.rehearsal's rows after the job's: their share of `count`, at least one."""
    import math

    from eval.rehearsal import shown_rows
    from eval.runner import base_identity
    from finetune import show as show_mod

    rows = shown_rows(recipe, prep, max(1, math.ceil(count * share)), base_identity(prep.base.path))
    out.print(f"train.rehearsal {share:g}: rows of the base's own answers to general prompts "
              "(no system message), mixed into the training rows", markup=False, highlight=False)
    for index, row in enumerate(rows, 1):
        out.print(show_mod.header(row, index, prep.base.family.end_of_turn, prep.tokenizer), markup=False,
                  highlight=False)
        out.print(show_mod.as_text(show_mod.segments(prep.tokenizer, row.input_ids, row.labels), markers),
                  highlight=False)


@app.command()
def models(
    sizes: bool = typer.Option(False, "--sizes", help="also each published size's shape and the memory "
                               "support.yaml would take (computed from the published config, nothing downloaded)"),
):
    """List the base-model registry and the families ft knows."""
    from finetune.models import REGISTRY

    table = Table("alias", "family", "source", "gguf arch", "license", "about")
    for m in REGISTRY.values():
        source = m.hub_id or "tiny twin (built locally, random weights)"
        if m.packaged:
            source += f"; offline: {m.weights_offline}"
        table.add_row(m.alias, m.family.name, source, m.family.gguf_arch, m.license, m.about)
    out.print(table)
    from finetune.models import FAMILIES

    for f in FAMILIES:
        out.print(f"[bold]{f.name}[/bold]: model_type {', '.join(f.model_types)}; end of turn "
                  f"{' '.join(f.end_of_turn)}; LoRA targets {', '.join(f.lora_targets)}")
    if sizes:
        from finetune.preflight import human
        from finetune.sizes import estimate, published

        table = Table("alias", "layers × hidden", "heads / KV", "embeddings", "parameters (embedding)",
                      "GPU (bf16)", "CPU (fp32)", "config")
        for model in published():
            e, s = estimate(model.alias), model.shape
            table.add_row(model.alias, f"{s.layers} × {s.hidden}", f"{s.heads} / {s.kv_heads}",
                          "tied" if s.tied_embeddings else "untied",
                          f"{e.parameters / 1e9:.2f} B ({e.embedding / 1e9:.2f} B)", human(e.gpu.total),
                          human(e.cpu.total), s.config)
        out.print(table)
        out.print("memory: 4-bit base, LoRA r=16, batch 8 × 1,024 tokens, gradient checkpointing on "
                  "(recipes/support.yaml); a base checkpoint has its size's shape")


def quiet_libraries() -> None:
    """ft draws its own progress; the libraries' bars and info logs would interleave with it.
    Nothing heavy is imported here: `ft train` must import unsloth (when it trains with it)
    before transformers, so each command imports the libraries itself (see `before_command`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logs.capture()  # library warnings go to <run>/logs/<command>.log, not the terminal


@app.callback()
def before_command(ctx: typer.Context) -> None:
    """Quiet transformers and datasets before any command but `train` (which does it itself,
    right after choosing its backend)."""
    if ctx.invoked_subcommand != "train":
        logs.quiet_hf_libraries()


def usage_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) as the installed typer raises them. typer >= 0.24 parses with its own
    copy of click (typer._click), whose exceptions are not click's: catching click's alone turned
    `ft` with no arguments, a missing argument or `--nproc 0` into "internal error"."""
    import click

    errors, aborts = [click.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # an older typer: click's own exceptions are the ones raised
        pass
    else:
        errors.append(vendored.ClickException)
        aborts.append(typer.Abort)
    return tuple(errors), tuple(aborts)


def main() -> None:
    """Entry point: maps errors to exit codes and one-line messages."""
    usage, aborts = usage_errors()
    quiet_libraries()
    from finetune.distributed import world

    if not world().main:  # rank 0 speaks for the run; the others' messages would repeat it
        err.quiet = True
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err.print(exc.render(), markup=False, highlight=False)
        sys.exit(EXIT_USER_ERROR)
    except GateFailed as exc:
        err.print("\n".join(exc.messages), markup=False, highlight=False)
        sys.exit(EXIT_GATE_FAILED)
    except Interrupted as exc:
        where = f"; checkpoint {exc.checkpoint}" if exc.checkpoint else ""
        err.print(f"stopped by {signal.Signals(exc.signum).name} at step {exc.step}{where}\n"
                  f"resume with: ft train {' '.join(sys.argv[2:])} --resume".replace(" --resume --resume", " --resume"),
                  markup=False, highlight=False)
        sys.exit(128 + exc.signum)
    except VerifyFailed as exc:
        err.print("verification FAILED: " + "\n  ".join(exc.failures), markup=False, highlight=False)
        err.print(f"the file is kept as {exc.path}; details in {exc.path.parent / 'verify.json'}", markup=False)
        sys.exit(EXIT_VERIFY_FAILED)
    except usage as exc:  # usage errors (a missing argument, an option out of range): the user's to fix
        exc.show()
        sys.exit(EXIT_USER_ERROR)
    except (*aborts, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        err.print("internal error in ft (exit 1): please report it with the traceback above")
        sys.exit(EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    main()
