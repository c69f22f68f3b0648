"""The efficiency benchmark's byte count: what a decode step must read, its bandwidth bound."""

import pytest
import torch

from hybrid_distill.evaluation.efficiency import (
    EfficiencyResult,
    decode_step_min_bytes,
    decode_weight_bytes,
    fit_step_cost,
    results_markdown,
)
from hybrid_distill.modeling import output_cache
from hybrid_distill.modeling.static_decode import StaticDecoder
from hybrid_distill.surgery import build_student
from hybrid_distill.tiny_teachers import tiny_teacher


@pytest.mark.parametrize("variant", ["qwen2-bias-tied", "llama-gqa"])
def test_decode_weight_bytes_count_a_tied_matrix_once_and_skip_an_untied_embedding(variant):
    model = tiny_teacher(variant)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    every = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix is listed once
    tied = embedding is head
    assert tied == (variant == "qwen2-bias-tied")
    assert decode_weight_bytes(model) == every - (0 if tied else embedding.numel() * embedding.element_size())


def _expected_bytes(model, cache, tokens, window):
    total = decode_weight_bytes(model)
    kinds = {i: m for i, m in enumerate(["gdn", "softmax", "gla", "swa"])}
    for i, layer in enumerate(cache.layers):
        if kinds[i] in ("gdn", "gla"):
            states = [layer.recurrent_state, *getattr(layer, "conv_states", {}).values()]
            total += 2 * sum(t.numel() * t.element_size() for t in states)
        else:
            B, H, _, D = layer.keys.shape
            n = tokens if kinds[i] == "softmax" else min(tokens, window)
            total += 2 * B * H * D * layer.keys.element_size() * n
    return total


def test_decode_step_min_bytes_counts_visible_keys_and_states_for_static_and_hf_caches():
    model = build_student(tiny_teacher("llama-gqa"), ["gdn", "softmax", "gla", "swa"], {"swa_window": 8, "gdn_use_short_conv": True})
    ids = torch.randint(3, 500, (3, 29), generator=torch.Generator().manual_seed(0))
    dec = StaticDecoder(model, batch_size=3, max_length=64)
    dec.prefill(ids)
    static = decode_step_min_bytes(model, dec.cache, 29)
    assert static == _expected_bytes(model, dec.cache, 29, 8)
    assert dec.cache.layers[1].keys.shape[2] > 29  # longer buffers (a key block): counting them would differ
    with torch.no_grad():
        hf_cache = output_cache(model(ids, use_cache=True))
    assert decode_step_min_bytes(model, hf_cache, 29) == static  # same model, same tokens: same bytes


def test_results_table_shows_the_bandwidth_bound_against_the_baseline():
    gib = 2**30
    teacher = EfficiencyResult("teacher", 32768, 8, 1.0, 4.0, 2000.0, 7.0, 16.0, min_read_gib=10.0)
    hybrid = EfficiencyResult("hybrid", 32768, 8, 1.0, 2.0, 4000.0, 2.0, 17.0, min_read_gib=4.0)
    assert hybrid.read_tb_per_s == pytest.approx(4.0 * gib / 2e-3 / 1e12)
    row = results_markdown([teacher, hybrid], baseline="teacher").splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "hybrid" and cells[8] == "4.000" and cells[10:] == ["2.00x", "2.50x", "28.6%"]


def _row(model, context, batch, ms, gib):
    return EfficiencyResult(model, context, batch, 1.0, ms, 1000.0 / ms * batch, 1.0, 2.0, min_read_gib=gib)


def test_step_cost_fit_recovers_a_fixed_cost_and_a_bandwidth():
    fixed, ms_per_gib = 1.25, 0.3
    rows = [_row(m, c, 8, fixed + ms_per_gib * g, g) for m, c, g in
            [("teacher", 32768, 9.9), ("hybrid", 32768, 5.0), ("teacher", 131072, 30.9), ("hybrid", 131072, 10.2)]]
    rows.append(_row("teacher", 32768, 1, 2.0, 4.0))  # one point at batch 1: no fit for it
    rows.append(EfficiencyResult("hybrid", 131072, 1, 0, 0, 0, 0, 0, oom=True))
    (fit,) = fit_step_cost(rows)
    assert fit.batch == 8 and fit.rows == 4
    assert fit.fixed_ms == pytest.approx(fixed) and fit.max_rel_error < 1e-9
    assert fit.tb_per_s == pytest.approx(2**30 / (ms_per_gib * 1e-3) / 1e12)
    assert "1.25 ms fixed per step" in fit.describe()
    rows[1] = _row("hybrid", 32768, 8, 5.0, 5.0)  # off the line: the fit reports how far
    assert fit_step_cost(rows)[0].max_rel_error > 0.1


