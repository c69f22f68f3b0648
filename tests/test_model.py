"""Hybrid student: surgery, exactness against the teacher, cache/decode, batched generation."""

import pytest
import torch

from hybrid_distill.modeling import CACHE_ARG, GatedDeltaNetMixer, GLAMixer, HybridCache, output_cache
from hybrid_distill.surgery import build_student, mixers_from_softmax_layers, student_config
from hybrid_distill.tiny_teachers import TINY_TEACHER_VARIANTS, tiny_teacher

VARIANTS = list(TINY_TEACHER_VARIANTS)
HYBRID = ["gdn", "softmax", "gla", "swa"]


def _ids(batch=2, length=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, length), generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_softmax_student_reproduces_teacher_exactly(variant):
    teacher = tiny_teacher(variant)
    student = build_student(teacher, ["softmax"] * teacher.config.num_hidden_layers)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    # padded batch too (the masks are built per layer kind)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        assert torch.equal(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_surgery_transfers_every_teacher_weight(variant):
    teacher = tiny_teacher(variant)
    student = build_student(teacher, ["gdn", "gla", "gdn", "softmax"])
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for key, value in t_state.items():
        assert torch.equal(s_state[key], value), key
    assert isinstance(student.model.layers[0].self_attn, GatedDeltaNetMixer)
    assert isinstance(student.model.layers[1].self_attn, GLAMixer)
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight is student.model.embed_tokens.weight
    if variant.startswith("qwen2"):  # biases are carried by the mixer
        mixer = student.model.layers[0].self_attn
        assert mixer.q_proj.bias is not None and torch.count_nonzero(mixer.q_proj.bias) > 0
    # the teacher is untouched by student training
    before = teacher.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        student.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(teacher.model.layers[0].self_attn.q_proj.weight, before)


def test_new_parameters_get_standard_init():
    teacher = tiny_teacher("llama-gqa")
    student = build_student(teacher, ["gdn"] * 4)
    mixer = student.model.layers[0].self_attn
    a = mixer.A_log.exp()
    assert a.min() > 0 and a.max() <= 16
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(mixer.o_norm_weight, torch.ones_like(mixer.o_norm_weight))
    assert 0.005 < mixer.a_proj.weight.std() < 0.05


def test_a_log_and_dt_bias_stay_fp32_under_bf16():
    student = build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4).to(torch.bfloat16)
    mixer = student.model.layers[0].self_attn
    assert mixer.A_log.dtype == torch.float32 and mixer.dt_bias.dtype == torch.float32
    assert mixer.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = student(_ids(length=20)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_mixer_options_recorded_and_applied():
    teacher = tiny_teacher("llama-gqa")
    opts = {"gdn_use_short_conv": True, "gdn_use_output_gate": False, "swa_window": 8}
    student = build_student(teacher, HYBRID, opts)
    assert student.config.mixers == HYBRID
    assert student.config.mixer_options["gdn_use_short_conv"] is True
    assert student.config.teacher["model_type"] == "llama"
    mixer = student.model.layers[0].self_attn
    assert hasattr(mixer, "q_conv1d") and not hasattr(mixer, "g_proj")
    assert mixer.head_dim == teacher.model.layers[0].self_attn.head_dim


@pytest.mark.parametrize(
    "mixers,options,match",
    [
        (["gdn"] * 3, None, "3 mixers"),
        (["gdn", "mamba", "gdn", "gdn"], None, "Unknown mixer 'mamba' for layer 1"),
        (["gdn"] * 4, {"gdn_short_conv": True}, "Unknown mixer option"),
        (["gdn"] * 4, {"gdn_use_short_conv": "false"}, "gdn_use_short_conv must be true or false, got 'false'"),
        (["gdn"] * 4, {"gdn_conv_size": 0}, "gdn_conv_size must be a positive integer"),
        (["gla"] * 4, {"gla_gate_low_rank_dim": 4.5}, "gla_gate_low_rank_dim must be a positive integer"),
    ],
)
def test_bad_student_specs_fail_clearly(mixers, options, match):
    with pytest.raises(ValueError, match=match):
        build_student(tiny_teacher("llama-gqa"), mixers, options)


def test_unsupported_architecture_fails_clearly():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="Unsupported architecture 'gpt2'"):
        student_config(GPT2Config(), ["gdn"] * 12)


