"""The evaluation runner end to end on the tiny model: outputs, resume after an interruption
(a torn last line included) gives the same final table, config errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personalign.eval.config import parse_eval_config
from personalign.eval.harness import run_eval
from personalign.views import LoadedModel

PREFS = {"F": "be funny", "K": "be kind"}


def words_minus_prompt(prompt: str, response: str) -> float:
    """A reward function for the config's `reward` metric."""
    return float(len(response.split()) - len(prompt.split()))


def words_times_preference(prompt: str, response: str, preference: str) -> float:
    """A reward that reads the preference: words × (1 for "be funny", −1 otherwise)."""
    return float(len(response.split())) * (1.0 if preference == PREFS["F"] else -1.0)


def _config(tmp_path, model_path, **over):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": i, "prompt": p} for i, p in
                                   enumerate(["tell me a story", "why is the sky blue", "what is a cat"])]))
    raw = {"name": "tiny", "output_dir": str(tmp_path / "out"),
           "models": [{"name": "tiny", "path": str(model_path)}],
           "prompts": {"path": str(prompts)}, "preferences": PREFS,
           "methods": ["base", {"name": "preference_prompting", "label": "pp"}],
           "generation": {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "batch_size": 4, "seed": 3},
           "metrics": ["length", "diversity", "reading_grade", "sentiment"],
           "targets": {"F": {"sentiment": "higher"}, "K": {"length": "lower"}},
           "judge": {"kind": "local", "reference": "pp", "labels": ["yes", "no"], "batch_size": 4},
           "plots": {"bars": [], "tradeoff": None}}
    raw.update(over)
    return parse_eval_config(raw)


