"""Prompt tuning, prefix tuning, Control Prefixes, VPT and LLaMA-Adapter: equations,
counts, HF PEFT parity both ways, cached generation, identity, training, checkpoints."""

import copy
from contextlib import nullcontext

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

import core
from conftest import make_llama, make_vit
from core.errors import CheckpointError, ConfigError, MergeError, TargetError
from core.methods.prompts import (
    VPT,
    ControlPrefix,
    LlamaAdapter,
    PrefixTuning,
    PromptTuning,
    control,
)
from core.targeting import adapted_modules

pytestmark = pytest.mark.filterwarnings("ignore")  # PEFT / transformers deprecation chatter

LAYERS = r"model\.layers\.\d+"
# Tiny LLaMA (conftest): hidden 64, 2 layers, 4 heads, 2 key/value heads of 16.
D, L, H, KV = 64, 2, 4, 2 * 16


def make_bert():
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def llama_batch():
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def bert_batch(token_types=True):
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in the second row
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:  # a sentence pair: the prompt positions get type 0
        batch["token_type_ids"] = (torch.arange(7) >= 4).long().expand(2, 7)
    return batch


def randomise(model, std=0.5):
    """Non-trivial values for everything trainable (adapters, PEFT encoders, heads)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=std)


def adapter_of(model, name="default"):
    return [w.adapters[name] for _, w in adapted_modules(model) if name in w.adapters]


def count(module):
    return sum(p.numel() for p in module.parameters())


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- configs -------------------------------------------------------------------------------


def test_configs_construct_from_targets_with_the_papers_defaults():
    prompt = PromptTuning(targets=["model"])
    assert (prompt.num_virtual_tokens, prompt.init) == (100, "vocab")
    prefix = PrefixTuning(targets=["model"])
    assert (prefix.num_virtual_tokens, prefix.projection, prefix.encoder_hidden_size) == (
        10,
        True,
        512,
    )
    assert ControlPrefix(targets=["model"]).attribute_sizes == (2,)
    vpt = VPT(targets=["blocks"])
    assert (vpt.deep, vpt.dropout, vpt.num_prefix_tokens) == (False, 0.0, 1)
    adapter = LlamaAdapter(targets=LAYERS)
    assert (adapter.adapter_len, adapter.gate, adapter.bias_tuning) == (10, "scalar", False)
    for cfg in (PromptTuning, PrefixTuning, ControlPrefix, VPT, LlamaAdapter):
        assert cfg.mergeable is False


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PromptTuning(targets=["m"], num_virtual_tokens=0), "must be >= 1"),
        (lambda: PromptTuning(targets=["m"], init="tokens"), "needs init_token_ids"),
        (lambda: PromptTuning(targets=["m"], init="text", init_text="hi"), "needs tokenizer"),
        (lambda: PromptTuning(targets=["m"], init_token_ids=[1]), "only read when init="),
        (lambda: PromptTuning(targets=["m"], init="tokens", init_token_ids=[-1]), ">= 0"),
        (lambda: PromptTuning(targets=["m"], init="zeros"), "must be one of"),
        (lambda: PrefixTuning(targets=["m"], projection=1), "True or False"),
        (lambda: ControlPrefix(targets=["m"], attribute_sizes=[2, 0]), "ints >= 1"),
        (lambda: VPT(targets=["b"], dropout=1.0), r"\[0.0, 1.0\)"),
        (lambda: LlamaAdapter(targets=["l"], gate="head"), "must be one of"),
    ],
)
def test_bad_configs_are_refused_clearly(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "build, cfg, reason",
    [
        (make_llama, PromptTuning(targets=["lm_head"]), "transformers backbone"),
        (make_vit, VPT(targets=["head"]), "nn.Sequential"),
        (make_vit, LlamaAdapter(targets=["blocks.0"]), "q_proj/k_proj/v_proj/o_proj"),
    ],
)
def test_unsupported_targets_name_the_reason(build, cfg, reason):
    model = build()
    with pytest.raises(TargetError, match=reason):
        core.inject(model, cfg)
    assert core.adapter_names(model) == []


# --- HF PEFT parity --------------------------------------------------------------------------

PEFT_CASES = {
    "prompt-llama": (
        make_llama,
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        llama_batch,
    ),
    "prompt-bert-seqcls": (
        make_bert,
        lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        bert_batch,
    ),
    "prefix-llama": (
        make_llama,
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        llama_batch,
    ),
    "prefix-llama-projection": (
        make_llama,
        lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            prefix_projection=True,
            encoder_hidden_size=16,
        ),
        llama_batch,
    ),
    "adaption-prompt-llama": (
        make_llama,
        lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1),
        lambda: {"input_ids": torch.randint(1, 128, (2, 7))},
    ),
}


def tail(x, like):
    """PEFT's prompt tuning returns the prompt positions too; ours drops them."""
    return x[:, -like.shape[1] :] if x.dim() == 3 else x


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapters_import_and_export_with_identical_outputs(tmp_path, case):
    build, peft_config, make_batch = PEFT_CASES[case]
    base, batch = build(), make_batch()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    randomise(theirs)  # the prompt encoder, and the classifier for SEQ_CLS
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    core.interop.load_peft(ours, tmp_path / "peft")
    want, got = logits(theirs, batch), logits(ours, batch)
    assert (tail(want, got) - got).abs().max() < 1e-5
    assert (got - logits(base, batch)).abs().max() > 1e-2  # the adapter really acts

    core.interop.save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    again = logits(back, batch)
    assert (tail(again, got) - got).abs().max() < 1e-5


