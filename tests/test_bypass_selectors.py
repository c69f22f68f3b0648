"""Layer-bypass baseline selectors (act-mse, lm-ppl, task-guided) and the AR / AR-multihop tasks."""

import copy
import math
import random
import re

import pytest
import torch

from hybrid_distill.evaluation import score_sample
from hybrid_distill.selection import bypass
from hybrid_distill.selection.bypass import (
    TASK_SELECTORS,
    act_mse_scores,
    bypass_mixer,
    decoder_layers,
    lm_ppl_scores,
    task_scores,
)
from hybrid_distill.tasks import (
    DEFAULT_RECALL_TASKS,
    RULER_OFFLINE_TASKS,
    TASKS,
    RecallSample,
    count_tokens,
    generate_samples,
)
from hybrid_distill.surgery import build_student
from hybrid_distill.tiny_teachers import tiny_teacher
from hybrid_distill.tokenization import tiny_tokenizer

STUDENT_MIXERS = ["gdn", "softmax", "gdn", "softmax"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids OpenMP contention on shared CI cores (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama-gqa")


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(teacher, STUDENT_MIXERS).eval()


def _padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding on row 1
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _no_hooks(model):
    return all(len(layer.self_attn._forward_hooks) == 0 for layer in decoder_layers(model))


# ---------------------------------------------------------------------------------------
# bypass_mixer


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias-tied", "qwen3-qknorm", "mistral", "student"])
def test_bypass_is_identity_residual(variant, teacher, student):
    """Under bypass, the block's attention sublayer is the identity: the MLP's residual input
    (the input of post_attention_layernorm) IS the layer input, and the layer computes x + mlp(norm(x))."""
    model = student if variant == "student" else tiny_teacher(variant)
    ids, mask = _padded_batch()
    for i in (0, 2):
        layer = decoder_layers(model)[i]
        seen = {}

        def grab_in(mod, args, kwargs, seen=seen):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        def grab_mid(mod, args, seen=seen):
            seen["mid"] = args[0]

        def grab_out(mod, args, kwargs, out, seen=seen):
            seen["out"] = out[0] if isinstance(out, tuple) else out

        hooks = [layer.register_forward_pre_hook(grab_in, with_kwargs=True),
                 layer.post_attention_layernorm.register_forward_pre_hook(grab_mid),
                 layer.register_forward_hook(grab_out, with_kwargs=True)]
        try:
            _logits(model, ids, mask)
            assert not torch.equal(seen["mid"], seen["x"])  # attention normally changes the stream
            with bypass_mixer(model, i):
                _logits(model, ids, mask)
            x = seen["x"]
            assert torch.equal(seen["mid"], x)
            with torch.no_grad():
                expected = x + layer.mlp(layer.post_attention_layernorm(x))
            torch.testing.assert_close(seen["out"], expected, rtol=0, atol=0)
        finally:
            for h in hooks:
                h.remove()
    assert _no_hooks(model)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_bypass_changes_logits_and_always_cleans_up(which, teacher, student):
    model = teacher if which == "teacher" else student
    ids, mask = _padded_batch()
    base = _logits(model, ids, mask)
    for i in range(len(decoder_layers(model))):
        with bypass_mixer(model, i):
            assert sum(len(layer.self_attn._forward_hooks) for layer in decoder_layers(model)) == 1
            assert not torch.allclose(_logits(model, ids, mask), base)
        assert _no_hooks(model)
        assert torch.equal(_logits(model, ids, mask), base)
    with bypass_mixer(model, [0, 2]) as m:
        assert m is model
        assert [len(layer.self_attn._forward_hooks) for layer in decoder_layers(model)] == [1, 0, 1, 0]
    with pytest.raises(RuntimeError, match="boom"):
        with bypass_mixer(model, [1, 3]):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    assert torch.equal(_logits(model, ids, mask), base)
    with pytest.raises(ValueError, match="out of range"):
        with bypass_mixer(model, 4):
            pass
    assert _no_hooks(model)


def test_bypass_equals_zero_attention_output(teacher, student):
    """Identity residual == attention whose output projection is zero."""
    ids, mask = _padded_batch()
    for model, layer in ((teacher, 1), (student, 0), (student, 1)):
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            decoder_layers(zeroed)[layer].self_attn.o_proj.weight.zero_()
        ref = _logits(zeroed, ids, mask)
        with bypass_mixer(zeroed, layer):
            assert torch.equal(_logits(zeroed, ids, mask), ref)
        with bypass_mixer(model, layer):
            assert torch.equal(_logits(model, ids, mask), ref)


def test_bypass_under_generate_with_cache(teacher, student):
    """Cached greedy generation with a bypassed layer == a cache-free greedy loop with it bypassed."""
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(1))
    for model in (teacher, student):
        with bypass_mixer(model, 1), torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=0)
            seq = ids
            for _ in range(5):
                nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(out, seq)
        assert _no_hooks(model)