def test_mixers_from_softmax_layers():
    assert mixers_from_softmax_layers(4, [1, 3]) == ["gdn", "softmax", "gdn", "softmax"]
    with pytest.raises(ValueError, match="out of range"):
        mixers_from_softmax_layers(4, [4])


def _decode_equals_full(model, ids, prefill):
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for i in range(prefill, ids.shape[1]):
            out = model(ids[:, i : i + 1], use_cache=True, **{CACHE_ARG: cache})
            steps.append(out.logits)
    return full, torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("options", [{"swa_window": 8}, {"swa_window": 8, "gdn_use_short_conv": True}])
def test_prefill_then_decode_equals_full_forward(variant, options):
    student = build_student(tiny_teacher(variant), HYBRID, options)
    ids = _ids(length=30)
    full, incremental, cache = _decode_equals_full(student, ids, prefill=11)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 30
    assert cache.layers[0].recurrent_state.dtype == torch.float32
    assert cache.layers[3].get_seq_length() <= 30


def test_cache_crop_is_refused_whole_when_a_linear_state_would_roll_back():
    from hybrid_distill.modeling.modeling_hybrid import CROP_REMOVES_TOKENS

    student = build_student(tiny_teacher("llama"), ["softmax", "gdn", "softmax", "gdn"])
    with torch.no_grad():
        cache = output_cache(student(_ids(length=12), use_cache=True))
    drop_two, keep_all = (-2, 0) if CROP_REMOVES_TOKENS else (10, 12)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(drop_two)
    # the softmax layer in front of the linear ones is left as it was, not cropped on the way to the error
    assert [layer.get_seq_length() for layer in cache.layers] == [12] * 4
    cache.crop(keep_all)  # a crop that drops nothing (transformers 5.24's generate calls crop(0)) is a no-op
    assert [layer.get_seq_length() for layer in cache.layers] == [12] * 4
    assert not cache.is_croppable


def test_all_linear_student_decodes_with_token_counter():
    student = build_student(tiny_teacher("qwen3-qknorm"), ["gla", "gdn", "gdn", "gla"])
    ids = _ids(length=20)
    full, incremental, cache = _decode_equals_full(student, ids, prefill=1)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 20


def _left_pad(prompts, pad_id=0):
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("variant", ["qwen2-bias-tied", "llama3-rope-tied", "qwen3-qknorm"])
def test_left_padded_batch_equals_unbatched(variant):
    student = build_student(tiny_teacher(variant), HYBRID, {"swa_window": 6, "gdn_use_short_conv": True})
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g) for n in (9, 14, 5)]
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        batched = student(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            single = student(p[None]).logits[0]
            torch.testing.assert_close(batched[i, -len(p) :], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["qwen2-bias-tied", "mistral"])
def test_batched_generate_with_left_padding_equals_unbatched(variant):
    student = build_student(tiny_teacher(variant), HYBRID, {"swa_window": 6, "gdn_use_short_conv": True})
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=g) for n in (9, 14, 5)]
    ids, mask = _left_pad(prompts)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    batched = student.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        single = student.generate(p[None], **kw)
        assert torch.equal(batched.sequences[i, ids.shape[1] :], single.sequences[0, len(p) :])
        for step_b, step_s in zip(batched.scores, single.scores):
            torch.testing.assert_close(step_b[i], step_s[0], rtol=1e-4, atol=1e-4)


def test_generate_matches_teacher_for_all_softmax_student():
    teacher = tiny_teacher("llama-gqa")
    student = build_student(teacher, ["softmax"] * 4)
    ids = _ids(batch=1, length=12)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(ids, **kw), teacher.generate(ids, **kw))


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen3-qknorm"])
def test_generate_scores_equal_a_full_forward_of_the_generated_sequence(variant):
    # generate() must hand the model its HybridCache under the argument name the installed transformers
    # uses (`past_key_values` before 5.24, `cache` from 5.24); a dropped cache makes every later step wrong.
    student = build_student(tiny_teacher(variant), HYBRID, {"gdn_use_short_conv": True})
    ids = _ids(batch=2, length=12)
    out = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        full = student(out.sequences).logits[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.scores, 1), full, rtol=1e-4, atol=1e-5)