def test_bert_prefix_parity_with_peft_on_the_backbone(tmp_path):
    # PEFT 0.21.2 cannot run prefix tuning through BertForSequenceClassification with
    # transformers 5 (it looks for a `past_key_values` argument), so parity is checked on
    # the backbone, PEFT's FEATURE_EXTRACTION task. PEFT also drops token_type_ids there.
    model, batch = make_bert(), bert_batch(token_types=False)
    theirs = peft.get_peft_model(
        copy.deepcopy(model.bert),
        peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3),
    )
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(model)
    core.interop.load_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        got = ours.bert(**batch).last_hidden_state
        assert (theirs(**batch).last_hidden_state - got).abs().max() < 1e-5
        core.interop.save_peft(ours, tmp_path / "ours", task_type="FEATURE_EXTRACTION")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model.bert), tmp_path / "ours")
        assert (back(**batch).last_hidden_state - got).abs().max() < 1e-5


def test_exports_peft_cannot_express_are_refused(tmp_path):
    model = make_llama()
    core.inject(model, ControlPrefix(targets=["model"], encoder_hidden_size=8))
    with pytest.raises(CheckpointError, match="no equivalent|Control Prefixes"):
        core.interop.save_peft(model, tmp_path / "a")
    model = make_llama()
    core.inject(model, LlamaAdapter(targets=LAYERS, gate="per_head"))
    with pytest.raises(CheckpointError, match="cannot be exported"):
        core.interop.save_peft(model, tmp_path / "b")
    # With a biased o_proj PEFT counts the bias twice; refused both ways, model unchanged.
    biased = make_llama(attention_bias=True)
    peft.get_peft_model(
        copy.deepcopy(biased), peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1)
    ).save_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="o_proj has a bias"):
        core.interop.load_peft(biased, tmp_path / "c")
    assert core.adapter_names(biased) == []
    core.inject(biased, LlamaAdapter(targets=LAYERS))
    with pytest.raises(CheckpointError, match="o_proj has a bias"):
        core.interop.save_peft(biased, tmp_path / "d")


# --- parameter counts --------------------------------------------------------------------