def test_efficiency_plot_has_a_speed_up_panel_against_the_baseline(tmp_path):
    import matplotlib.image

    from hybrid_distill.evaluation.efficiency import plot_efficiency

    rows = [_row("teacher", 4096, 8, 3.0, 5.0), _row("hybrid", 4096, 8, 2.0, 3.0),
            _row("teacher", 32768, 8, 4.2, 9.9), _row("hybrid", 32768, 8, 2.8, 5.0)]
    plot_efficiency(rows, str(tmp_path / "two.png"), batch=8)
    plot_efficiency(rows, str(tmp_path / "three.png"), batch=8, baseline="teacher")
    two, three = (matplotlib.image.imread(str(tmp_path / f"{n}.png")) for n in ("two", "three"))
    assert three.shape[1] > 1.4 * two.shape[1]  # a third panel


def test_run_efficiency_on_cpu_measures_model_and_teacher_side_by_side():
    """Off CUDA the suite still runs (wall-clock timing, no peak memory); the byte and cache columns are exact."""
    import json
    import math

    from hybrid_distill.evaluation.efficiency import efficiency_markdown, run_efficiency

    torch.manual_seed(0)
    teacher = tiny_teacher("llama-gqa", num_hidden_layers=2)
    student = build_student(teacher, ["gdn", "softmax"])
    # contexts whose static buffers differ in size (buffers come in blocks of KEY_BLOCK keys)
    section = run_efficiency(student, [32, 600], [1, 2], teacher=teacher, model_name="hybrid", decode_steps=3)
    rows = [EfficiencyResult.from_dict(r) for r in json.loads(json.dumps(section["rows"]))]
    assert [(r.model, r.context, r.batch) for r in rows] == [
        (m, c, b) for c in (32, 600) for b in (1, 2) for m in ("teacher", "hybrid")
    ]
    assert section["baseline"] == "teacher" and section["model"] == "hybrid" and section["device"] == "cpu"
    assert all(r.decode_ms_per_step > 0 and r.prefill_ms > 0 and math.isnan(r.peak_gib) and not r.oom for r in rows)
    by = {(r.model, r.context, r.batch): r for r in rows}
    # the GDN layer's state does not grow with the context; the teacher's second KV layer does
    for b in (1, 2):
        t_short, t_long, h_short, h_long = (by[m, c, b] for m in ("teacher", "hybrid") for c in (32, 600))
        assert t_long.cache_gib > t_short.cache_gib
        assert h_long.cache_gib - h_short.cache_gib == pytest.approx((t_long.cache_gib - t_short.cache_gib) / 2)
        assert h_long.bandwidth_bound_over(t_long) > max(1.0, h_short.bandwidth_bound_over(t_short))
    table = efficiency_markdown(json.loads(json.dumps(section)))
    assert "| hybrid | 600 | 2 |" in table and "cache / teacher" in table
    assert "| – |" in table  # peak memory: not measured off CUDA
    with pytest.raises(ValueError, match="baseline"):
        run_efficiency(student, [32], [1], teacher=teacher, model_name="teacher")
    with pytest.raises(ValueError, match="positive"):
        run_efficiency(student, [0], [1])


def test_step_cost_fit_without_a_bandwidth_term_says_so():
    from hybrid_distill.evaluation.efficiency import StepCostFit

    assert "does not grow with the bytes read" in StepCostFit(1, 2.0, float("inf"), 0.1, 3).describe()
    assert "does not grow with the bytes read" in StepCostFit(1, 2.0, float("nan"), 0.1, 3).describe()


def test_run_efficiency_measures_one_dtype_for_model_and_teacher():
    from hybrid_distill.evaluation.efficiency import run_efficiency

    teacher = tiny_teacher("llama-gqa", num_hidden_layers=2)
    student = build_student(teacher, ["gdn", "softmax"]).to(torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        run_efficiency(student, [16], [1], teacher=teacher, model_name="hybrid", decode_steps=1)
    section = run_efficiency(student, [16], [1], teacher=teacher, model_name="hybrid", decode_steps=1, dtype="bfloat16")
    assert section["dtype"] == "bfloat16" and len(section["rows"]) == 2
    assert next(teacher.parameters()).dtype == torch.float32  # measured on a copy


def test_step_cost_fit_can_require_more_rows_than_two():
    rows = [_row("teacher", 32768, 8, 4.0, 9.9), _row("hybrid", 32768, 8, 2.8, 5.0)]
    assert len(fit_step_cost(rows)) == 1 and fit_step_cost(rows, min_rows=3) == []
    rows.append(_row("hybrid", 131072, 8, 4.4, 10.2))
    assert len(fit_step_cost(rows, min_rows=3)) == 1