def test_full_run_outputs(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer):
    cfg = _config(tmp_path, model_dir, plots={"bars": ["length"], "tradeoff": ["length", "sentiment"]})
    lm = LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")
    res = run_eval(cfg, models={"tiny": lm})
    out = res.output_dir
    assert len(res.generations) == 2 * 2 * 3 and res.generated_now == 12
    assert {g["method"] for g in res.generations} == {"base", "pp"}
    assert all(0 < g["new_tokens"] <= 5 for g in res.generations)
    assert len(res.judgments) == 6 and {j["method"] for j in res.judgments} == {"base"}
    for name in ("generations.jsonl", "judgments.jsonl", "summary.csv", "results.md", "run.json",
                 "bars_tiny_length.png", "tradeoff_tiny_length_sentiment.png"):
        assert (out / name).is_file(), name
    assert (out / "bars_tiny_length.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "run.json").read_text())
    assert rec["complete"] and rec["environment"]["torch"] and "commit" in rec["environment"]
    assert rec["methods"]["pp"]["name"] == "preference_prompting" and rec["config"]["name"] == "tiny"
    md = res.markdown
    assert "| method | F sentiment ↑ | K length ↓ | all diversity ↑ | all win_rate vs pp ↑ |" in md
    assert "| base | F |" in md and "## tiny: win rate vs pp by preference" in md
    # a summary row is the mean of the per-item metric values
    base_len = [g["metrics"]["length"] for g in res.generations if g["method"] == "base" and g["preference_id"] == "F"]
    row = next(r for r in res.summary if (r["method"], r["preference"], r["metric"]) == ("base", "F", "length"))
    assert row["mean"] == pytest.approx(sum(base_len) / 3) and row["n"] == 3
    # a second run has nothing to do
    again = run_eval(cfg, models={"tiny": lm})
    assert again.generated_now == 0 and again.markdown == md


def test_reward_metric_and_preference_accuracy_from_config(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer):
    """`reward` scores each answer with the configured function; preference accuracy of the same function on
    3 pairs: (long > short) right, (short vs long) wrong, equal lengths tie -> (1 + 0 + 1/2) / 3."""
    pairs = tmp_path / "pairs.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q", "chosen": "a b c", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "a b"},
        {"prompt": "q", "chosen": "x y", "rejected": "y x"}]) + "\n")
    fn = {"kind": "function", "target": f"{__name__}:words_minus_prompt"}
    cfg = _config(tmp_path, model_dir, judge=None, methods=["base"],
                  metrics=["length", {"metric": "reward", "as": "rm", "scorer": fn},
                           {"metric": "reward", "as": "rm_pref",
                            "scorer": {"kind": "function", "target": f"{__name__}:words_times_preference"}}],
                  targets={"F": {"rm": "higher"}},
                  pair_metrics=[{"scorer": fn, "pairs": {"path": str(pairs)}}])
    res = run_eval(cfg, models={"tiny": LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")})
    for g in res.generations:
        assert g["metrics"]["rm"] == words_minus_prompt(g["prompt"], g["text"])
        # scored under the generation's own preference
        assert g["metrics"]["rm_pref"] == words_times_preference(g["prompt"], g["text"], g["preference"])
    assert {g["preference"] for g in res.generations} == set(PREFS.values())
    assert "| preference_accuracy:pairs.jsonl | 3 | 0.500 |" in res.markdown
    assert "| method | F rm ↑ |" in res.markdown


def test_resume_after_interruption_gives_same_table(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer):
    lm = LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")
    full = run_eval(_config(tmp_path / "a", model_dir), models={"tiny": lm})
    cfg = _config(tmp_path / "b", model_dir)
    part = run_eval(cfg, models={"tiny": lm}, max_batches=1)  # "interrupted" after one batch
    assert part.generated_now == 4 and not json.loads((part.output_dir / "run.json").read_text())["complete"]
    with (part.output_dir / "generations.jsonl").open("a") as f:  # a write torn by the interruption
        f.write('{"key": "tiny|base|K|2", "text": "hal')
    resumed = run_eval(cfg, models={"tiny": lm})
    assert resumed.generated_now == 8
    assert [g["text"] for g in resumed.generations] == [g["text"] for g in full.generations]
    assert (resumed.output_dir / "summary.csv").read_text() == (full.output_dir / "summary.csv").read_text()
    assert resumed.markdown == full.markdown
    lines = (resumed.output_dir / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(x) for x in lines)
    # changed generation settings are not mixed with old results: everything is regenerated
    changed = _config(tmp_path / "b", model_dir, generation={"max_new_tokens": 3, "batch_size": 4, "seed": 3})
    assert run_eval(changed, models={"tiny": lm}).generated_now == 12


@pytest.mark.parametrize(("over", "msg"), [
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"metrics": ["length", "lenght"]}, "unknown metric 'lenght'"),
    ({"targets": {"Z": {"length": "higher"}}}, "names preference 'Z'"),
    ({"targets": {"F": {"length": "up"}}}, "'higher' or 'lower'"),
    ({"judge": {"kind": "local", "reference": "zz"}}, "`judge.reference` 'zz'"),
    ({"generation": {"max_new_tokens": 0}}, "max_new_tokens` must be >= 1"),
    ({"generation": {"temprature": 1}}, "unknown parameter 'temprature'"),
    ({"metrics": ["reward"]}, "needs `scorer`"),
    ({"methods": ["base", "base"]}, "labels must be unique"),
    ({"colour": 1}, "unknown keys"),
    ({"plots": {"bars": ["nope"]}}, "plots.bars"),
])
def test_config_errors(tmp_path, model_dir, over, msg):
    with pytest.raises(ValueError, match=msg):
        _config(tmp_path, model_dir, **over)


def test_method_cli_flags_are_validated(tmp_path, model_dir):
    """A resource the method does not read is refused when the config is read, before any model loads."""
    with pytest.raises(ValueError, match=r"`methods\[base\].resources` \['drift_profile'\] are not options of method 'base'"):
        _config(tmp_path, model_dir, methods=[{"name": "base", "cli": {"profile": "x.json"}}], judge=None)
    with pytest.raises(ValueError, match=r"not options of method 'drift'"):
        _config(tmp_path, model_dir, methods=[{"name": "drift", "resources": {"persrm": "x"}}], judge=None)


