"""The general section (eval/general.py): what the fine-tune kept and lost beside the job.

Checked against references: the multiple-choice scorer against a log-likelihood computed by hand
(one unpadded forward per choice), acc_norm against its definition, a zero adapter against the
base (every delta exactly zero), the JSON-trained twin against its base (leakage and drift show),
and the benchmark files' strict reading. Not exercised here: lm-evaluation-harness itself (its
figures on the same items are bench/general_vs_lm_eval.py's job), a hub benchmark dataset.
"""

from __future__ import annotations

import json

import pytest
import torch

from eval import general as G
from eval.stats import mean_interval
from finetune.recipe import load_recipe
from tests.conftest import ROOT, run_ft

RECIPE = ROOT / "recipes" / "tiny-support.yaml"
ITEMS = [G.ChoiceItem("Question: Which is a color?", ["blue", "seven", "a running dog"], 0, "t:1"),
         G.ChoiceItem("The cup fell, therefore", ["it broke.", "it sang a song about the sea."], 0, "t:2")]


def peft_model(run, zero: bool = False):
    """The run's base as training loaded it, with the run's adapter (or a fresh, all-zero one)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from finetune.adapter import base_of_run
    from finetune.loading import load_base_model, prepare

    recipe = load_recipe(run.recipe)
    prep = prepare(recipe, base_of_run(run))
    base = load_base_model(recipe, prep.base)
    if zero:  # LoRA's B starts at zero: the adapter changes nothing
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    else:
        model = PeftModel.from_pretrained(base, str(run.adapter))
    return recipe, prep, model.eval()


def hand_loglik(model, tokenizer, query: str, choice: str, adapter: bool) -> float:
    """One unpadded forward of query + " " + choice; the continuation's tokens are what the whole
    adds to the query's own encoding (lm-evaluation-harness's _encode_pair)."""
    context = tokenizer.encode(query, add_special_tokens=False)
    whole = tokenizer.encode(query + " " + choice, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        if adapter:
            logits = model(input_ids=ids).logits[0].float()
        else:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, whole[t]] for t in range(len(context), len(whole))))


def test_multiple_choice_equals_a_hand_computed_log_likelihood(qwen_run):
    _, prep, model = peft_model(qwen_run)
    for adapter in (False, True):
        got = G.choice_logliks(model, prep.tokenizer, ITEMS, batch_size=3, adapter=adapter)
        want = [[hand_loglik(model, prep.tokenizer, i.query, c, adapter) for c in i.choices] for i in ITEMS]
        assert sum(got, []) == pytest.approx(sum(want, []), rel=1e-4, abs=1e-4)
    # the adapter changes the scores (so the two columns are really two models)
    base = G.choice_logliks(model, prep.tokenizer, ITEMS, 3, adapter=False)
    tuned = G.choice_logliks(model, prep.tokenizer, ITEMS, 3, adapter=True)
    assert sum(base, []) != pytest.approx(sum(tuned, []))


def test_acc_norm_divides_by_the_choice_length_in_characters():
    item = G.ChoiceItem("q", ["ab", "abcdefgh"], 1, "t:1")
    # sums: -3 for 2 characters (-1.5 a character), -8 for 8 characters (-1.0 a character)
    acc, acc_norm = G.multiple_choice_correct([item], [[-3.0, -8.0]])
    assert acc == [0.0] and acc_norm == [1.0]


@pytest.mark.parametrize("bf16", [False, True], ids=["compute-dtype", "bf16-autocast"])
def test_a_zero_adapter_against_its_base_gives_zero_deltas(qwen_run, bf16):
    """In both precisions the section runs in (section_precision: bf16 autocast where training
    used it; forced here, so a CPU without native bf16 runs it too, emulated)."""
    recipe, prep, model = peft_model(qwen_run, zero=True)
    recipe = load_recipe(qwen_run.recipe, ["eval.general.max_prompts=12", "eval.general.max_new_tokens=16",
                                           f"train.cpu_bf16={str(bf16).lower()}"])
    refs = [e.messages[-1]["content"] for e in prep.splits.heldout]
    general = G.evaluate_general(recipe, model, prep, refs, ["zero-adapter"], {}, use_cache=False)
    assert general.precision == ("bf16 autocast" if bf16 else "compute dtype")
    assert [r.key for r in general.rows] == ["general.leakage", "general.clean_stop", "general.drift_loss",
                                             "general.drift_kl"]
    for row in general.rows:
        assert row.delta == pytest.approx(0, abs=1e-5) and row.low == pytest.approx(0, abs=1e-5), row
        assert not row.lost
    assert general.row("general.drift_kl").tuned == pytest.approx(0, abs=1e-6)


def test_a_json_trained_adapter_leaks_its_format_and_drifts(qwen_run):
    """The twin trained on JSON tickets answers general prompts in JSON where its base never does:
    leakage and both drift measures show, with intervals wholly on the losing side."""
    recipe, prep, model = peft_model(qwen_run)
    recipe = load_recipe(qwen_run.recipe, ["eval.general.max_prompts=24", "eval.general.max_new_tokens=48"])
    refs = [e.messages[-1]["content"] for e in prep.splits.heldout]
    general = G.evaluate_general(recipe, model, prep, refs, ["json-twin"], {}, use_cache=False)
    assert general.shape.startswith("one JSON object")
    leakage = general.row("general.leakage")
    assert leakage.base == 0.0 and leakage.tuned >= 0.5 and leakage.lost, leakage
    asks_for_json = sum(p.kind == "json" for p in G.general_prompts(recipe))
    assert asks_for_json and leakage.items == 24 - asks_for_json  # a prompt asking for JSON cannot leak
    kl = general.row("general.drift_kl")
    assert general.row("general.drift_loss").lost and kl.low > 0 and not kl.lost  # KL has a size, no side
    assert "leakage: answers in the job's shape (+" in general.verdict()
    assert general.examples and all(json.loads(e["fine-tuned"]) for e in general.examples)


def test_drift_equals_a_hand_computation_from_the_full_logits(qwen_run):
    """drift() runs the decoder without its LM head, takes the base's side from stored hidden
    states and the head only at answer positions: its figures must equal loss and KL computed the
    plain way, from each model's full logits over one unpadded sequence."""
    recipe, prep, model = peft_model(qwen_run)
    items = G.prompt_items(G.general_prompts(load_recipe(qwen_run.recipe, ["eval.general.max_prompts=5"])),
                           prep.renderer)
    answers = [G.Generation("", False, [11 + k, 200 + k, 7, 300 + 2 * k][: 2 + k % 3]) for k in range(len(items))]
    answered = G.answered_items(items, answers)
    states, _ = G.answer_states(model, prep.tokenizer, answered, batch_size=2, adapter=False)
    got = G.drift(model, prep.tokenizer, answered, states, batch_size=2)
    for item, (base_loss, tuned_loss, kl) in zip(answered, got):
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            tuned = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        positions = [t for t in range(len(item.labels) - 1) if item.labels[t + 1] != -100]
        targets = [item.labels[t + 1] for t in positions]
        want_base = -float(base[positions, targets].mean())
        want_tuned = -float(tuned[positions, targets].mean())
        want_kl = float((base[positions].exp() * (base[positions] - tuned[positions])).sum(-1).mean())
        assert (base_loss, tuned_loss, kl) == pytest.approx((want_base, want_tuned, want_kl), rel=1e-4, abs=1e-5)
    assert got[0][2] > 0  # the trained adapter moves the distribution: the check is not 0 == 0


