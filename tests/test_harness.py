"""`carryon eval`: the lm_eval model over the merged model, the packaged tasks, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval", reason="pip install -e '.[dev]' installs lm_eval")

from lm_eval.api.instance import Instance

from carryon_ray.artifacts import load_carryon, save_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.cli import main
from carryon_ray.config import validate_config
from carryon_ray.harness import CarryOnLM
from carryon_ray.merged import MergedModel, SamplingParams, prompt_logprobs
from carryon_ray.records import LayerRef, Layout

PAIRS = [  # (context, continuation); a trailing space moves to the continuation
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Question: Natalia sold 48 clips ", "in April and half as many in May."),
    ("The quick brown fox", " jumps over the lazy dog. Python lists are mutable sequences."),
    ("def add(a, b):", " return a + b"),
    ("Answer: She sold 48 / 2 = 24 clips in May, so", " 48 + 24 = 72 clips. #### 72"),
]
DOCS = [
    {"question": "What is 2 + 2?", "answer": "2 + 2 = 4. #### 4"},
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "48 + 24 = 72. #### 72"},
    {"question": "What is 3 * 5?", "answer": "3 * 5 = 15. #### 15"},
]


def export_carryon(directory: Path, base: FrozenBase, *, seed: int = 1) -> Path:
    """A carry-on whose Δ head is random (not zero), so the merged model differs from the base."""
    ref = LayerRef(base.name, base.num_layers, base.hidden_size)
    layout = Layout.build(codec="absmax", residual=(ref, 8), sources=[(ref, 4)], bases=[base.identity()])
    torch.manual_seed(seed)
    carry_on = CarryOn(CarryOnConfig(input_dims=[base.hidden_size], output_dim=base.hidden_size,
                                     hidden_size=32, num_layers=1, num_heads=2, max_positions=256))
    torch.nn.init.normal_(carry_on.delta.weight, std=1.0)
    return save_carryon(directory, carry_on, layout, alpha=1.0)


@pytest.fixture(scope="module")
def config_path(chat_model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("eval")
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "math", "run_dir": str(directory / "run"),
                                    "bases": [{"name": "tiny", "path": str(chat_model_dir)}],
                                    "data": {"max_length": 64}}))
    return path


@pytest.fixture(scope="module")
def config(config_path):
    return validate_config(yaml.safe_load(config_path.read_text()))


@pytest.fixture(scope="module")
def merged(config) -> MergedModel:
    base = FrozenBase(config.primary)
    export_carryon(Path(config.run_dir) / "carryons" / "math", base)
    carry_on, layout, artifact = load_carryon(Path(config.run_dir) / "carryons" / "math",
                                              running_bases=[base.identity()])
    return MergedModel(base, carry_on, layout, alpha=artifact["alpha"])


@pytest.fixture(scope="module")
def model(merged):
    lm = CarryOnLM(merged, batch_size=2)
    yield lm
    lm.close()


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def expected_loglikelihood(merged: MergedModel, context: str, continuation: str, alpha: float):
    """The merged model's own scores, tokenized as lm_eval's HF model does."""
    tokenizer = merged.base.tokenizer
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    scored = prompt_logprobs(merged, whole, top=1, alpha=alpha)[len(context_ids) - 1 :]
    return sum(token.logprob for token in scored), all(token == token.top[0][0] for token in scored)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_loglikelihoods_are_the_merged_models(merged, alpha):
    lm = CarryOnLM(merged, alpha=alpha, batch_size=2)  # batches of 2 of unequal lengths: padding
    try:
        got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    finally:
        lm.close()
    for (context, continuation), (score, greedy) in zip(PAIRS, got, strict=True):
        want, want_greedy = expected_loglikelihood(merged, context, continuation, alpha)
        assert score == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_alpha_zero_is_the_base_exactly(merged):
    base_only = CarryOnLM(MergedModel(merged.base), batch_size=2)
    at_zero = CarryOnLM(merged, alpha=0.0, batch_size=2)
    carried = CarryOnLM(merged, batch_size=2)
    try:
        arguments = requests("loglikelihood", PAIRS)
        base_scores = base_only.loglikelihood(arguments)
        assert at_zero.loglikelihood(arguments) == base_scores  # the same floats, not just close
        assert carried.loglikelihood(arguments) != base_scores  # the carry-on does change them
        prompts = requests("generate_until", [(context, {"until": ["\n"], "max_gen_toks": 6})
                                              for context, _ in PAIRS])
        assert at_zero.generate_until(prompts) == base_only.generate_until(prompts)
    finally:
        for lm in (base_only, at_zero, carried):
            lm.close()


def test_rolling_loglikelihood_scores_every_token_after_the_prefix(model, merged):
    text = PAIRS[2][0] + PAIRS[2][1]
    [got] = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = [merged.base.tokenizer.eos_token_id, *merged.base.tokenizer(text)["input_ids"]]
    want = sum(token.logprob for token in prompt_logprobs(merged, ids, top=0))
    assert got == pytest.approx(want, abs=1e-4)


def test_generations_are_greedy_merged_generate_cut_at_until(model, merged):
    tokenizer = merged.base.tokenizer
    stops = [" ", "\n"]
    arguments = [(context, {"until": stops, "max_gen_toks": 8, "do_sample": False}) for context, _ in PAIRS]
    got = model.generate_until(requests("generate_until", arguments))
    for (context, _), text in zip(arguments, got, strict=True):
        params = SamplingParams(max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
        ids = [t for t in merged.generate(tokenizer(context)["input_ids"], params) if t != tokenizer.eos_token_id]
        want = tokenizer.decode(ids)
        for stop in stops:
            want = want.split(stop)[0]
        assert text == want
    unlimited = model.generate_until(requests("generate_until", [(PAIRS[0][0], {"until": [], "max_gen_toks": 5})]))
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(tokenizer.eos_token_id,))
    ids = [t for t in merged.generate(tokenizer(PAIRS[0][0])["input_ids"], params) if t != tokenizer.eos_token_id]
    assert unlimited == [tokenizer.decode(ids)]


def test_packaged_gsm8k_task_holds_out_the_pipelines_rows():
    from lm_eval.tasks import TaskManager, get_task_dict

    from carryon_ray.eval_tasks import TASKS_DIR
    from carryon_ray.eval_tasks.gsm8k_data import heldout_rows

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"train_size": 1300, "eval_size": 19})
    assert {"gsm8k_heldout", "gsm8k_heldout_chat"} <= set(manager.all_tasks)
    task = get_task_dict(["gsm8k_heldout"], manager)["gsm8k_heldout"]
    docs = list(task.test_docs())
    assert docs == heldout_rows(1300, 19)
    assert task.doc_to_text(docs[0]) == f"Question: {docs[0]['question']}\nAnswer:"
    assert {f["name"] for f in task.config.filter_list} == {"strict-match", "flexible-extract"}


def test_held_out_rows_follow_the_pipelines_split(chat_model_dir):
    """With over-long rows dropped the split moves: the task follows `build_examples`."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from carryon_ray.data import build_examples
    from carryon_ray.eval_tasks import TASKS_DIR
    from carryon_ray.eval_tasks.gsm8k_data import heldout_rows
    from carryon_ray.harness_run import held_out_rows

    base = FrozenBase(validate_config({"bases": [{"name": "tiny", "path": str(chat_model_dir)}]}).primary)
    config = validate_config({"bases": [{"name": "tiny", "path": str(chat_model_dir)}],
                              "data": {"train_size": 20, "eval_size": 5, "max_length": 512, "overlong": "drop"}})
    rows = held_out_rows(config, base.tokenizer)
    _, held_out, report = build_examples(config.data, base.tokenizer)
    assert report.dropped_overlong > 0 and len(rows) == 5
    assert rows == [int(example.id) for example in held_out] != list(range(20, 25))
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"rows": rows})
    docs = list(get_task_dict(["gsm8k_heldout"], manager)["gsm8k_heldout"].test_docs())
    assert docs == heldout_rows(rows=rows)
    lines = Path(__import__("carryon_ray.readers", fromlist=["x"]).resolve_format(config.data)[1]).read_text()
    assert docs[0]["question"] == json.loads(lines.splitlines()[rows[0]])["question"]


