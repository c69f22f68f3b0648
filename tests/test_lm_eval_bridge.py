"""lm-eval bridge, offline: the shipped tiny tasks (tests/data/lm_eval_task) through lm-evaluation-harness
on the shipped teacher (in memory) and on a hybrid student saved to disk (loaded back by the bridge),
with lm-eval's loglikelihoods and generations checked against direct forwards / generate calls.
Network is off for the whole module (HF offline flags and sockets that refuse to connect)."""

import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")  # the HF backend needs accelerate too

import hybrid_distill
from hybrid_distill.checkpoint import load_student, save_student
from hybrid_distill.evaluation import lm_eval_bridge as bridge
from hybrid_distill.surgery import build_student, load_teacher

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
TEACHER = Path(hybrid_distill.__file__).parent / "assets" / "tiny_teacher"
MIXERS = ["gdn", "softmax", "gdn", "gdn", "softmax", "gdn"]
DOCS = [json.loads(line) for line in (TASK_DIR / "tiny_kv.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def offline():
    import datasets.config
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time; the env alone is too late
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1.9M-parameter model: extra threads only contend on a shared CPU
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TEACHER))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(str(TEACHER))


@pytest.fixture(scope="module")
def student_dir(teacher, tok, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm_eval_student") / "student"
    save_student(build_student(teacher, MIXERS).eval(), path, tokenizer=tok)
    return path


@torch.no_grad()
def direct_loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from one unpadded forward pass (lm-eval's causal split: trailing
    spaces of the context go to the continuation; encode the whole text, split after the context)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    targets = torch.tensor(whole[len(ctx):])
    rows = logp[len(ctx) - 1 : len(whole) - 1]
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def check_metrics(metrics: dict, expected: dict[str, list[str]]) -> None:
    assert set(expected) <= set(metrics)
    for task, names in expected.items():
        for name in names:
            assert 0.0 <= metrics[task][name] <= 1.0, (task, name, metrics[task])


def check_loglikelihoods(samples: list[dict], model, tok) -> float:
    """Every choice's lm-eval loglikelihood equals the direct one; returns acc recomputed from them."""
    correct = []
    for s in samples:
        direct = [direct_loglik(model, tok, ctx, cont) for ctx, cont in s["arguments"]]
        lm = [resp[0] for resp in s["resps"]]
        for (ll, greedy), (lm_ll, lm_greedy) in zip(direct, lm):
            assert lm_ll == pytest.approx(ll, rel=0, abs=2e-4)  # float32 vs float64 log-softmax: ~1e-5
            assert bool(lm_greedy) == greedy
        correct.append(max(range(len(direct)), key=lambda i: direct[i][0]) == s["doc"]["label"])
        assert s["acc"] == float(correct[-1])
    return sum(correct) / len(correct)


def test_teacher_in_memory_mc_and_generation(teacher, tok, tmp_path):
    out = tmp_path / "teacher"
    res = bridge.evaluate_with_lm_eval(teacher, ["tiny_kv_mc", "tiny_kv_gen"], tokenizer=tok, include_path=TASK_DIR,
                                       include_defaults=False, batch_size=4, out_dir=out)
    metrics = res["metrics"]
    check_metrics(metrics, {"tiny_kv_mc": ["acc", "acc_norm"], "tiny_kv_gen": ["exact_match,first_int"]})
    # the trained teacher reads the values back from its context (10/10 when this test was written)
    assert metrics["tiny_kv_mc"]["acc"] >= 0.8 and metrics["tiny_kv_gen"]["exact_match,first_int"] >= 0.8
    mc = res["samples"]["tiny_kv_mc"]
    assert len(mc) == len(DOCS) and all(len(s["arguments"]) == 4 for s in mc)
    assert check_loglikelihoods(mc, teacher, tok) == pytest.approx(metrics["tiny_kv_mc"]["acc"])
    gen = res["samples"]["tiny_kv_gen"]
    hits = [s["filtered_resps"][0] == s["doc"]["answer"] for s in gen]
    assert sum(hits) / len(hits) == pytest.approx(metrics["tiny_kv_gen"]["exact_match,first_int"])

    on_disk = json.loads((out / bridge.RESULTS_FILE).read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(metrics))
    assert on_disk["tasks"] == ["tiny_kv_mc", "tiny_kv_gen"] and on_disk["lm_eval_version"]
    assert on_disk["results"]["tiny_kv_mc"]["acc,none"] == metrics["tiny_kv_mc"]["acc"]
    assert [p.name for p in out.iterdir()] == [bridge.RESULTS_FILE]  # atomic write: no temp files left


def test_student_from_directory_fewshot_limit_and_json_dataset(student_dir, tok, tmp_path):
    # the plain lm-eval route to local data: dataset_path: json + absolute data_files (cwd-relative otherwise)
    json_tasks = tmp_path / "json_tasks"
    json_tasks.mkdir()
    (json_tasks / "tiny_kv_json.yaml").write_text(
        f"include: {TASK_DIR / 'tiny_kv_mc.yaml'}\ntask: tiny_kv_json\ncustom_dataset: null\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {TASK_DIR / 'tiny_kv.jsonl'}\n  cache_dir: {tmp_path / 'hf_cache'}\n")
    out = tmp_path / "student"
    res = bridge.evaluate_with_lm_eval(str(student_dir), ["tiny_kv_mc", "tiny_kv_gen", "tiny_kv_json"],
                                       include_path=[TASK_DIR, json_tasks], include_defaults=False, device="cpu",
                                       batch_size=3, limit=6, num_fewshot=1, out_dir=out)
    check_metrics(res["metrics"], {"tiny_kv_mc": ["acc", "acc_norm"], "tiny_kv_json": ["acc", "acc_norm"],
                                   "tiny_kv_gen": ["exact_match,first_int"]})
    assert res["n-shot"] == {"tiny_kv_mc": 1, "tiny_kv_gen": 1, "tiny_kv_json": 1}
    assert all(res["n-samples"][t]["effective"] == 6 for t in res["n-shot"])
    model = load_student(student_dir)
    assert type(model).__name__ != "LlamaForCausalLM" and model.config.model_type.startswith("hybrid_")

    mc = res["samples"]["tiny_kv_mc"]
    assert all(s["arguments"][0][0].count("Memorize the following dictionary") == 2 for s in mc)  # 1 shot + doc
    acc = check_loglikelihoods(mc, model, tok)  # right-padded batches of 3 vs one unpadded forward each
    assert acc == pytest.approx(res["metrics"]["tiny_kv_mc"]["acc"])
    json_resps = {s["doc_id"]: s["resps"] for s in res["samples"]["tiny_kv_json"]}
    for s in mc:  # same docs, same fewshot seed: the two data routes give the same requests and answers
        assert s["resps"] == json_resps[s["doc_id"]]

    # generate_until: left-padded batches through the student's generate (HybridCache) == unpadded greedy
    gen = res["samples"]["tiny_kv_gen"]
    assert sum(bool(s["resps"][0][0].strip()) for s in gen) >= 3  # the untrained student still says something
    for s in gen:
        context, gen_kwargs = s["arguments"][0]
        ids = tok(context, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=gen_kwargs["max_gen_toks"], do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        direct = tok.decode(full[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == direct
    assert json.loads((out / bridge.RESULTS_FILE).read_text())["model"] == str(student_dir)


def test_cli_main(capsys, tmp_path):
    rc = bridge.main(["--model", str(TEACHER), "--tasks", "tiny_kv_gen", "--include-path", str(TASK_DIR),
                      "--no-default-tasks", "--limit", "3", "--batch-size", "2", "--device", "cpu",
                      "--out", str(tmp_path / "cli")])
    assert rc == 0
    rec = json.loads((tmp_path / "cli" / bridge.RESULTS_FILE).read_text())
    assert rec["limit"] == 3 and rec["n-samples"]["tiny_kv_gen"]["effective"] == 3
    assert 0.0 <= rec["metrics"]["tiny_kv_gen"]["exact_match,first_int"] <= 1.0
    assert "tiny_kv_gen: exact_match,first_int=" in capsys.readouterr().out


def test_unknown_task_and_unreachable_data_errors(teacher, tok, tmp_path):
    with pytest.raises(bridge.LmEvalTaskNotFound, match="tiny_kv_mcq.*did you mean tiny_kv_mc"):
        bridge.evaluate_with_lm_eval(teacher, ["tiny_kv_mcq"], tokenizer=tok, include_path=TASK_DIR,
                                     include_defaults=False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(
        "task: tiny_hub\ndataset_path: hybrid-distill-tests/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    (tasks / "missing.yaml").write_text(
        f"include: {TASK_DIR / 'tiny_kv_mc.yaml'}\ntask: tiny_missing\n"
        "dataset_kwargs:\n  data_files:\n    test: not_there.jsonl\n")
    with pytest.raises(bridge.LmEvalDataUnavailable, match=r"tiny_hub.*HF_DATASETS_OFFLINE.*online") as err:
        bridge.evaluate_with_lm_eval(teacher, ["tiny_hub"], tokenizer=tok, include_path=tasks, include_defaults=False)
    assert "local files" in str(err.value)
    with pytest.raises(bridge.LmEvalDataUnavailable, match=r"not_there\.jsonl.*not found"):
        bridge.evaluate_with_lm_eval(teacher, ["tiny_missing"], tokenizer=tok, include_path=tasks,
                                     include_defaults=False)


def test_missing_lm_eval_names_the_extra(monkeypatch, teacher, tok):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(bridge.LmEvalUnavailable, match=r"pip install 'hybrid-distill\[lmeval\]'") as err:
        bridge.evaluate_with_lm_eval(teacher, ["tiny_kv_mc"], tokenizer=tok, include_path=TASK_DIR)
    assert isinstance(err.value, ImportError) and "network" in str(err.value)


def test_local_dataset_resolves_against_the_yaml(tmp_path):
    ds = bridge.local_dataset({"test": "tiny_kv.jsonl"}, config_source=str(TASK_DIR / "tiny_kv_mc.yaml"),
                              version=1.0)
    assert ds["test"].num_rows == len(DOCS) and ds["test"][0] == DOCS[0]
    (tmp_path / "rows.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert bridge.local_dataset(str(tmp_path / "rows.json"))["train"]["a"] == [1, 2]
    assert not math.isnan(bridge.task_metrics({"results": {"t": {"acc,none": 0.5, "acc_stderr,none": "N/A"}}})
                          ["t"]["acc"])


class _HFLMCalled(Exception):
    pass


@pytest.fixture
def hflm_kwargs(monkeypatch):
    """HFLM replaced by a stub that records its keyword arguments and stops the run there."""
    import lm_eval.models.huggingface as hf

    seen = {}

    def fake_hflm(**kwargs):
        seen.update(kwargs)
        raise _HFLMCalled

    monkeypatch.setattr(hf, "HFLM", fake_hflm)
    monkeypatch.setattr(bridge, "_task_manager", lambda *args: None)
    monkeypatch.setattr(bridge, "_check_tasks", lambda *args: None)
    return seen


def test_ruler_context_holds_the_longest_prompt(hflm_kwargs, teacher, tok):
    # The shipped teacher's config allows 1024 positions: HFLM's own default would cut 4096-token prompts.
    assert teacher.config.max_position_embeddings < 4096
    with pytest.raises(_HFLMCalled):
        bridge.evaluate_with_lm_eval(teacher, ["niah_single_1"], tokenizer=tok)
    assert hflm_kwargs["max_length"] == 4096
    with pytest.raises(_HFLMCalled):
        bridge.evaluate_with_lm_eval(teacher, ["ruler"], tokenizer=tok, metadata={"max_seq_lengths": [2048, 8192]})
    assert hflm_kwargs["max_length"] == 8192
    with pytest.raises(_HFLMCalled):  # an explicit, longer context is kept
        bridge.evaluate_with_lm_eval(teacher, ["ruler"], tokenizer=tok, max_length=16384,
                                     metadata={"max_seq_lengths": [8192]})
    assert hflm_kwargs["max_length"] == 16384
    with pytest.raises(ValueError, match=r"max_length=2048 is shorter than the longest RULER sequence length \(8192"):
        bridge.evaluate_with_lm_eval(teacher, ["ruler_vt"], tokenizer=tok, max_length=2048,
                                     metadata={"max_seq_lengths": [4096, 8192]})
    hflm_kwargs.clear()
    with pytest.raises(_HFLMCalled):  # other tasks keep HFLM's default
        bridge.evaluate_with_lm_eval(teacher, ["tiny_kv_mc"], tokenizer=tok)
    assert "max_length" not in hflm_kwargs
