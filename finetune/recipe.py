"""Recipes: YAML → typed, validated sections. Defaults live here and nowhere else.

Loading reports every problem at once, each with its YAML line and key and, for a misspelled
key, the nearest valid one. Paths in a recipe are relative to the recipe file; the loaded recipe
holds them resolved, so the copy saved in a run folder works from anywhere.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from finetune.errors import Problem, UserError
from finetune.serving import describe_character, dropped_by_ollama

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    base: str = Field(description="alias from `ft models`, hub id (org/name), or local folder")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run model code from the hub (off unless set)")
    allow_pickle: bool = Field(False, description="load pickle (.bin) weights; they can run code, so off unless set")
    chat_template: Path | None = Field(
        None, description="custom training template (Jinja, with {% generation %} markers)"
    )
    thinking: bool = Field(False, description="Qwen3.5: train and answer with thinking on")


ChatFields = Literal["messages", "conversations", "role", "content", "system", "prompt", "completion",
                     "instruction", "input", "output"]
DataFormat = Literal["auto", "chat", "sharegpt", "instruction", "prompt_completion"]


class DataSource(Section):
    """One training file among several (Axolotl's `datasets:` list, with LLaMA-Factory's sampling
    ratio)."""

    path: str = Field(description="jsonl/json/csv/parquet file, or hub dataset `hub:org/name`")
    weight: float = Field(1.0, gt=0, description="sampling ratio: each example is used `weight` times "
                          "(the fraction is a seeded sample), e.g. 0.5 uses half the file, 2 every example twice")
    format: DataFormat | None = Field(None, description="this file's record shape (unset: data.format)")
    columns: dict[ChatFields, str] | None = Field(None, description="this file's column names (unset: data.columns)")


class DataSection(Section):
    train: str | list[str | DataSource] = Field(
        description="jsonl/json/csv/parquet file or hub dataset `hub:org/name`; or a list of them, each a path "
        "or {path, weight, format, columns}")
    heldout: str | None = Field(None, description="held-out file; if unset, split from train")
    heldout_fraction: float = Field(0.1, gt=0, lt=0.9, description="share held out when splitting")
    heldout_max: int | None = Field(None, gt=0, description="cap on held-out examples")
    format: DataFormat = Field("auto", description="record shape; auto detects it from the first record")
    columns: dict[ChatFields, str] = Field(
        default_factory=dict, description="ft field → column in the file, e.g. {prompt: text}; for ShareGPT "
        "the list and its keys, e.g. {conversations: dialog, role: speaker, content: text}"
    )
    system_prompt: str | None = Field(None, description="system message added to every example (and the "
                                      "Modelfile's SYSTEM)")
    label_column: str | None = Field(
        None, description="column whose values are classes: stratifies the split (auto: a short "
        "completion with few distinct values)"
    )
    max_length: int = Field(1024, ge=16, description="tokens per example (prompt and answer)")
    too_long: Literal["error", "truncate", "drop"] = Field(
        "error", description="an example over max_length: error (names it), truncate, or drop")
    hub_split: str = Field("train", description="split to read from a hub dataset")
    limit: int | None = Field(None, gt=0, description="use N examples of each training file: a seeded random sample")

    @field_validator("system_prompt")
    @classmethod
    def _servable(cls, v: str | None) -> str | None:
        dropped = dropped_by_ollama(v or "")
        if dropped:
            at, ch = dropped[0]
            raise ValueError(f"holds {describe_character(ch)} at character {at + 1}"
                             + (f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else "")
                             + ", which Ollama's Modelfile parser drops: the model would be served another system "
                             "prompt than it was trained with; remove it (tabs and line breaks are fine)")
        return v

    @property
    def sources(self) -> list[DataSource]:
        """data.train as a list of sources, each with its own format and columns filled in."""
        entries = self.train if isinstance(self.train, list) else [self.train]
        sources = [DataSource(path=e) if isinstance(e, str) else e for e in entries]
        return [s.model_copy(update={"format": s.format or self.format,
                                     "columns": self.columns if s.columns is None else s.columns})
                for s in sources]


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: int = Field(32, ge=1, description="scaling numerator: updates are scaled by alpha/r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    targets: Literal["auto"] | list[str] = Field(
        "auto", description="module-name suffixes; auto = the family's list (`ft models`)"
    )
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    dora: bool = Field(False, description="weight-decomposed LoRA")


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="QLoRA: base weights in bitsandbytes 4-bit")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="also quantize the quantization constants")
    skip_modules: Literal["auto"] | list[str] = Field(
        "auto", description="linear layers kept in 16-bit; auto = the family's list"
    )
    cpu_dequantized_copies: Literal["auto"] | bool = Field(
        "auto", description="on a CPU, keep each frozen 4-bit weight's dequantized copy instead of "
        "dequantizing it in every forward and backward (the same numbers, computed once; bf16 under "
        "train.cpu_bf16); auto = when the fp32 copies fit in half the available RAM; never on a GPU or "
        "under FSDP/DeepSpeed"
    )


# train.rehearsal auto's share, from the with/without measurement on the demo (README, Rehearsal;
# bench/RESULTS.md 13): at 1/16 of the rows the job's format stopped leaking into general answers
# (15 of 30 → 0) and drift vanished, with every job metric inside the interval of the run without
# it; at 1/8 the job began to pay (category accuracy 0.87 → 0.78, one invalid JSON answer).
AUTO_REHEARSAL = 0.0625


class TrainSection(Section):
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: unsloth when CUDA is present, it imports and it can honour the recipe "
        "(nf4, double quantization, no DoRA, no sharding), else hf; unsloth: that or exit 2"
    )
    epochs: float = Field(1.0, gt=0, description="passes over the training set")
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    lr: float = Field(2e-4, gt=0, lt=1, description="peak learning rate")
    batch_size: int = Field(8, ge=1, description="examples per device per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps spent warming up")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapters")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    optimizer: str = Field("adamw_torch", description="any transformers `optim` name")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="recompute activations: less memory, ~30-45% slower; auto = on only when the "
        "preflight estimate without it would take over half the free memory")
    # auto: 1.64× the tokens/s of fp32 on the demo at equal held-out loss (bench/RESULTS.md 14)
    cpu_bf16: Literal["auto"] | bool = Field(
        "auto", description="on a CPU, matmuls in bf16 under autocast (weights, adapters and optimizer stay "
        "fp32); auto = where the CPU computes bf16 natively (AVX512-BF16 or AMX), never where it is emulated")
    packing: bool = Field(True, description="padding-free packing: a batch's examples share rows, boundaries "
                          "kept (same result, less padding; hf backend)")
    # batches of 4 support tickets drawn at random are 5% padding, grouped 0.3%; but on the SmolLM2
    # demo grouping cost 0.04-0.05 nats of held-out loss (bench/RESULTS.md 20; finetune/train/order.py)
    group_by_length: bool = Field(False, description="batch examples of similar length together: transformers' "
                                  "length-grouped sampler (random groups of up to 50 optimizer steps' rows, each "
                                  "sorted longest first); less padding where packing is off, but it changes which "
                                  "rows share a step and when (held-out loss 0.04 nats worse on the demo)")
    # exact (the same loss and gradients); off only to compare (bench/RESULTS.md 21)
    shared_prefix: bool = Field(True, description="compute the leading tokens every row of a micro-batch shares "
                                "(the system prompt) once, not once a row: padded rows on a CPU, no gradient "
                                "checkpointing (finetune/train/shared_prefix.py)")
    seed: int = Field(42, description="seeds data order, LoRA init and the held-out split")
    save_steps: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (oldest deleted)")
    logging_steps: int = Field(5, ge=1, description="metrics.jsonl row every N steps")
    eval_steps: int | None = Field(None, ge=1, description="held-out loss every N steps")
    rehearsal: Literal["auto"] | Annotated[float, Field(ge=0, lt=1)] = Field(
        "auto", description="share of training rows that are the base's own answers to ft's general prompts "
        f"(self-synthesised rehearsal: keeps general answers off the job's format); auto = {AUTO_REHEARSAL:g} on the "
        "hf backend in one process or under ddp, off under fsdp/deepspeed and unsloth; 0: off")
    rehearsal_prompts: int = Field(64, ge=1, description="general prompts rehearsal answers: the set's prompts "
                                   "after the first eval.general.max_prompts (never those the general section asks)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="also send the training curves to these trackers (installed "
        "separately); tensorboard writes into the run folder's tensorboard/")


class GeneralSection(Section):
    enabled: bool = Field(True, description="the general section of every ft eval report: format leakage, "
                          "drift and benchmarks, base vs fine-tuned (README, Held-out evaluation)")
    prompts: str | None = Field(None, description="JSON Lines file of {prompt, kind} rows: general prompts "
                                "added to ft's own 170 (or in their place, with replace_prompts)")
    replace_prompts: bool = Field(False, description="use only eval.general.prompts, not ft's own set")
    # 32 prompts × 48 tokens: the section then adds about a quarter to a third to the demo's ft eval
    # on 2 CPU cores (bench/RESULTS.md 12); the set is interleaved by kind, so the first 32 cover
    # every kind. A format that takes over shows at 32; a subtle leak needs more (null: all 170).
    max_prompts: int | None = Field(32, gt=0, description="general prompts asked: the first N of the set "
                                    "(null: all)")
    # 48 tokens: a leaked JSON object or label fits, and drift needs only the answers' opening tokens
    max_new_tokens: int = Field(48, ge=1, description="generation budget per general prompt (and per "
                                "rehearsal answer)")
    benchmarks: list[str] = Field(
        default_factory=list, description="multiple-choice JSON Lines files of {query, choices, gold} rows "
        "(llm-foundry's eval format), scored 0-shot by log-likelihood: acc and acc_norm")
    benchmark_max_items: int | None = Field(None, gt=0, description="cap on the items scored per benchmark "
                                            "(the first N)")


class EvalSection(Section):
    after_train: bool = Field(True, description="run the base-vs-fine-tuned comparison at the end of ft train")
    metrics: Literal["auto"] | list[str] = Field(
        "auto", description="metric names, or auto (chosen from the held-out answers; see README)")
    require: dict[str, float] = Field(
        default_factory=dict, description="gates: metric → minimum improvement over the base, "
        "e.g. {label_accuracy: 0.05, loss: 0.1} (loss must fall by 0.1)")
    max_new_tokens: int = Field(256, ge=1, description="generation budget per held-out prompt")
    batch_size: int = Field(8, ge=1, description="held-out examples per forward pass")
    max_examples: int | None = Field(None, gt=0, description="cap on held-out examples scored")
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples for the CIs")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence level of the intervals")
    general: GeneralSection = Field(default_factory=GeneralSection)


class DistributedSection(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="with --nproc > 1: ddp (a full copy per GPU), fsdp or deepspeed (sharded; GPUs only)")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage (3 also shards the weights)")
    cpu_offload: bool = Field(False, description="fsdp / deepspeed: keep optimizer state (and fsdp params) in CPU RAM")
    master_port: int = Field(29500, ge=1024, le=65535, description="rendezvous port of rank 0")


# the quantized GGUF types, largest first (export/quantize.py maps each to llama.cpp's LLAMA_FTYPE_MOSTLY_*)
QuantType = Literal["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s",
                    "iq3_m", "q2_k"]
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)


class ExportSection(Section):
    quant: Literal["f16", "bf16", "auto", QuantType] = Field(
        "q4_k_m", description="GGUF type of the shipped file; auto: the smallest of export.candidates whose "
        "held-out task metrics stay within export.tolerance of the fine-tuned model's")
    calibration_tokens: int = Field(
        8192, ge=256, description="training-conversation tokens the importance matrix is computed on")
    candidates: list[QuantType] = Field(
        default_factory=lambda: list(QUANT_TYPES), min_length=1, description="--quant auto: the types tried")
    tolerance: float = Field(
        0.01, ge=0, description="--quant auto: largest drop of any task metric (1 point = 0.01) the lower end "
        "of its paired bootstrap interval may show")
    num_ctx: int = Field(4096, ge=256, description="Modelfile context length")
    temperature: float = Field(0.0, ge=0, description="Modelfile sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Modelfile nucleus sampling")


class Recipe(Section):
    name: str = Field(description="run name: runs/<name>/")
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_NAME.match(v) or ".." in v:
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder under runs/)")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# Names other tools (TRL, transformers, Axolotl) use for our keys: a user moving a config over
# gets pointed at ours instead of a bare "unknown key".
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target_modules": "targets", "use_rslora": "rslora",
    "use_dora": "dora", "base_model": "base", "model_name": "base", "model_name_or_path": "base",
    "sequence_len": "max_length", "max_seq_length": "max_length", "dataset": "train",
    "val_set_size": "heldout_fraction", "warmup_steps": "warmup_ratio", "bnb_4bit_quant_type": "quant_type",
}


# --- loading ----------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}", fix="pass the path of a .yaml recipe")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where,
                        "fix the YAML syntax (indentation, colons, quotes)") from None
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections", str(path),
                        "start from a recipe in recipes/")
    data.setdefault("name", path.stem)
    for item in overrides:
        apply_override(data, item)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError([_problem(path, root, err, overrides) for err in exc.errors()]) from None
    return resolve_paths(recipe, path.parent)


def apply_override(data: dict, item: str) -> None:
    """`--set train.lr=1e-4`: the value is parsed as YAML, so numbers and lists work."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"bad override '{item}'", "--set", "write it as section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = _override_path(key)
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"'{part}' is not a section", f"--set {key}", "override a key inside a section")
    node[parts[-1]] = value