def test_the_base_answers_are_cached_per_precision():
    """Answers decoded in bf16 autocast are not the fp32 ones (greedy decoding flips at near-ties):
    each precision has its own cache entry."""
    fp32 = load_recipe(RECIPE, ["train.cpu_bf16=false"])
    bf16 = load_recipe(RECIPE, ["train.cpu_bf16=true"])
    assert G.base_answers_key(["b"], fp32, []) != G.base_answers_key(["b"], bf16, [])
    assert G.base_answers_key(["b"], fp32, []) == G.base_answers_key(["b"], load_recipe(RECIPE, ["train.cpu_bf16=false"]), [])


def test_the_job_shape_follows_the_held_out_answers():
    assert G.job_shape(['{"a": 1}', '{"a": 2}']).matches('{"b": 3}')
    labels = G.job_shape(["billing", "technical"] * 10)
    assert labels.matches(" billing ") and not labels.matches("The capital is Paris.")
    assert G.job_shape([f"free text answer number {i}" for i in range(20)]) is None


def test_mean_interval_of_a_constant_has_zero_width():
    assert mean_interval([0.5] * 40, samples=200) == (0.5, 0.5, 0.5)
    mean, low, high = mean_interval([0.0, 1.0] * 20, samples=500)
    assert mean == 0.5 and low < 0.5 < high