def tiny_task(directory: Path) -> Path:
    """A 3-document generation task and a 3-document multiple-choice one, as local YAMLs."""
    data = directory / "tiny.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test"}
    (directory / "tiny_gen.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen", **common, "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }))
    (directory / "tiny_gen_chat.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen_chat", **common, "output_type": "generate_until",
        "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }))
    (directory / "tiny_choice.yaml").write_text(yaml.safe_dump({
        "task": "tiny_choice", **common, "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": ["4", "72", "15"],
        "doc_to_target": 0, "metric_list": [{"metric": "acc"}],
    }))
    return directory


def test_carryon_eval_writes_a_table_and_json_with_stderr(config_path, config, merged, tmp_path, capsys,
                                                          monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    tasks = tiny_task(tmp_path)
    common = [str(config_path), "--task-dir", str(tasks), "--tasks", "tiny_gen,tiny_choice,tiny_gen_chat"]
    assert main(["eval", *common, "--alpha", "0.5", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| base | 0 | tiny_choice | acc,none |" in out
    assert "| math@" in out and "| 0.5 | tiny_gen |" in out
    report = json.loads((Path(config.run_dir) / "reports" / "lm_eval.json").read_text())
    assert [(row["model"].split("@")[0], row["alpha"]) for row in report["models"]] == [
        ("base", 0.0), ("math", 1.0), ("math", 0.5)]
    assert set(report["models"][0]["answers"]) == {"tiny_gen", "tiny_gen_chat"}  # generation tasks only
    assert report["models"][0]["answers"]["tiny_gen"]["documents"] == 3
    assert "| answers | with `#### N` |" in out
    samples = [json.loads(line) for line in
               (Path(config.run_dir) / "reports" / "lm_eval_samples.jsonl").read_text().splitlines()]
    generated = [row for row in samples if row["task"] == "tiny_gen"]
    assert len(generated) == 3 * 3 and all(isinstance(row["answer"], str) for row in generated)
    assert all(row["prompt"].startswith("Question: ") for row in generated)
    chat = [row for row in samples if row["task"] == "tiny_gen_chat"]  # *_chat: the base's template
    assert len(chat) == 3 * 3 and all(row["prompt"].startswith("<|user|>") for row in chat)
    assert all(row["prompt"].endswith("<|assistant|>") for row in chat)
    accuracy = report["models"][1]["results"]["tiny_choice"]["acc,none"]
    assert accuracy["stderr"] is not None and 0 <= accuracy["value"] <= 1
    # The same accuracy from the model class directly: the command adds nothing of its own.
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = CarryOnLM(merged)
    try:
        direct = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], limit=3, log_samples=False,
                                         task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    finally:
        lm.close()
    assert direct["results"]["tiny_choice"]["acc,none"] == accuracy["value"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "no_such_task"], "unknown task(s) ['no_such_task']; choose from"),
        (["--model", "nobody"], "carry-on 'nobody' has no exported version"),
        (["--model", "../math"], "is not a carry-on name"),
        (["--model", "base", "--alpha", "0.5"], "--model base has none"),
        (["--alpha", "-1"], "--alpha must be >= 0"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--task-dir", "/no/such/dir"], "--task-dir /no/such/dir is not a directory"),
    ],
)
def test_carryon_eval_refuses_bad_input_in_one_line(config_path, merged, args, message, capsys):
    assert main(["eval", str(config_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_registered_as_carryon_beside_lm_evals_own_models(config_path, merged, tmp_path, monkeypatch):
    """`lm_eval --model carryon --model_args config=...,alpha=...` loads the carry-on as
    `carryon eval` does; registering it hides none of lm_eval's built-in models."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert get_model("carryon") is CarryOnLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"
    manager = TaskManager(include_path=str(tiny_task(tmp_path)), include_defaults=False)
    by_name = lm_eval.simple_evaluate(model="carryon", model_args=f"config={config_path},alpha=0.5",
                                      tasks=["tiny_choice"], limit=3, task_manager=manager)
    lm = CarryOnLM(merged, alpha=0.5)
    try:
        direct = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], limit=3, task_manager=manager)
    finally:
        lm.close()
    assert by_name["results"]["tiny_choice"] == direct["results"]["tiny_choice"]
    with pytest.raises(ValueError, match="unknown carryon model_args \\['colour'\\]"):
        CarryOnLM.create_from_arg_string(f"config={config_path},colour=red")


def test_a_mixture_of_llms_scores_and_generates_as_the_merged_model(tiny_tokenizer, other_tokenizer):
    """A second base with another tokenizer (aligned by characters): the padded batches of
    `loglikelihood` and the batcher's generations still give the merged model's own numbers."""
    from tests.conftest import make_model, mixture_carryon

    primary = FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer)), tiny_tokenizer)
    other = FrozenBase.from_model("other", make_model(len(other_tokenizer), seed=1, hidden_size=48),
                                  other_tokenizer)
    merged = MergedModel(primary, *mixture_carryon(primary, other), alpha=1.0, others={"other": other})
    lm = CarryOnLM(merged, batch_size=3)
    try:
        got = lm.loglikelihood(requests("loglikelihood", PAIRS))
        texts = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 5})
                                                              for c, _ in PAIRS[:3]]))
    finally:
        lm.close()
    for (context, continuation), (score, _) in zip(PAIRS, got, strict=True):
        assert score == pytest.approx(expected_loglikelihood(merged, context, continuation, 1.0)[0], abs=1e-4)
    eos = tiny_tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(eos,))
    for (context, _), text in zip(PAIRS[:3], texts, strict=True):
        ids = [t for t in merged.generate(tiny_tokenizer(context)["input_ids"], params) if t != eos]
        assert text == tiny_tokenizer.decode(ids)