def test_parameter_counts_follow_the_papers_formulas():
    n, h = 4, 16
    model = make_llama()
    core.inject(model, PromptTuning(targets=["model"], num_virtual_tokens=n))
    assert count(adapter_of(model)[0]) == n * D  # n d

    model = make_llama()
    core.inject(model, PrefixTuning(targets=["model"], num_virtual_tokens=n, projection=False))
    prefix = adapter_of(model)[0].prefix
    assert prefix.shape == (n, L, 2, KV)
    assert [prefix[:, layer].numel() for layer in range(L)] == [2 * n * KV] * L  # per layer

    model = make_llama()
    cfg = PrefixTuning(targets=["model"], num_virtual_tokens=n, encoder_hidden_size=h)
    core.inject(model, cfg)
    width = L * 2 * KV  # P' (n x d) -> Linear(d, h) -> tanh -> Linear(h, 2 L d_kv)
    assert count(adapter_of(model)[0]) == n * D + (D * h + h) + (h * width + width)

    model = make_llama()
    cfg = ControlPrefix(
        targets=["model"], num_virtual_tokens=n, projection=False, attribute_sizes=(3, 2)
    )
    core.inject(model, cfg)
    assert count(adapter_of(model)[0]) == (n + (3 + 2) * cfg.control_tokens) * width

    model = make_llama()
    core.inject(model, LlamaAdapter(targets=LAYERS, adapter_len=3, adapter_layers=1))
    per_layer = [count(a) for a in adapter_of(model)]
    assert per_layer == [0, 3 * D + 1]  # K d + one gate, top layer only

    model = make_llama()
    cfg = LlamaAdapter(
        targets=LAYERS, adapter_len=3, gate="per_head", bias_tuning=True, unlock_norms=True
    )
    core.inject(model, cfg)
    linear_outputs = D + KV + KV + D + 128 + 128 + D  # q, k, v, o, gate, up, down
    v2 = 2 * linear_outputs + 2 * D  # bias + scale per linear output, two RMSNorm weights
    assert [count(a) for a in adapter_of(model)] == [3 * D + H + v2] * L


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_counts_and_token_layout(deep):
    vit, p = make_vit(), 3
    core.inject(vit, VPT(targets=["blocks"], num_virtual_tokens=p, deep=deep, patch_size=8))
    prompts = adapter_of(vit)[0].prompts
    depth, dim, patches = len(vit.blocks.base_layer), 64, (32 // 8) ** 2
    assert prompts.shape == ((depth if deep else 1), p, dim)
    assert count(adapter_of(vit)[0]) == (depth if deep else 1) * p * dim
    bound = (6 / (3 * 8**2 + dim)) ** 0.5  # the paper's uniform init
    assert prompts.abs().max() <= bound and prompts.abs().max() > bound / 2
    seen = {}
    blocks = vit.blocks.base_layer
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
    vit.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0]))
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen[0].shape[1] == seen[1].shape[1] == 1 + p + patches  # [cls; P; patches]
    assert seen["norm"].shape[1] == 1 + patches  # prompt outputs dropped after the last block
    assert torch.equal(seen[0][0, 1 : 1 + p], prompts[0])  # inserted after the class token
    second = seen[1][0, 1 : 1 + p]
    if deep:  # every block gets its own prompts
        assert torch.equal(second, prompts[1])
    else:  # block 1 sees block 0's prompt outputs
        assert not torch.equal(second, prompts[0])


def test_counting_on_the_meta_device():
    with torch.device("meta"):
        llama, vit = make_llama(), make_vit()
    cases = [
        (llama, PromptTuning(targets=["model"], num_virtual_tokens=4), 4 * D),
        (llama, PrefixTuning(targets=["model"], projection=False), 10 * L * 2 * KV),
        (llama, LlamaAdapter(targets=LAYERS), L * (10 * D + 1)),
        (vit, VPT(targets=["blocks"], deep=True), 2 * 10 * 64),
    ]
    for model, cfg, expected in cases:
        model = copy.deepcopy(model)
        core.inject(model, cfg)
        assert core.param_report(model).by_adapter["default"]["params"] == expected
        assert all(p.is_meta for a in adapter_of(model) for p in a.parameters())


# --- generation ---------------------------------------------------------------------------


def greedy_without_cache(model, ids, mask, steps):
    """Greedy decoding by full forwards (no KV cache), positions from the padding mask;
    returns the sequences and each step's next-token logits."""
    scores = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        scores.append(out.logits[:, -1])
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(scores, 1)


GENERATION_CASES = {
    "prompt": PromptTuning(targets=["model"], num_virtual_tokens=4),
    "prefix": PrefixTuning(targets=["model"], num_virtual_tokens=4, encoder_hidden_size=16),
    "control": ControlPrefix(targets=["model"], num_virtual_tokens=3, attribute_sizes=(3, 2)),
    "llama_adapter": LlamaAdapter(targets=LAYERS, adapter_len=4),
}


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_cached_generation_equals_uncached_greedy_decoding(case):
    model = make_llama()
    model.generation_config.eos_token_id = None  # always decode every step
    core.inject(model, GENERATION_CASES[case])
    randomise(model, std=0.3)
    batch = llama_batch()
    steps = 6
    with control(model, [[0, 1], [2, 0]]) if case == "control" else nullcontext():
        cached = model.generate(
            **batch,
            max_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        plain, scores = greedy_without_cache(
            model, batch["input_ids"], batch["attention_mask"], steps
        )
        assert torch.equal(cached.sequences, plain)
        torch.testing.assert_close(torch.stack(cached.logits, 1), scores, atol=1e-4, rtol=1e-4)
        cached = cached.sequences
        if case != "control":  # the padded row decodes as the same sequence unpadded
            alone = model.generate(
                batch["input_ids"][1:, 2:], max_new_tokens=steps, do_sample=False, pad_token_id=0
            )
            assert torch.equal(alone[0], cached[1, 2:])


# --- behaviour at initialisation and in training -------------------------------------------


def test_llama_adapter_starts_as_the_identity_with_v2_options():
    model, batch = make_llama(), llama_batch()
    before = logits(model, batch)
    cfg = LlamaAdapter(
        targets=LAYERS, gate="per_head", gate_tanh=True, bias_tuning=True, unlock_norms=True
    )
    core.inject(model, cfg)
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)
    with torch.no_grad():
        adapter_of(model)[0].gate.fill_(0.5)
    assert (logits(model, batch) - before).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["prompt", "prefix", "control", "vpt"])