def _override_path(key: str) -> list[str]:
    """The dotted key split where the schema has sections; inside a map (eval.require) the rest is
    one map key, dots and all: `eval.require.json.category.accuracy` gates `json.category.accuracy`."""
    parts, model = key.split("."), Recipe
    for depth, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        if typing.get_origin(annotation) is dict:
            return parts[:depth + 1] + [".".join(parts[depth + 1:])]
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return parts


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def local(p: str | None) -> str | None:
        if p is None or p.startswith("hub:"):
            return p
        return str((base / p).resolve())

    if isinstance(recipe.data.train, list):
        recipe.data.train = [local(e) if isinstance(e, str) else e.model_copy(update={"path": local(e.path)})
                             for e in recipe.data.train]
    else:
        recipe.data.train = local(recipe.data.train)
    recipe.data.heldout = local(recipe.data.heldout)
    general = recipe.eval.general
    general.prompts = local(general.prompts)
    general.benchmarks = [local(b) for b in general.benchmarks]
    if recipe.model.chat_template is not None:
        recipe.model.chat_template = (base / recipe.model.chat_template).resolve()
    if (base / recipe.model.base).is_dir():  # a local folder, not an alias or hub id
        recipe.model.base = str((base / recipe.model.base).resolve())
    return recipe


def _node_at(root: yaml.Node | None, loc: tuple) -> tuple[yaml.Node | None, bool]:
    """The YAML node at a pydantic error location, or its deepest existing ancestor."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, v in node.value if k.value == str(part)), None)
            if child is None:
                return node, False
            node = child if part != loc[-1] else (key or child)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node, False
    return node, True


def _problem(path: Path, root, err: dict, overrides) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    key = ".".join(str(p) for p in loc)
    override = next((o for o in overrides if o.partition("=")[0] == key), None)
    node, exact = _node_at(root, loc)
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    where = f"--set {key}" if override else f"{path}{line} {key}".strip()
    if err["type"] == "extra_forbidden":
        section = _section_model(loc[:-1])
        options = list(section.model_fields) if section else []
        alias = OTHER_TOOLS_NAMES.get(str(loc[-1]))
        close = [alias] if alias in options else difflib.get_close_matches(str(loc[-1]), options, n=1, cutoff=0.5)
        fix = (f"did you mean '{close[0]}'? " if close else "") + f"valid keys here: {', '.join(options)}"
        return Problem(f"unknown key '{loc[-1]}'", where, fix)
    if err["type"] == "missing":
        return Problem(f"missing required key '{key}'", where, f"add '{loc[-1]}:' to the recipe")
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return Problem(err["msg"] + shown, where, _fix_for(loc))


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _fix_for(loc: tuple) -> str:
    section = _section_model(loc[:-1])
    if section is None or str(loc[-1]) not in section.model_fields:
        return "see the recipe keys in README.md"
    field = section.model_fields[str(loc[-1])]
    about = f" ({field.description})" if field.description else ""
    return f"set {'.'.join(map(str, loc))} to a valid value{about}"


def recipe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) for every recipe key: the README table (tests/test_readme.py keeps the two equal)."""
    rows = []

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            rows.append((prefix + name, _type_name(ann), default, field.description or ""))

    walk(Recipe, "")
    return rows


def _type_name(annotation) -> str:
    """A key's type as the README's table says it: `a / b` for choices, `list of T`, `map of K to V`,
    `{field, ...}` for a nested entry, `or null` for an optional key."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # a constrained type: its base type (the bounds are in the description)
        return _type_name(args[0])
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type_name(a) for a in args if a is not type(None)]
        return " / ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_grouped(_type_name(args[0]))}"
    if origin is dict:
        return f"map of {_grouped(_type_name(args[0]))} to {_grouped(_type_name(args[1]))}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return getattr(annotation, "__name__", str(annotation))


def _grouped(text: str) -> str:
    return f"({text})" if " / " in text else text


def keys_markdown() -> str:
    """The README's recipe-key table (tests/test_readme.py keeps the two identical)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k}` | {t} | {d} | {about} |" for k, t, d, about in recipe_keys()]
    return "\n".join(rows)