def test_eval_cli_end_to_end(tmp_path, model_dir, capsys):
    import yaml

    from personalign.cli.main import main

    cfg = _config(tmp_path, model_dir)
    path = tmp_path / "cfg.yaml"
    raw = dict(cfg.raw, methods=["base"], judge=None, targets={})
    path.write_text(yaml.safe_dump(raw))
    assert main(["eval", "--config", str(path), "--limit", "2", "--output-dir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "## tiny: every metric by preference" in out
    assert len((tmp_path / "cli" / "generations.jsonl").read_text().splitlines()) == 2 * 2
    assert main(["eval", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_committed_quality_benchmark_config_parses(monkeypatch):
    """benchmarks/quality_cpu.yaml: six P-SOUPS preferences, each with a target; local judge vs preference prompting."""
    from personalign.eval.config import load_eval_config
    from tests.conftest import REPO, SHARED

    if not (SHARED / "data/prompts/psoups_preferences.json").is_file():
        pytest.skip("../shared/data absent")
    monkeypatch.setenv("PERSONALIGN_SHARED", str(SHARED))
    cfg = load_eval_config(REPO / "benchmarks" / "quality_cpu.yaml")
    assert list(cfg.preferences) == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert set(cfg.targets) == set(cfg.preferences)
    assert cfg.judge is not None and cfg.judge.kind == "local" and cfg.judge.reference == "preference_prompting"
    assert {"base", "preference_prompting"} <= {m.name for m in cfg.methods}
    from personalign.methods import method_names

    assert set(method_names()) <= {m.name for m in cfg.methods}  # every registered decoding method
    by_name = {m.name: m for m in cfg.methods}
    # args is guided by the benchmark's target reward, a file loaded by path; it scores under each preference
    from personalign.views.reward import FunctionScorer, import_object

    fn = import_object(str(REPO / by_name["args"].cli["reward_function"]))
    texts = cfg.preferences
    assert FunctionScorer(fn).uses_preference
    short, long = "Yes.", "The answer is yes, and here is some background on why that is so."
    assert fn("q", short, texts["P2A"]) > fn("q", long, texts["P2A"]) and fn("q", long, texts["P2B"]) > fn("q", short, texts["P2B"])
    with pytest.raises(ValueError, match="not one of the six"):
        fn("q", short, "some other preference")
    assert by_name["drift"].request_params["profile"].endswith("drift_${preference}.json")
    assert by_name["pdpo"].request_params["user"] == "${preference}"


def test_method_extra_inputs_reach_the_method_through_cli_flags(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer,
                                                                monkeypatch):
    """A method needing a file and a second model (like Drift's profile and steering model) gets both from
    the config entry's `resources` mapping (assembly loads the steering model beside the main one)."""
    from personalign.methods import METHODS
    from personalign.methods.base import BaseMethod

    seen: dict = {}

    class NeedsInputs(BaseMethod):
        name = "needs_inputs"
        uses = ("drift_profile", "steer")  # the resources it reads

        @classmethod
        def from_resources(cls, config, loaded):
            seen["profile"] = Path(loaded.drift_profile).read_text()
            seen["steer"] = loaded.steer_key
            return cls(config)

    monkeypatch.setitem(METHODS._entries, "needs_inputs", NeedsInputs)
    profile = tmp_path / "profile.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    profile.write_text("likes cats")
    entry = {"name": "needs_inputs", "resources": {"profile": str(profile), "steer_model": str(model_dir)}}
    cfg = _config(tmp_path, model_dir, methods=[entry], judge=None)
    res = run_eval(cfg, models={"tiny": LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")})
    assert seen == {"profile": "likes cats", "steer": "steer"}
    assert len(res.generations) == 6 and {g["method_name"] for g in res.generations} == {"needs_inputs"}
    with pytest.raises(ValueError, match=r"unknown key 'colour'; valid: \["):
        _config(tmp_path, model_dir, methods=[{"name": "base", "resources": {"colour": 1}}], judge=None)


def test_request_params_expand_per_preference_and_share_batches(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer,
                                                                monkeypatch):
    """`request_params` reach each request's row config with ${preference} / ${preference_text} / ${ENV}
    expanded for that request's preference, while the preferences still share one batch."""
    from dataclasses import dataclass

    from personalign.methods import METHODS
    from personalign.methods.base import BaseMethod

    @dataclass(frozen=True, kw_only=True)
    class TagConfig:
        tag: str | None = None
        words: tuple | list | None = None

    rows: list = []

    class Tagged(BaseMethod):
        name = "tagged"
        Config = TagConfig

        def build_views(self, request, config, backend, chat_template):
            rows.append((request.preference, config.tag, tuple(config.words)))
            return super().build_views(request, config, backend, chat_template)

    monkeypatch.setitem(METHODS._entries, "tagged", Tagged)
    monkeypatch.setenv("TAG_ROOT", "/data")
    entry = {"name": "tagged", "request_params": {"tag": "${TAG_ROOT}/prof_${preference}.json",
                                                  "words": ["${preference}", "<${preference_text}>", 3]}}
    cfg = _config(tmp_path, model_dir, methods=[entry], judge=None, generation={"max_new_tokens": 2, "batch_size": 6})
    res = run_eval(cfg, models={"tiny": LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")})
    assert len(res.generations) == 6
    want = {(text, f"/data/prof_{pid}.json", (pid, f"<{text}>", 3)) for pid, text in PREFS.items()}
    assert set(rows) == want and len(rows) == 6
    # one batch of 6 requests holds both preferences (preferences vary fastest)
    assert len({g["batch_seconds"] for g in res.generations}) == 1


@pytest.mark.parametrize(("entry", "msg"), [
    ({"name": "pdpo", "request_params": {"usr": "${preference}"}}, r"request_params` has unknown keys \['usr'\]"),
    ({"name": "pdpo", "request_params": {"user": "${NOT_SET_ANYWHERE_42}"}}, "NOT_SET_ANYWHERE_42"),
    ({"name": "drift", "request_params": "profile.json"}, "must be mappings"),
])
def test_request_params_errors(tmp_path, model_dir, entry, msg):
    with pytest.raises(ValueError, match=msg):
        _config(tmp_path, model_dir, methods=[entry], judge=None)


def test_method_with_resources_runs_on_its_own_copy_of_the_model(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer,
                                                                   monkeypatch):
    """A method that loads a checkpoint into the model it is given (as pad and pdpo do) must not change
    the shared model that the next methods and the judge use: base after it decodes as base alone."""
    import torch

    from personalign.methods import METHODS
    from personalign.methods.base import BaseMethod

    class Mutates(BaseMethod):
        name = "mutates"
        uses = ("pdpo",)

        @classmethod
        def from_resources(cls, config, loaded):
            with torch.no_grad():  # "merge an adapter" into the main model it is given
                for p in loaded.main.model.parameters():
                    p.mul_(0.5)
            return cls(config)

    monkeypatch.setitem(METHODS._entries, "mutates", Mutates)
    lm = LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    alone = run_eval(_config(tmp_path / "a", model_dir, methods=["base"], judge=None), models={"tiny": lm})
    both = run_eval(_config(tmp_path / "b", model_dir, methods=[{"name": "mutates", "cli": {"checkpoint": "x"}}, "base"],
                            judge=None), models={"tiny": lm})
    assert all(torch.equal(v, tiny_lm.state_dict()[k]) for k, v in before.items())
    assert [g["text"] for g in both.generations if g["method"] == "base"] == [g["text"] for g in alone.generations]


def test_judge_covers_only_the_configured_prompts(tmp_path, model_dir, tiny_lm, tiny_chat_tokenizer):
    """A run with a smaller `prompts.limit` reuses the earlier generations of its prompts and judges only
    those: generations of prompts outside the limit (from an earlier, larger run) are neither judged nor tabled."""
    import dataclasses

    lm = LoadedModel(model=tiny_lm, tokenizer=tiny_chat_tokenizer, name="tiny")
    cfg = _config(tmp_path, model_dir)
    run_eval(dataclasses.replace(cfg, judge=None), models={"tiny": lm})  # 3 prompts generated, nothing judged
    res = run_eval(dataclasses.replace(cfg, prompts_limit=2), models={"tiny": lm})
    assert res.generated_now == 0 and len(res.generations) == 2 * 2 * 2
    judged = [json.loads(x) for x in (res.output_dir / "judgments.jsonl").read_text().splitlines()]
    assert sorted((j["preference_id"], j["prompt_id"]) for j in judged) == [("F", "0"), ("F", "1"), ("K", "0"), ("K", "1")]
