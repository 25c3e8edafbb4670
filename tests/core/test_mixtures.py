"""Mixtures of adapters: MoV / MoLoRA, PESC, PERFT and MPOE on tiny LLaMA and MoE models."""

import pytest
import torch
import torch.nn.functional as F

import core
from conftest import make_llama, make_vit, perturb
from core.errors import ConfigError, MergeError, TargetError
from core.methods.bottleneck import Bottleneck
from core.methods.lora import LoRA
from core.methods.mixtures import (
    MPOE,
    PERFT,
    PESC,
    MoLoRA,
    MoV,
    expert_loads,
    mpo_contract,
    mpo_decompose,
)
from core.methods.scaling import IA3
from core.registry import METHODS, config_from_dict
from core.targeting import adapted_modules

IA3_SITES = {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


def llama_pair():
    """Two tiny LLaMAs with the same weights."""
    a = make_llama()
    b = make_llama()
    b.load_state_dict(a.state_dict())
    return a, b


def tokens(vocab=128, shape=(2, 7)):
    return torch.randint(0, vocab, shape)


def logits(model, ids):
    return model(input_ids=ids).logits


def adapters(model, name="default"):
    return {p: w.adapters[name] for p, w in adapted_modules(model) if name in w.adapters}


def make_moe(kind: str):
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        cfg = MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
        return MixtralForCausalLM(cfg).eval()
    cfg = Qwen2MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_experts=4,
        norm_topk_prob=False,
        **common,
    )
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2-MoE's router starts at zero; give it real routing
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


def moe_pair(kind):
    a = make_moe(kind)
    b = make_moe(kind)
    b.load_state_dict(a.state_dict())
    return a, b


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MoV, MoLoRA, PESC, PERFT, MPOE])
def test_configs_build_from_targets_alone_and_round_trip(cls):
    cfg = cls(targets=["mlp"])
    assert METHODS[cfg.method] is cls and not cls.mergeable
    assert config_from_dict(cfg.method, cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cls, fields, words",
    [
        (MoV, {"num_experts": 0}, "num_experts"),
        (MoV, {"num_experts": 4, "top_k": 5}, "top_k"),
        (MoLoRA, {"alpha": -1.0}, "alpha"),
        (PESC, {"activation": "softsign"}, "activation"),
        (PESC, {"top_k": 9}, "top_k"),
        (PERFT, {"variant": "sparse"}, "variant"),
        (PERFT, {"variant": "single", "num_experts": 3}, "num_experts"),
        (PERFT, {"variant": "embedded", "num_experts": 3}, "num_experts"),
        (PERFT, {"variant": "routed", "num_experts": 2, "top_k": 3}, "top_k"),
        (MPOE, {"num_tensors": 4}, "odd"),
        (MPOE, {"bond_dim": 0}, "bond_dim"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(cls, fields, words):
    with pytest.raises(ConfigError, match=words):
        cls(targets=["x"], **fields)


def test_unsupported_layers_are_refused_with_a_reason():
    vit = make_vit()
    with pytest.raises(TargetError, match="nn.Linear"):
        core.inject(vit, MoV(targets=["patch_embed.proj"]))
    with pytest.raises(TargetError, match="sparse MoE block"):
        core.inject(make_llama(), PERFT(targets=["mlp"]))


@pytest.mark.parametrize(
    "cfg",
    [MoV(**IA3_SITES), MoLoRA(targets=["q_proj"]), PESC(targets=["mlp"]), MPOE(targets=["o_proj"])],
)
def test_merge_is_refused(cfg):
    model = core.inject(make_llama(), cfg)
    with pytest.raises(MergeError, match="cannot be merged"):
        core.merge(model)


# --- identity at start, reduction to the single method --------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        MoV(**IA3_SITES),
        MoV(**IA3_SITES, head_dim=16, top_k=3),
        MoLoRA(targets=["q_proj", "v_proj", "down_proj"]),
        PESC(targets=["mlp"]),
        MPOE(targets=["down_proj", "o_proj"]),
    ],
)
def test_starts_as_the_frozen_model_exactly(cfg):
    model, frozen = llama_pair()
    core.inject(model, cfg)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(frozen, ids))