def test_decoder_layers_errors():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decoder layers"):
        with bypass_mixer(torch.nn.Linear(2, 2), 0):
            pass


# ---------------------------------------------------------------------------------------
# act-mse / lm-ppl


def _dominant(teacher, layer):
    """The teacher with layer ``layer``'s attention output x50 (lm_head x20 for a peaked
    distribution), and batches sampled from it: on the model's own samples any perturbation
    raises the expected NLL (KL >= 0), the dominant layer's bypass most."""
    m = copy.deepcopy(teacher)
    with torch.no_grad():
        decoder_layers(m)[layer].self_attn.o_proj.weight.mul_(50)
        m.lm_head.weight.mul_(20)
    torch.manual_seed(0)
    start = torch.randint(3, 512, (4, 4))
    data = m.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=40,
                      min_new_tokens=40, pad_token_id=0)
    return m, data


@pytest.mark.parametrize("layer", [1, 3])
def test_dominant_layer_scores_highest(teacher, layer):
    model, data = _dominant(teacher, layer)
    model.train()
    mse = act_mse_scores(model, [data])
    ppl = lm_ppl_scores(model, [data])
    assert model.training  # training flag restored
    for scores in (mse, ppl):
        assert sorted(scores) == [0, 1, 2, 3]
        assert max(scores, key=scores.get) == layer
        assert all(isinstance(v, float) for v in scores.values())
    assert all(v > 0 for v in mse.values())
    assert _no_hooks(model)


def test_model_signal_scores_handle_padding_and_details(teacher):
    from hybrid_distill.evaluation.quality import perplexity

    model, data = _dominant(teacher, 2)
    # right padding with a mask: padded positions are ignored, valid ones unchanged (causal)
    padded = torch.cat([data, torch.zeros(data.shape[0], 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(data), torch.zeros(data.shape[0], 5, dtype=torch.long)], dim=1)
    a = act_mse_scores(model, [data[:2], data[2:]])
    b = act_mse_scores(model, [{"input_ids": padded, "attention_mask": mask}])
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=1e-4)
    res = lm_ppl_scores(model, [data], layers=[0, 2], return_details=True)
    assert sorted(res["scores"]) == [0, 2]
    base = perplexity(model, [data])["perplexity"]
    assert res["baseline"]["perplexity"] == pytest.approx(base)
    with bypass_mixer(model, 2):
        assert res["scores"][2] == pytest.approx(perplexity(model, [data])["perplexity"] - base)
    mres = act_mse_scores(model, [data], layers=[3], return_details=True)
    assert list(mres["scores"]) == [3] and mres["baseline"]["tokens"] == data.numel()


def test_model_signal_scores_on_student(student):
    ids, mask = _padded_batch()
    batches = [{"input_ids": ids, "attention_mask": mask}]
    mse = act_mse_scores(student, batches, progress=False)
    ppl = lm_ppl_scores(student, batches, layers=[1, 2])
    assert sorted(mse) == [0, 1, 2, 3] and all(v > 0 for v in mse.values())
    assert sorted(ppl) == [1, 2] and not any(math.isnan(v) for v in ppl.values())
    assert _no_hooks(student)


# ---------------------------------------------------------------------------------------
# task-guided


def test_task_selectors_registry():
    assert TASK_SELECTORS == {"kv": "kv_retrieval", "ar": "ar", "ar-mh": "ar_multihop", "vt": "vt", "cwe": "cwe"}
    assert set(TASK_SELECTORS.values()) <= set(TASKS)


KEYS = {"accuracy", "accuracy_drop", "answer_nll", "answer_nll_increase", "score"}


def _check_result(res, layers):
    assert sorted(res["scores"]) == layers and sorted(res["details"]) == layers
    assert set(res["baseline"]) == {"accuracy", "answer_nll"}
    w = res["tiebreak_weight"]
    for i in layers:
        d = res["details"][i]
        assert set(d) == KEYS and res["scores"][i] == d["score"]
        assert d["accuracy_drop"] == pytest.approx(res["baseline"]["accuracy"] - d["accuracy"])
        assert d["answer_nll_increase"] == pytest.approx(d["answer_nll"] - res["baseline"]["answer_nll"])
        assert d["score"] == pytest.approx(d["accuracy_drop"] + w * torch.tanh(torch.tensor(d["answer_nll_increase"])).item())
    import json

    json.dumps(res)