def test_init_from_reuses_mixers_of_matching_layers():
    teacher = tiny_teacher("llama-gqa")
    all_linear = build_student(teacher, ["gdn"] * 4)
    with torch.no_grad():
        all_linear.model.layers[2].self_attn.a_proj.weight.fill_(0.123)
    hybrid = build_student(teacher, ["gdn", "softmax", "gdn", "softmax"], init_from=all_linear)
    assert torch.equal(hybrid.model.layers[2].self_attn.a_proj.weight, all_linear.model.layers[2].self_attn.a_proj.weight)


def test_forward_without_position_ids_never_reads_the_device_on_the_host(monkeypatch):
    """Packed-document detection (a host read of a device tensor, i.e. a sync) runs only on the caller's position ids."""
    import transformers.masking_utils as masking_utils

    teacher = tiny_teacher("qwen2-bias-tied")
    torch.manual_seed(0)
    student = build_student(teacher, ["gdn", "softmax", "gla", "softmax"]).eval()
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = student(ids, use_cache=False).logits  # training's setting (no cache: detection would run)
    calls = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        out = student(ids, use_cache=False).logits
        assert calls == []
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        positions = torch.arange(16).unsqueeze(0)
        torch.testing.assert_close(student(ids, position_ids=positions, use_cache=False).logits, ref, rtol=1e-6, atol=1e-6)
    assert calls, "position ids the caller passes still go to packed-document detection"


def test_empty_mixer_list_is_an_error_not_an_all_linear_student():
    from hybrid_distill.surgery import resolve_mixers

    for empty in ([], "", " , "):
        with pytest.raises(ValueError, match="mixer list is empty"):
            resolve_mixers(4, empty)
    assert resolve_mixers(4, None, "1") == ["gdn", "softmax", "gdn", "gdn"]


def test_bf16_teacher_and_students_keep_fp32_rotary_frequencies(tmp_path):
    """`model.to(bf16)` would round rope's inv_freq (angles off by up to ~position/500 rad); students built from a
    bf16 teacher, and teachers cast for bf16 training, must match the checkpoint loaded in bf16."""
    from hybrid_distill.checkpoint import load_student, save_student
    from hybrid_distill.dtypes import cast_model
    from hybrid_distill.surgery import load_teacher

    tiny_teacher("llama-gqa").save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(str(tmp_path / "teacher"), dtype=torch.bfloat16)
    student = build_student(teacher, ["softmax"] * 4)
    assert student.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(student.model.rotary_emb.inv_freq, teacher.model.rotary_emb.inv_freq)
    ids = _ids(batch=1, length=600)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
        save_student(student, tmp_path / "student")
        assert torch.equal(load_student(tmp_path / "student")(ids).logits, student(ids).logits)

    fp32 = tiny_teacher("llama-gqa")
    inv_freq = fp32.model.rotary_emb.inv_freq.clone()
    cast_model(fp32, torch.bfloat16)
    assert fp32.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(fp32.model.rotary_emb.inv_freq, inv_freq)  # not rounded
    assert not torch.equal(inv_freq.to(torch.bfloat16).float(), inv_freq)  # (which bf16 would have done)


def test_generate_without_cache_equals_cached_generate():
    student = build_student(tiny_teacher("llama-gqa"), HYBRID, {"swa_window": 6, "gdn_use_short_conv": True})
    ids = _ids(batch=2, length=10)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    cached, uncached = student.generate(ids, use_cache=True, **kw), student.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(uncached.scores), torch.stack(cached.scores), rtol=1e-4, atol=1e-5)