def test_mov_with_one_expert_is_ia3():
    mov, ia3 = llama_pair()
    core.inject(mov, MoV(num_experts=1, **IA3_SITES))
    core.inject(ia3, IA3(**IA3_SITES))
    perturb(mov)
    for path, adapter in adapters(mov).items():
        adapters(ia3)[path].scale.data.copy_(
            adapter.experts[0, 0].reshape_as(adapters(ia3)[path].scale)
        )
    ids = tokens()
    torch.testing.assert_close(logits(mov, ids), logits(ia3, ids), atol=1e-5, rtol=1e-5)


def test_mov_with_uniform_routing_is_ia3_with_the_mean_vector():
    mov, ia3 = llama_pair()
    core.inject(mov, MoV(num_experts=5, **IA3_SITES))
    core.inject(ia3, IA3(**IA3_SITES))
    perturb(mov)
    for path, adapter in adapters(mov).items():
        adapter.router.weight.data.zero_()  # equal logits: p_i = 1/n for every token
        mean = adapter.experts[0].mean(dim=0)
        adapters(ia3)[path].scale.data.copy_(mean.reshape_as(adapters(ia3)[path].scale))
    ids = tokens()
    torch.testing.assert_close(logits(mov, ids), logits(ia3, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("experts", [1, 3])
def test_molora_reduces_to_lora(experts):
    """One expert is LoRA; n experts with uniform routing are the rank-n r LoRA
    [A_1; ...; A_n], [B_1 ... B_n] / n."""
    molora, lora = llama_pair()
    core.inject(molora, MoLoRA(num_experts=experts, r=2, alpha=4, targets=["q_proj", "down_proj"]))
    core.inject(lora, LoRA(r=2 * experts, alpha=4 * experts, targets=["q_proj", "down_proj"]))
    perturb(molora)
    for path, adapter in adapters(molora).items():
        adapter.router.weight.data.zero_()
        adapters(lora)[path].A.data.copy_(adapter.A)
        adapters(lora)[path].B.data.copy_(adapter.B / experts)
    ids = tokens()
    torch.testing.assert_close(logits(molora, ids), logits(lora, ids), atol=1e-5, rtol=1e-5)


def test_pesc_with_one_expert_is_the_sequential_bottleneck_adapter():
    pesc, bottleneck = llama_pair()
    fields = {"bottleneck": 8, "activation": "relu", "scale": 1.0}
    core.inject(pesc, PESC(num_experts=1, top_k=1, dropout=0.0, targets=["mlp"], **fields))
    core.inject(bottleneck, Bottleneck(mode="sequential", targets=["mlp"], **fields))
    perturb(pesc)
    for path, adapter in adapters(pesc).items():
        other = adapters(bottleneck)[path]
        other.down.weight.data.copy_(adapter.down)
        other.up.weight.data.copy_(adapter.up)
    ids = tokens()
    torch.testing.assert_close(logits(pesc, ids), logits(bottleneck, ids), atol=1e-5, rtol=1e-5)


# --- routing weights, loads, auxiliary loss -------------------------------------------------


@pytest.mark.parametrize(
    "cfg, top_k",
    [
        (MoLoRA(targets=["q_proj"]), None),
        (MoLoRA(targets=["q_proj"], top_k=3), 3),
        (PESC(targets=["mlp"]), 2),
        (MoV(**IA3_SITES, head_dim=16), None),
    ],
)
def test_routing_weights_sum_to_one_per_token(cfg, top_k):
    model = core.inject(make_llama(), cfg)
    adapter = next(iter(adapters(model).values()))
    d = adapter.router.weight.shape[1]
    x = torch.randn(3, 5, d)
    gates = adapter.gates(x)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))
    if top_k is not None:
        assert ((gates > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(adapter.expert_load().sum(), torch.tensor(1.0))


def test_expert_loads_report_every_running_mixture():
    model = core.inject(make_llama(), PESC(targets=["mlp"], num_experts=4))
    assert expert_loads(model) == {}  # nothing has run yet
    logits(model, tokens())
    loads = expert_loads(model)
    assert sorted(loads) == [f"default/model.layers.{i}.mlp" for i in range(2)]
    for load in loads.values():
        assert load.shape == (4,)
        torch.testing.assert_close(load.sum(), torch.tensor(1.0))
    core.set_active(model, [])
    assert expert_loads(model) == {}


def switch_loss(x, weight, num_experts, top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func((F.linear(x, weight),), num_experts, top_k)


def test_pesc_aux_loss_is_switch_load_balancing_as_transformers_computes_it():
    model = core.inject(make_llama(), PESC(targets=["mlp"], num_experts=4, top_k=2))
    adapter = next(iter(adapters(model).values()))
    adapter.train()
    x, h = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    adapter.adapt(x, h)
    expected = 0.01 * switch_loss(x.reshape(-1, 64), adapter.router.weight, 4, 2)
    torch.testing.assert_close(adapter.aux_loss(), expected)


def test_core_aux_loss_sums_mixtures_in_training_and_gets_gradients():
    model = core.inject(make_llama(), PESC(targets=["mlp"], balance_coef=0.5))
    model.train()
    logits(model, tokens())
    aux = core.aux_loss(model)
    per_layer = [a.aux_loss() for a in adapters(model).values()]
    torch.testing.assert_close(aux, sum(per_layer))
    assert aux.item() >= 0.5 * 2 * 2 - 1e-4  # n sum f_i P_i >= top_k; 2 layers
    aux.backward()
    assert all(a.router.weight.grad.abs().sum() > 0 for a in adapters(model).values())
    model.eval()
    logits(model, tokens())
    assert core.aux_loss(model) is None


# --- PERFT on transformers MoE blocks -------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("variant", ["routed", "embedded", "dense", "single"])
def test_perft_starts_unchanged_then_adapts_and_round_trips(kind, variant, tmp_path):
    model, frozen = moe_pair(kind)
    core.inject(model, PERFT(targets=["mlp"], variant=variant))
    ids = tokens(64, (2, 5))
    assert torch.equal(logits(model, ids), logits(frozen, ids))
    perturb(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(frozen, ids), atol=1e-4)
    core.save_adapter(model, tmp_path / "a")
    core.load_adapter(frozen, tmp_path / "a")
    torch.testing.assert_close(logits(frozen, ids), adapted)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_perft_parameter_counts_follow_the_formulas(kind):
    d, m, n_moe = 32, 8, 4
    expected = {
        "routed": 2 * 4 * m * d + d * 4,
        "embedded": 2 * n_moe * m * d,
        "dense": 2 * 2 * m * d,
        "single": 2 * m * d,
    }
    for variant, per_block in expected.items():
        model = core.inject(make_moe(kind), PERFT(targets=["mlp"], variant=variant, bottleneck=m))
        assert core.param_report(model).trainable == 2 * per_block, variant


def test_perft_embedded_reuses_the_blocks_own_routing():
    model, frozen = moe_pair("mixtral")
    core.inject(model, PERFT(targets=["mlp"], variant="embedded", bottleneck=4, scale=2.0))
    perturb(model)
    block = model.model.layers[0].mlp
    adapter = block.adapters["default"]
    x = torch.randn(1, 5, 32)
    got = block(x) - frozen.model.layers[0].mlp(x)
    _, scores, index = frozen.model.layers[0].mlp.gate(x.reshape(-1, 32))
    want = torch.zeros(5, 32)
    down, up = adapter.down.view(4, 4, 32), adapter.up.view(32, 4, 4)
    for t in range(5):
        for k in range(2):
            e = index[t, k]
            want[t] += scores[t, k] * (up[:, e] @ (down[e] @ x[0, t]))
    torch.testing.assert_close(got[0], 2.0 * want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.expert_load().sum(), torch.tensor(1.0))


def test_perft_routed_with_one_expert_is_single_and_reports_its_aux_loss():
    routed, single = moe_pair("mixtral")
    core.inject(routed, PERFT(targets=["mlp"], variant="routed", num_experts=1, top_k=1))
    core.inject(single, PERFT(targets=["mlp"], variant="single"))
    perturb(routed)
    for path, adapter in adapters(routed).items():
        adapters(single)[path].down.data.copy_(adapter.down)
        adapters(single)[path].up.data.copy_(adapter.up)
    ids = tokens(64, (2, 5))
    torch.testing.assert_close(logits(routed, ids), logits(single, ids))
    mixed = core.inject(make_moe("mixtral"), PERFT(targets=["mlp"], num_experts=4, top_k=2))
    adapter = adapters(mixed)["model.layers.0.mlp"]
    adapter.train()
    x = torch.randn(7, 32)
    adapter.adapt(x, torch.zeros(7, 32), mixed.model.layers[0].mlp.base_layer)
    torch.testing.assert_close(
        adapter.aux_loss(), 0.01 * switch_loss(x, adapter.router.weight, 4, 2)
    )


def test_perft_hook_is_removed_with_the_adapter():
    model = core.inject(make_moe("mixtral"), PERFT(targets=["mlp"], variant="embedded"))
    gate = model.model.layers[0].mlp.base_layer.gate
    assert len(gate._forward_hooks) == 1
    core.delete_adapter(model, "default")
    assert len(gate._forward_hooks) == 0


# --- MPOE -----------------------------------------------------------------------------------


def test_mpo_decomposition_is_lossless_and_truncates_to_the_bond_dim():
    from core.methods.mixtures import mpo_bonds, mpo_factors

    w = torch.randn(48, 64)
    out_f, in_f = mpo_factors(48, 5), mpo_factors(64, 5)
    assert out_f == (2, 2, 3, 2, 2) and in_f == (2, 2, 4, 2, 2)
    bonds = mpo_bonds(out_f, in_f, None)
    tensors = mpo_decompose(w, out_f, in_f, bonds)
    assert [tuple(t.shape) for t in tensors][2] == (16, 3, 4, 16)
    torch.testing.assert_close(mpo_contract(tensors), w, atol=1e-4, rtol=1e-4)
    low = mpo_decompose(w, out_f, in_f, mpo_bonds(out_f, in_f, 2))
    assert max(t.shape[-1] for t in low) == 2
    assert (mpo_contract(low) - w).norm() > 0.1 * w.norm()


def test_mpoe_counts_trains_only_auxiliary_tensors_and_round_trips(tmp_path):
    model, fresh = llama_pair()
    core.inject(model, MPOE(targets=["down_proj"], num_experts=3))
    adapter = adapters(model)["model.layers.0.mlp.down_proj"]
    # down_proj: 64 x 128 -> out (2,2,4,2,2), in (2,2,8,2,2), bonds (1,4,16,16,4,1)
    aux = 1 * 4 * 4 + 4 * 4 * 16 + 16 * 4 * 4 + 4 * 4 * 1
    assert sum(p.numel() for p in adapter.parameters()) == 3 * aux + 128 * 3
    assert core.param_report(model).trainable == 2 * (3 * aux + 128 * 3)
    model.train()
    ids = tokens()
    loss = logits(model, ids).logsumexp(-1).mean() + core.aux_loss(model)
    loss.backward()
    assert all(p.grad is not None for p in adapter.aux) and adapter.central.grad is None
    perturb(model, std=0.05)
    model.eval()
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, logits(fresh, ids), atol=1e-4)
    core.save_adapter(model, tmp_path / "mpoe")
    core.load_adapter(fresh, tmp_path / "mpoe")  # recomputes the central tensor
    torch.testing.assert_close(logits(fresh, ids), adapted, atol=1e-5, rtol=1e-5)


def test_mpoe_uses_switch_top1_routing():
    model = core.inject(make_llama(), MPOE(targets=["o_proj"], num_experts=4))
    adapter = adapters(model)["model.layers.0.self_attn.o_proj"]
    adapter.train()
    x = torch.randn(9, 64)
    gates = adapter.gates(x)
    probs = F.linear(x, adapter.router.weight).softmax(-1)
    assert ((gates > 0).sum(-1) == 1).all()
    torch.testing.assert_close(gates.max(-1).values, probs.max(-1).values)
    torch.testing.assert_close(
        adapter.aux_loss(), 0.01 * switch_loss(x, adapter.router.weight, 4, 1)
    )


@pytest.mark.parametrize("top_k, tensors", [(1, 5), (2, 3)])
def test_mpoe_fast_path_equals_the_plain_mpo_formula_with_gradients(top_k, tensors):
    """The grouped per-expert GEMMs and the two-GEMM contraction give the paper's
    y = W x + b + sum_e g_e (MPO(T_e) - W_0) x, output and every gradient, odd shapes."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(36, 30))  # out (1,2,...), in: odd factors
    cfg = MPOE(targets=["0"], num_experts=3, num_tensors=tensors, top_k=top_k)
    model = core.inject(base, cfg)
    wrapper = model[0]
    adapter = wrapper.adapters["default"]
    # W_0 (kept in GEMM block order) is the plain contraction of the initial tensors, so the
    # reference below does not take it from the fast path on trust
    torch.testing.assert_close(adapter.initial, mpo_contract(adapter.tensors())[0])
    perturb(model, std=0.1)
    adapter.train()
    x = torch.randn(2, 7, 36, requires_grad=True)
    y = model(x)
    grad_out = torch.randn_like(y)
    trained = [x, *adapter.parameters()]
    fast = torch.autograd.grad(y, trained, grad_out)

    flat = x.reshape(-1, 36)
    gates = adapter.gates(flat)
    assert ((gates > 0).sum(-1) == top_k).all()
    deltas = mpo_contract(adapter.tensors()) - adapter.initial  # (E, out, in)
    layer = wrapper.base_layer
    plain = F.linear(x, layer.weight, layer.bias) + torch.einsum(
        "te,eoi,ti->to", gates, deltas, flat
    ).reshape(2, 7, 30)
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(fast, torch.autograd.grad(plain, trained, grad_out), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_permute_copy_moves_wide_rows_bit_for_bit():
    from core.methods.mixtures import BlockPermute, permute_copy

    t = torch.randn(3, 5, 2, 4)
    dims = (2, 0, 1, 3)
    assert torch.equal(permute_copy(t, dims), t.permute(dims).contiguous())
    odd = torch.randn(3, 5, 3)  # 12-byte rows: no wide type, the plain copy
    assert torch.equal(permute_copy(odd, (1, 0, 2)), odd.permute(1, 0, 2).contiguous())
    moved = (1, 2, 0, 3)  # last axis moves: the plain copy
    assert torch.equal(permute_copy(t, moved), t.permute(moved).contiguous())
    t.requires_grad_(True)
    g = torch.randn(2, 3, 5, 4)
    (grad,) = torch.autograd.grad(BlockPermute.apply(t, dims), t, g)
    assert torch.equal(grad, g.permute(1, 2, 0, 3))


# --- counting on the meta device, save / load -----------------------------------------------


def test_mov_with_ten_experts_on_a_meta_llama_7b_matches_the_formula():
    from transformers import LlamaConfig, LlamaForCausalLM

    d, d_ff, layers, n = 4096, 11008, 32, 10
    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=d,
                intermediate_size=d_ff,
                num_hidden_layers=layers,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
            )
        )
    core.inject(model, MoV(num_experts=n, **IA3_SITES))
    # per layer: k and v scale d_kv outputs (experts n d_kv, router d_kv n); down_proj
    # scales its d_ff inputs (n d_ff + d_ff n)
    assert core.param_report(model).trainable == layers * 2 * n * (2 * d + d_ff) == 12_288_000
    core.delete_adapter(model, "default")
    core.inject(model, MoV(num_experts=n, head_dim=128, **IA3_SITES))
    per_layer = 2 * (n * d + 128 * n) + 2 * n * d_ff
    assert core.param_report(model).trainable == layers * per_layer


@pytest.mark.parametrize(
    "cfg, per_layer",
    [
        (MoLoRA(targets=["q_proj"]), 10 * 4 * (64 + 64) + 64 * 10),
        (PESC(targets=["mlp"]), 2 * 8 * 64 * 64 + 64 * 8),
        (MPOE(targets=["o_proj"], num_experts=2), None),
    ],
)
def test_counts_on_the_meta_device(cfg, per_layer):
    with torch.device("meta"):
        model = make_llama()
    core.inject(model, cfg)
    adapter = next(iter(adapters(model).values()))
    if per_layer is None:  # o_proj 64 x 64: factors (2,2,4,2,2), bonds (1,4,16,16,4,1)
        per_layer = 2 * (16 + 256 + 256 + 16) + 64 * 2
        assert adapter.central.is_meta
    assert core.param_report(model).trainable == 2 * per_layer


@pytest.mark.parametrize(
    "cfg",
    [MoV(**IA3_SITES, top_k=2), MoLoRA(targets=["v_proj"]), PESC(targets=["mlp"])],
)
def test_save_load_round_trip(cfg, tmp_path):
    model, fresh = llama_pair()
    core.inject(model, cfg)
    perturb(model)
    ids = tokens()
    adapted = logits(model, ids)
    core.save_adapter(model, tmp_path / "a")
    core.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, ids), adapted)


def test_training_moves_experts_apart():
    model = core.inject(make_llama(), MoLoRA(targets=["q_proj", "v_proj"], num_experts=3))
    model.train()
    adapter = adapters(model)["model.layers.0.self_attn.q_proj"]
    router = adapter.router.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    for _ in range(3):
        opt.zero_grad()
        logits(model, ids).logsumexp(-1).mean().backward()
        opt.step()
    b = adapter.B.detach().view(64, 3, 4)
    assert not torch.allclose(b[:, 0], b[:, 1])
    assert not torch.equal(adapter.router.weight, router)  # the router trains too


# --- the shipped configs --------------------------------------------------------------------


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        vocab_size=64,
        feed_forward_proj="gated-gelu",
    )
    return T5ForConditionalGeneration(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))


def tiny_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return OlmoeForCausalLM(cfg)


@pytest.mark.parametrize(
    "name, build, per_model",
    [
        # 2 encoder blocks (k, v, wo) + 2 decoder blocks (self k, v, cross k, v, wo)
        ("mov", tiny_t5, 10 * (2 * 2 * 2 * 32 + 2 * 4 * 2 * 32 + 4 * 2 * 48)),
        ("molora", tiny_t5, None),
        ("pesc", make_llama, 2 * (2 * 8 * 64 * 64 + 64 * 8)),
        ("perft", tiny_olmoe, 2 * (2 * 4 * 8 * 32 + 32 * 4)),
        ("mpoe", tiny_gpt2, None),
    ],
)
def test_nlp_configs_build_their_method_on_the_model_family(name, build, per_model):
    import yaml

    from core.lightning import method_from_spec

    with open(f"configs/nlp/{name}.yaml") as handle:
        spec = yaml.safe_load(handle)["model"]["method"]
    cfg = method_from_spec(spec)
    model = core.inject(build(), cfg)
    trainable = core.param_report(model).trainable
    assert trainable == per_model if per_model is not None else trainable > 0


# --- routing functions inside bottleneck adapters (Qu et al.) -------------------------------


@pytest.mark.parametrize("routing", ["xt_xvT_xv", "xt_xvT_xv_relu", "xt_mul_xv", "xt_add_xv"])
def test_bottleneck_routing_functions_follow_their_formulas(routing):
    from core.methods.bottleneck import routing_features

    model, frozen = llama_pair()
    cfg = Bottleneck(targets=["mlp"], bottleneck=8, routing=routing, activation="gelu")
    core.inject(model, cfg)
    plain = core.inject(make_llama(), Bottleneck(targets=["mlp"], bottleneck=8))
    assert core.param_report(model).trainable == core.param_report(plain).trainable
    ids, visual = tokens(), torch.randn(2, 3, 64)
    with routing_features(model, visual):
        assert torch.equal(logits(model, ids), logits(frozen, ids))  # W_up starts at zero
    perturb(model)
    adapter = model.model.layers[0].mlp.adapters["default"]
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    t, v = adapter.down(h), adapter.down(visual)
    routed = {
        "xt_xvT_xv": t @ v.transpose(1, 2) @ v,
        "xt_xvT_xv_relu": F.relu(t) @ F.relu(v).transpose(1, 2) @ v,
        "xt_mul_xv": t * v.mean(1, keepdim=True),
        "xt_add_xv": t + v.mean(1, keepdim=True),
    }[routing]
    with routing_features(model, visual):
        got = adapter.adapt(x, h)
    torch.testing.assert_close(got, h + adapter.up(F.gelu(routed)), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="routing_features"):
        adapter.adapt(x, h)


def test_routing_is_validated_and_kept_off_compacter():
    from core.methods.bottleneck import Compacter

    with pytest.raises(ConfigError, match="routing"):
        Bottleneck(targets=["mlp"], routing="attention")
    with pytest.raises(ConfigError, match="Compacter does not take routing"):
        Compacter(targets=["mlp"], routing="xt_mul_xv")
    cfg = Bottleneck(targets=["mlp"], routing="xt_xvT_xv")
    assert config_from_dict("bottleneck", cfg.to_dict()) == cfg