BAD_ROWS = [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "an index into choices (0 to 1), got 2"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "at least two non-empty strings"),
    ('{"choices": ["a", "b"], "gold": 0}', '"query" is missing'),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "an index into choices"),
    ('["q", ["a", "b"], 0]', "not a JSON object"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_benchmark_files_are_read_strictly(row, message, tmp_path, qwen_twin):
    """A bad row is exit 2 naming the file and line, from `ft validate` (before any training)."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"query": "fine", "choices": ["a", "b"], "gold": 1}\n' + row + "\n")
    result = run_ft("validate", str(RECIPE), "--set", f"eval.general.benchmarks=[{bench}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{bench}:2" in result.stderr and message in result.stderr and "fix:" in result.stderr


def test_a_gate_on_a_general_row_is_known_before_training(qwen_twin, tmp_path):
    ok = run_ft("validate", str(RECIPE), "--set", "eval.require={general.leakage: -0.02}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run_ft("validate", str(RECIPE), "--set", "eval.require={general.no_such_row: 0}")
    assert bad.returncode == 2 and "general.drift_kl" in bad.stderr, bad.stderr[-2000:]
    off = run_ft("validate", str(RECIPE), "--set", "eval.require={general.leakage: -0.02}",
                 "--set", "eval.general.enabled=false")
    assert off.returncode == 2, off.stderr[-2000:]


def test_ft_eval_reports_the_general_section_and_gates_on_it(qwen_run, tmp_path):
    """Through the CLI: the section is in report.json and report.md, the base's answers are cached
    for the next run, and a gate on leakage fails (exit 3) on the JSON-trained twin."""
    import shutil

    from finetune.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(qwen_run.root, run.root, ignore=shutil.ignore_patterns("checkpoints"))
    cache = {"FT_CACHE": str(tmp_path / "cache")}  # the base's answers start uncached
    result = run_ft("eval", str(run.root), env=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run.eval_dir / "report.json").read_text())
    rows = {r["key"]: r for r in report["general"]["rows"]}
    assert set(rows) == {"general.leakage", "general.clean_stop", "general.drift_loss", "general.drift_kl"}
    assert report["general"]["prompts"] == 24 and not report["general"]["base_cached"]
    assert "## Beside the job" in (run.eval_dir / "report.md").read_text()
    gated = run_ft("eval", str(run.root), "--set", "eval.require.general.leakage=-0.02", env=cache)
    assert gated.returncode == 3 and "general.leakage at its interval's worst end" in gated.stdout + gated.stderr
    again = json.loads((run.eval_dir / "report.json").read_text())["general"]
    assert again["base_cached"] and again["rows"] == report["general"]["rows"]  # same answers from the cache


def test_ft_ships_its_own_varied_general_prompts(tmp_path):
    """At least 150 prompts over every kind the section is meant to cover, interleaved so any
    first N (eval.general.max_prompts) is a mix; none copied from a published benchmark (checked
    against IFEval's prompts and ARC-Easy's questions where ../shared has them); a user's file
    extends or replaces the set."""
    recipe = load_recipe(RECIPE, ["eval.general.max_prompts=null"])
    prompts = G.general_prompts(recipe)
    kinds = [p.kind for p in prompts]
    assert len(prompts) >= 150 and len({p.text for p in prompts}) == len(prompts)
    assert {"fact", "howto", "advice", "writing", "summarise", "translate", "arithmetic", "code", "one_word",
            "list", "json"} <= set(kinds)
    assert len(set(kinds[:12])) == 12
    from tests.conftest import SHARED

    published = SHARED / "data" / "general"
    if published.is_dir():
        theirs = {json.loads(line)["prompt"].strip() for line in (published / "ifeval_input_data.jsonl").open()}
        theirs |= {json.loads(line)["query"].removeprefix("Question: ").strip()
                   for line in (published / "arc_easy.jsonl").open()}
        assert not {p.text for p in prompts} & theirs
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "Name a river in Spain.", "kind": "fact"}\n')
    extended = G.general_prompts(load_recipe(RECIPE, [f"eval.general.prompts={mine}", "eval.general.max_prompts=null"]))
    assert len(extended) == len(prompts) + 1 and extended[-1].where == f"{mine}:1"
    replaced = G.general_prompts(load_recipe(RECIPE, [f"eval.general.prompts={mine}",
                                                      "eval.general.replace_prompts=true"]))
    assert [p.text for p in replaced] == ["Name a river in Spain."]


def test_ft_chat_without_a_system_prompt_is_the_general_sections_chat(qwen_run, tmp_path):
    """`ft chat --no-system-prompt --prompt P` answers what the general section recorded for P
    (eval/general.jsonl): the two agree on what "without the job's system prompt" means."""
    import shutil

    from finetune.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(qwen_run.root, run.root, ignore=shutil.ignore_patterns("checkpoints"))
    result = run_ft("eval", str(run.root), "--set", "eval.general.max_prompts=3")
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = [json.loads(line) for line in (run.eval_dir / "general.jsonl").read_text().splitlines()]
    assert len(recorded) == 3
    first = recorded[0]
    chat = run_ft("chat", str(run.root), "--prompt", first["prompt"], "--no-system-prompt", "--max-new-tokens", "32")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() == first["fine-tuned"]["text"]


def test_ft_eval_adds_a_benchmark_to_an_existing_runs_report(qwen_run, tmp_path):
    """`ft eval RUN --set eval.general.benchmarks=[FILE]`: the file's acc and acc_norm rows join the
    section, each over the file's items (capped by benchmark_max_items), base and fine-tuned."""
    import shutil

    from finetune.run import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(qwen_run.root, run.root, ignore=shutil.ignore_patterns("checkpoints"))
    bench = tmp_path / "colors.jsonl"
    bench.write_text("".join(json.dumps({"query": i.query, "choices": i.choices, "gold": i.gold}) + "\n"
                             for i in ITEMS * 3))
    result = run_ft("eval", str(run.root), "--set", "eval.general.max_prompts=2",
                    "--set", f"eval.general.benchmarks=[{bench}]", "--set", "eval.general.benchmark_max_items=5")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads((run.eval_dir / "report.json").read_text())["general"]["rows"]}
    for metric in ("acc", "acc_norm"):
        row = rows[f"general.colors.{metric}"]
        assert row["items"] == 5 and 0 <= row["base"] <= 1 and 0 <= row["fine-tuned"] <= 1
        assert row["delta"] == pytest.approx(row["fine-tuned"] - row["base"])
    assert "colors: acc" in (run.eval_dir / "report.md").read_text()