def test_documents_packed_by_position_ids_alone_stay_separate():
    """transformers' flattening collator marks documents by restarting position ids; the softmax layers' masks
    separate them, and the linear layers must reset their state there too (one row, and several)."""
    teacher = tiny_teacher("llama-gqa")
    student = build_student(teacher, ["gdn", "softmax", "gla", "softmax"], {"gdn_use_short_conv": True})
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (1, n), generator=g) for n in (12, 9, 7, 14)]
    with torch.no_grad():
        alone = [student(d).logits[0] for d in docs]
        row = lambda a, b: (torch.cat([docs[a], docs[b]], 1), torch.cat([torch.arange(docs[a].shape[1]),  # noqa: E731
                                                                           torch.arange(docs[b].shape[1])]))
        (ids1, pos1), (ids2, pos2) = row(0, 1), row(2, 3)
        packed = student(ids1, position_ids=pos1[None], use_cache=False).logits[0]
        torch.testing.assert_close(packed[12:], alone[1], rtol=1e-4, atol=1e-5)
        both = student(torch.cat([ids1, ids2[:, :21]]), position_ids=torch.stack([pos1, pos2[:21]]), use_cache=False).logits
        torch.testing.assert_close(both[0, 12:], alone[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both[1, 7:21], alone[3], rtol=1e-4, atol=1e-5)
        plain = student(ids1, position_ids=torch.arange(21)[None], use_cache=False).logits[0]  # one document
        torch.testing.assert_close(plain, student(ids1).logits[0], rtol=0, atol=0)


def test_students_switch_attention_implementation_like_their_teacher():
    student = build_student(tiny_teacher("qwen2-bias-tied"), HYBRID)
    student.set_attn_implementation("eager")
    assert student.config._attn_implementation == "eager"
    assert student.model.layers[1].self_attn.config._attn_implementation == "eager"


@pytest.mark.parametrize("variant", ["llama-gqa", "mistral", "qwen2-bias-tied", "qwen3-qknorm"])
def test_swa_window_reaches_every_attention_backend(variant):
    """Flash-attention backends take the window only from the attention function's `sliding_window` argument
    (their mask is None without padding): every family's swa layers must pass it, full layers must not."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def recording(module, q, k, v, mask, **kw):
        seen[module.layer_idx] = kw.get("sliding_window")
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("hd_test_recording", recording)
    student = build_student(tiny_teacher(variant), ["softmax", "swa", "gdn", "swa"], {"swa_window": 4})
    student.config._attn_implementation = "hd_test_recording"
    with torch.no_grad():
        student(_ids(batch=1, length=12))
    assert seen[1] == seen[3] == 4 and seen[0] in (None, getattr(student.config, "sliding_window", None))


@pytest.mark.parametrize("variant", ["qwen2-bias-tied", "qwen3-qknorm"])
def test_qwen3_5_layout_leaves_gdn_biases_and_qk_norms_out_and_keeps_softmax_layers_exact(variant, tmp_path):
    from hybrid_distill.checkpoint import load_student, save_student
    from hybrid_distill.modeling import layout_mixer_options

    teacher = tiny_teacher(variant)
    options = layout_mixer_options("qwen3_5")
    all_softmax = build_student(teacher, ["softmax"] * 4, options)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(all_softmax(ids).logits, teacher(ids).logits)
    student = build_student(teacher, ["gdn", "softmax", "gdn", "gdn"], options)
    mixer = student.model.layers[0].self_attn
    assert mixer.q_proj.bias is None and mixer.k_proj.bias is None and mixer.v_proj.bias is None
    assert mixer.q_norm is None and mixer.k_norm is None
    assert student.config.mixer_options["norm_eps"] == teacher.config.rms_norm_eps == mixer.eps
    softmax = student.model.layers[1].self_attn
    for name, value in teacher.model.layers[1].self_attn.state_dict().items():
        assert torch.equal(softmax.state_dict()[name], value), name
    save_student(student, tmp_path / "s")
    reloaded = load_student(tmp_path / "s")  # fails on any missing or unexpected key
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_student_layout_rejects_contradicting_options():
    from hybrid_distill.modeling import layout_mixer_options

    assert layout_mixer_options("default", {"gdn_use_short_conv": True}) == {"gdn_use_short_conv": True}
    assert layout_mixer_options("qwen3_5", {"gdn_use_short_conv": True})["gdn_use_qkv_bias"] is False
    with pytest.raises(ValueError, match="gdn_use_qkv_bias=True contradicts student layout 'qwen3_5'"):
        layout_mixer_options("qwen3_5", {"gdn_use_qkv_bias": True})
    with pytest.raises(ValueError, match="Unknown student layout 'qwen35'"):
        layout_mixer_options("qwen35")
    with pytest.raises(ValueError, match="norm_eps must be a positive number"):
        build_student(tiny_teacher("llama-gqa"), ["gdn"] * 4, {"norm_eps": "student"})