def test_task_scores_teacher_and_student(tok, teacher, student):
    teacher.train()
    res = task_scores(teacher, tok, "ar", 128, 3, seed=0, batch_size=3)
    assert teacher.training
    teacher.eval()
    _check_result(res, [0, 1, 2, 3])
    assert res["task"] == "ar" and res["num_samples"] == 3 and res["tiebreak_weight"] == 1e-3
    # deterministic (and a layer subset gives the same entries)
    again = task_scores(teacher, tok, "ar", 128, 3, seed=0, batch_size=2, layers=[2])
    assert again["details"][2] == pytest.approx(res["details"][2], rel=1e-5, abs=1e-7)
    assert again["baseline"] == pytest.approx(res["baseline"], rel=1e-5)
    # the tie-breaker separates layers even when all accuracies tie
    assert len({round(v, 12) for v in res["scores"].values()}) == 4

    sres = task_scores(student, tok, "ar-mh", 192, 2, seed=1, batch_size=2)
    _check_result(sres, [0, 1, 2, 3])
    assert sres["task"] == "ar_multihop"
    assert _no_hooks(teacher) and _no_hooks(student)


def test_task_scores_rank_accuracy_first(tok, teacher, monkeypatch):
    """Accuracy dominates: a layer with a larger accuracy drop always outranks one with a larger NLL
    increase; the accuracy is measured with the layer really bypassed."""
    hooked = []

    def fake_accuracy(model, tokenizer, samples, batch_size):
        active = [i for i, layer in enumerate(decoder_layers(model)) if layer.self_attn._forward_hooks]
        hooked.append(active)
        return {(): 1.0, (0,): 1.0, (1,): 0.5, (2,): 1.0, (3,): 0.5}[tuple(active)]

    nll = {(): 1.0, (0,): 50.0, (1,): 1.1, (2,): 1.0, (3,): 1.2}

    def fake_nll(model, batches):
        return nll[tuple(i for i, layer in enumerate(decoder_layers(model)) if layer.self_attn._forward_hooks)]

    monkeypatch.setattr(bypass, "_accuracy", fake_accuracy)
    monkeypatch.setattr(bypass, "_answer_nll", fake_nll)
    res = task_scores(teacher, tok, "kv", 128, 2)
    assert hooked == [[], [0], [1], [2], [3]]
    s = res["scores"]
    assert sorted(s, key=lambda i: (-s[i], i)) == [3, 1, 0, 2]
    assert 0 < s[0] <= 1e-3 and s[2] == 0.0 and s[1] > 0.5
    assert res["tiebreak_weight"] == 1e-3


def test_tiebreak_weight_below_accuracy_resolution():
    from types import SimpleNamespace as S

    assert bypass._tiebreak_weight([S(answers=["1"])] * 100) == 1e-3
    # 1000 samples with 1 or 2 answers: accuracies move in steps of 1/2000
    w = bypass._tiebreak_weight([S(answers=["1"]), S(answers=["a", "b"])] * 500)
    assert w == pytest.approx(1 / 4000)
    assert bypass._tiebreak_weight([S(answers=list("abcde"))] * 20) == 1e-3  # capped
    assert bypass._tiebreak_weight([S(answers=list("abcdefghij"))] * 100) == pytest.approx(1 / 2000)


def test_answer_nll_is_padding_invariant(tok, teacher, student):
    samples = generate_samples("ar", tok, 128, 3, seed=4) + generate_samples("kv_retrieval", tok, 160, 1, seed=4)
    b1 = bypass._answer_batches(tok, samples, 1)
    b4 = bypass._answer_batches(tok, samples, 4)
    assert b4[0][1][:, 0].tolist().count(0) >= 1  # really padded
    ids, _, _, tl = b1[0]
    assert tok.decode(ids[0, -int(tl[0]) :]) == " " + samples[0].answers[0]
    for model in (teacher, student):
        with torch.no_grad():
            assert bypass._answer_nll(model, b4) == pytest.approx(bypass._answer_nll(model, b1), rel=1e-4)


# ---------------------------------------------------------------------------------------
# AR and AR-multihop tasks


def test_ar_tasks_registered():
    for name in ("ar", "ar_multihop"):
        spec = TASKS[name]
        assert spec.metric == "first_int_exact" and spec.max_new_tokens == 8 and not spec.ruler
        assert name not in DEFAULT_RECALL_TASKS and name not in RULER_OFFLINE_TASKS