def test_the_other_methods_change_the_output_from_step_zero(case):
    build, make_cfg = ALL_CASES[case]
    model = build()
    before = run_case(model, case)
    core.inject(model, make_cfg())
    assert (run_case(model, case) - before).abs().max() > 1e-3


def test_loss_is_over_real_tokens_only_and_matches_peft():
    """Prompt positions never reach the labels: the loss equals the frozen LM's loss
    formula on the real positions, and PEFT's (which pads labels with -100) when the first
    label is ignored (PEFT's last prompt position would otherwise predict it)."""
    base, ids = make_llama(), torch.randint(1, 128, (2, 7))
    labels = ids.clone()
    labels[:, 0] = -100
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    randomise(theirs)
    ours = copy.deepcopy(base)
    core.inject(ours, PromptTuning(targets=["model"], num_virtual_tokens=3))
    with torch.no_grad():
        adapter_of(ours)[0].prompt.copy_(theirs.prompt_encoder["default"].embedding.weight)
        out = ours(input_ids=ids, labels=labels)
        manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        torch.testing.assert_close(out.loss, manual)
        torch.testing.assert_close(out.loss, theirs(input_ids=ids, labels=labels).loss)


def test_explicit_position_ids_mean_the_same_as_the_defaults():
    """Given positions count real tokens; the prompt takes the n positions before them."""
    for build, batch, target in (
        (make_llama, {"input_ids": torch.randint(1, 128, (2, 5))}, "model"),
        (make_bert, bert_batch(), "bert"),
    ):
        model = build()
        core.inject(model, PromptTuning(targets=[target], num_virtual_tokens=3))
        randomise(model)
        positions = torch.arange(batch["input_ids"].shape[1]).expand(2, -1)
        explicit = logits(model, {**batch, "position_ids": positions})
        torch.testing.assert_close(explicit, logits(model, batch))


