"""The recall harness separates a model that solves a task from one that cannot.

A tiny Llama is trained (CPU, fixed seed) on the generator's own ``niah_single_1`` samples
(short haystack, next-token CE on the answer tokens), then the *real* path -- fresh samples from
``generate_samples`` (another seed) -> ``run_samples`` (left-padded greedy ``generate()``) ->
``score_sample`` / ``evaluate_model`` -- must score it high and a random-init twin near zero.
"""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hybrid_distill.evaluation import generate_samples
from hybrid_distill.evaluation.runner import run_samples
from hybrid_distill.evaluation.suite import evaluate_model
from hybrid_distill.tokenization import tiny_tokenizer

# Work in progress (issue 5): in a standalone run this recipe reached 0.84 after 800 steps (146 s of
# training on 2 busy cores) while a random model scored 0.0, but under pytest both tests scored 0.0 and
# training took ~170 s. Skipped until that is understood and the margin and runtime are fixed.
pytestmark = pytest.mark.skip(reason="WIP: trained-vs-random recall discrimination does not pass yet (issue 5)")

TASK, LENGTH, MAX_NEW = "niah_single_1", 160, 10
TRAIN_SAMPLES, STEPS, BATCH, HIDDEN, LR = 4096, 800, 32, 128, 2e-3


def _model(tok):
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _train_rows(tok, samples):
    rows = []
    for s in samples:  # exactly what run_samples feeds: BOS + tokens(prompt + answer_prefix), then the answer
        p = [tok.bos_token_id] + tok(s.prompt + s.answer_prefix, add_special_tokens=False).input_ids
        a = tok(" " + s.answers[0], add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    weight = torch.zeros(len(rows), width)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        weight[i, len(p) : len(p) + len(a)] = 1.0  # loss on the answer tokens only
    return ids, weight


@pytest.fixture(scope="module")
def trained_and_random():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        tok = tiny_tokenizer()
        t0 = time.perf_counter()
        ids, weight = _train_rows(tok, generate_samples(TASK, tok, LENGTH, TRAIN_SAMPLES, seed=1, max_new_tokens=MAX_NEW))
        torch.manual_seed(0)
        model, random_model = _model(tok), _model(tok)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / STEPS))
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(STEPS):
            idx = torch.randint(0, len(ids), (BATCH,), generator=gen)
            x, w = ids[idx], weight[idx, 1:]
            logits = model(x).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            loss = (nll.view(BATCH, -1) * w).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        print(f"trained {STEPS} steps in {time.perf_counter() - t0:.1f}s, final answer loss {loss.item():.3f}")
        yield tok, model.eval(), random_model.eval()
    finally:
        torch.set_num_threads(threads)


def test_trained_model_solves_task_random_model_does_not(trained_and_random):
    tok, model, random_model = trained_and_random
    fresh = generate_samples(TASK, tok, LENGTH, 32, seed=12345, max_new_tokens=MAX_NEW)  # unseen samples
    train_values = {s.answers[0] for s in generate_samples(TASK, tok, LENGTH, 64, seed=1, max_new_tokens=MAX_NEW)}
    assert not train_values & {s.answers[0] for s in fresh}
    good = run_samples(model, tok, fresh, batch_size=16, progress=False)
    bad = run_samples(random_model, tok, fresh, batch_size=16, progress=False)
    acc_good = sum(p.score for p in good) / len(good)
    acc_bad = sum(p.score for p in bad) / len(bad)
    print(f"trained {acc_good:.3f} random {acc_bad:.3f}", [p.prediction for p in good[:4]])
    assert acc_good >= 0.8, [(p.prediction, p.answers) for p in good if p.score < 1][:5]
    assert acc_bad <= 0.1


def test_evaluate_model_reports_the_difference(trained_and_random, tmp_path):
    tok, model, random_model = trained_and_random
    opts = {TASK: {"max_new_tokens": MAX_NEW}}
    kw = dict(tasks=[TASK], lengths=(LENGTH,), num_samples=16, seed=777, batch_size=16, task_options=opts)
    good = evaluate_model(model, tok, tmp_path / "trained", model_name="trained", **kw)
    bad = evaluate_model(random_model, tok, tmp_path / "random", model_name="random", **kw)
    assert good["recall"]["aggregate"]["overall"] >= 0.8
    assert bad["recall"]["aggregate"]["overall"] <= 0.1
    from hybrid_distill.evaluation.compare import compare_results

    comp = compare_results([tmp_path / "trained", tmp_path / "random"], tmp_path / "cmp")
    row = comp["metrics"][f"recall/{TASK}@{LENGTH}"]
    assert row["trained"] >= 0.8 and row["random"] <= 0.1
    assert json.loads((tmp_path / "trained" / "results.json").read_text())["recall"]["aggregate"]["overall"] >= 0.8