def check_ar(s: RecallSample) -> None:
    context = s.prompt.split("\n")[1]
    pairs = re.findall(r'"([a-z]+)": (\d+)', context)
    mapping = dict(pairs)
    assert len(mapping) == len(pairs)  # keys unique
    asked = re.findall(r'"([a-z]+)"', s.prompt.split("\n")[2])
    assert asked == s.metadata["keys"] and len(asked) == 3
    for k in asked:
        assert sum(k2 == k for k2, _ in pairs) == 1 and s.input_text.count(k) == 2
    values = [int(mapping[k]) for k in asked]
    assert values == s.metadata["values"] and all(0 <= v <= 9 for v in values)
    assert s.answers == [str(sum(values))] and sum(values) >= 10
    assert not re.search(rf"(?<!\d){s.answers[0]}(?!\d)", s.prompt)  # computed, never copied
    assert s.answer_prefix == "Answer: The sum of the values is"


def check_ar_multihop(s: RecallSample, allowed_hops=(1, 2)) -> None:
    lines = s.prompt.split("\n")
    facts = lines[1:-2]
    values, aliases = {}, {}
    for line in facts:
        if m := re.fullmatch(r"([a-z]+): (\d+)\.", line):
            assert m.group(1) not in values
            values[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"([a-z]+) is also called ([a-z]+)\.", line):
            assert m.group(2) not in aliases and m.group(2) not in values
            aliases[m.group(2)] = m.group(1)
        else:
            assert line is facts[-1]  # only the trimmed tail may be partial
    query = s.metadata["query"]
    assert lines[-2] == f"Question: What is the value of {query}?" and query in s.answer_prefix
    name, hops = query, 0
    while name in aliases:
        name, hops = aliases[name], hops + 1
    assert hops == s.metadata["hops"] and hops in allowed_hops
    assert values[name] == s.answers[0]
    assert re.findall(r": (\d+)", s.prompt).count(s.answers[0]) == 1  # the answer occurs exactly once
    for n in s.metadata["chain"][:-1]:
        assert s.input_text.count(n) == 2
    assert s.input_text.count(query) == 3


CHECKS = {"ar": check_ar, "ar_multihop": check_ar_multihop}


@pytest.mark.parametrize("task", ["ar", "ar_multihop"])
def test_ar_exact_length_answers_determinism(task, tok):
    for length in (256, 777, 2048):
        samples = generate_samples(task, tok, length, 3, seed=0)
        for i, s in enumerate(samples):
            assert (s.task, s.length, s.index) == (task, length, i)
            assert count_tokens(tok, s.prompt + s.answer_prefix) + s.max_new_tokens == length
            assert s.metadata["length_exact"] and s.metadata["total_tokens"] == length
            CHECKS[task](s)
    state = random.getstate()
    random.seed(1)
    a = generate_samples(task, tok, 700, 3, seed=5)
    random.seed(2)
    b = generate_samples(task, tok, 700, 3, seed=5)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    c = generate_samples(task, tok, 700, 3, seed=6)
    assert all(x.prompt != y.prompt for x, y in zip(a, c)) and len({s.prompt for s in a}) == 3
    assert generate_samples(task, tok, 700, 1, seed=5)[0].to_dict() == a[0].to_dict()
    random.setstate(state)


def test_ar_multihop_both_hop_counts_and_options(tok):
    hops = {s.metadata["hops"] for s in generate_samples("ar_multihop", tok, 400, 12, seed=0)}
    assert hops == {1, 2}
    for s in generate_samples("ar_multihop", tok, 600, 2, hops=3):
        assert s.metadata["hops"] == 3 and len(s.metadata["chain"]) == 4
        check_ar_multihop(s, allowed_hops=(3,))
    s = generate_samples("ar", tok, 400, 1, num_queries=4, value_range=(1, 5), min_sum=6)[0]
    assert len(s.metadata["keys"]) == 4 and int(s.answers[0]) == sum(s.metadata["values"]) >= 6
    with pytest.raises(ValueError):
        generate_samples("ar", tok, 400, 1, num_queries=2, min_sum=30)


def test_ar_scoring(tok):
    for task in ("ar", "ar_multihop"):
        for s in generate_samples(task, tok, 300, 3, seed=2):
            gold = s.answers[0]
            wrong = str(int(gold) + 1)
            assert score_sample(s, f" {gold}") == 1.0
            assert score_sample(s, f" {gold}.\nQuestion: 7") == 1.0
            assert score_sample(s, f" {wrong}") == 0.0
            assert score_sample(s, f" {gold}0") == 0.0
            assert score_sample(s, " I do not know") == 0.0