TRAIN_CASES = {
    "prompt": lambda: PromptTuning(targets=["model"], num_virtual_tokens=4),
    "prefix": lambda: PrefixTuning(targets=["model"], num_virtual_tokens=4, encoder_hidden_size=16),
    "control": lambda: ControlPrefix(targets=["model"], num_virtual_tokens=2, control_tokens=1),
    "llama_adapter": lambda: LlamaAdapter(targets=LAYERS, adapter_len=4, bias_tuning=True),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_a_few_steps_reduce_the_loss_on_a_toy_lm_task(case):
    model, ids = make_llama(), torch.randint(1, 128, (4, 8))
    core.inject(model, TRAIN_CASES[case]())
    extra = {"control_ids": torch.tensor([0, 1, 0, 1])} if case == "control" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids, **extra).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_vpt_trains_and_its_dropout_acts_in_training_only():
    vit, x, y = make_vit(), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    core.inject(
        vit,
        VPT(
            targets=["blocks"],
            num_virtual_tokens=4,
            deep=True,
            dropout=0.3,
            modules_to_save=["head"],
        ),
    )
    assert torch.equal(vit(x), vit(x))  # eval: deterministic
    vit.train()
    assert not torch.equal(vit(x), vit(x))
    optimiser = torch.optim.AdamW([p for p in vit.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(vit(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert adapter_of(vit)[0].prompts.grad is not None


# --- Control Prefixes --------------------------------------------------------------------


def test_control_ids_select_per_example_prefixes():
    model, ids = make_llama(), torch.randint(1, 128, (2, 6))
    core.inject(
        model, ControlPrefix(targets=["model"], attribute_sizes=(3, 2), encoder_hidden_size=8)
    )
    randomise(model)
    chosen = torch.tensor([[2, 1], [0, 1]])
    with torch.no_grad():
        by_kwarg = model(input_ids=ids, control_ids=chosen).logits
        with control(model, chosen):
            by_context = model(input_ids=ids).logits
        swapped = model(input_ids=ids, control_ids=chosen.flip(0)).logits
        single = model(input_ids=ids[:1], control_ids=chosen[:1]).logits
    torch.testing.assert_close(by_kwarg, by_context)
    torch.testing.assert_close(single, by_kwarg[:1], atol=1e-5, rtol=1e-5)  # per example
    assert (swapped[0] - by_kwarg[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs attribute ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="attribute j below"):
        model(input_ids=ids, control_ids=torch.tensor([[3, 0], [0, 0]]))


# --- merge, checkpoints, named adapters ----------------------------------------------------

ALL_CASES = {
    "prompt": (make_llama, lambda: PromptTuning(targets=["model"], num_virtual_tokens=3)),
    "prefix": (make_llama, lambda: PrefixTuning(targets=["model"], encoder_hidden_size=8)),
    "control": (make_llama, lambda: ControlPrefix(targets=["model"], encoder_hidden_size=8)),
    "llama_adapter": (
        make_llama,
        lambda: LlamaAdapter(targets=LAYERS, bias_tuning=True, unlock_norms=True),
    ),
    "vpt": (make_vit, lambda: VPT(targets=["blocks"], deep=True)),
}


def run_case(model, case):
    if case == "vpt":
        with torch.no_grad():
            return model(torch.ones(1, 3, 32, 32))
    extra = {"control_ids": torch.tensor([1])} if case == "control" else {}
    return logits(model, {"input_ids": torch.arange(1, 7)[None], **extra})


@pytest.mark.parametrize("case", ALL_CASES)
def test_merge_is_refused_and_save_load_round_trips_exactly(tmp_path, case):
    build, make_cfg = ALL_CASES[case]
    model = build()
    fresh = copy.deepcopy(model)
    core.inject(model, make_cfg())
    randomise(model, std=0.2)
    want = run_case(model, case)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="acts on activations"):
        core.merge(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    core.save_adapter(model, tmp_path)
    core.load_adapter(fresh, tmp_path)
    assert torch.equal(run_case(fresh, case), want)


def hooks(module):
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_named_adapters_switch_and_delete():
    model, batch = make_llama(), {"input_ids": torch.randint(1, 128, (2, 5))}
    base, hooks_before = logits(model, batch), hooks(model.model)
    core.inject(model, PromptTuning(targets=["model"], num_virtual_tokens=2), name="a")
    core.inject(model, PrefixTuning(targets=["model"], encoder_hidden_size=8), name="b")
    randomise(model)
    for p in model.parameters():
        p.requires_grad_(False)
    core.set_active(model, ["a"])
    only_a = logits(model, batch)
    core.set_active(model, ["b"])
    only_b = logits(model, batch)
    assert (only_a - only_b).abs().max() > 1e-3 and (only_a - base).abs().max() > 1e-3
    core.set_active(model, ["a", "b"])
    with pytest.raises(RuntimeError, match="only one prompt / prefix adapter"):
        model(**batch)
    core.set_active(model, [])
    assert torch.equal(logits(model, batch), base)
    core.set_active(model, ["a"])
    assert torch.equal(logits(model, batch), only_a)  # the failed call left nothing behind
    core.delete_adapter(model, "a")
    core.delete_adapter(model, "b")
    assert torch.equal(logits(model, batch), base)
    assert hooks(model.model) == hooks_before  # detached adapters leave no hook behind


def test_text_init_uses_the_tokenizer_and_token_ids_need_none(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "great": 5, "movie": 9}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    model = make_llama()
    table = model.model.embed_tokens.weight
    cfg = PromptTuning(
        targets=["model"],
        num_virtual_tokens=3,
        init="text",
        init_text="great movie",
        tokenizer=str(tmp_path),
    )
    core.inject(model, cfg, name="text")
    assert torch.equal(adapter_of(model, "text")[0].prompt, table[[5, 9, 5]])
    core.inject(
        model,
        PromptTuning(
            targets=["model"], num_virtual_tokens=2, init="tokens", init_token_ids=[7, 8, 9]
        ),
        name="ids",
    )
    assert torch.equal(adapter_of(model, "ids")[0].prompt, table[[7, 8]])
