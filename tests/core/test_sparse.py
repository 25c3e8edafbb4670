"""Sparse parameter selection: diff pruning, GPS and SPT on a tiny timm ViT and LLaMA."""

import pytest
import torch
import torch.nn.functional as F

import core
from conftest import make_llama, make_vit
from core.errors import ConfigError, MergeError, TargetError
from core.methods.sparse import (
    GPS,
    SPT,
    DiffPruning,
    DiffPruningAdapter,
    SparseDeltaAdapter,
    SPTAdapter,
    global_top_k,
    prune,
    select,
)
from core.registry import METHODS, config_from_dict
from core.targeting import adapted_modules

LINEARS = ["qkv", "attn.proj", "fc1", "fc2"]


def vit_pair():
    a, b = make_vit(), make_vit()
    b.load_state_dict(a.state_dict())
    return a, b


def task_batches(n=2, size=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(n)
    ]


def adapters(model, name="default"):
    return {p: w.adapters[name] for p, w in adapted_modules(model) if name in w.adapters}


def base_weights(model):
    return {p: w.base_layer.weight.detach().clone() for p, w in adapted_modules(model)}


def train(model, batches, steps=3, aux=False):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        for x, y in batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if aux:
                loss = loss + core.aux_loss(model)
            loss.backward()
            opt.step()
    model.eval()


def changed_positions(model, before):
    """Flat positions where merging changed each base weight (the training's footprint)."""
    core.merge(model)
    out = {
        p: torch.nonzero((w.base_layer.weight != before[p]).reshape(-1)).squeeze(1)
        for p, w in adapted_modules(model)
    }
    core.unmerge(model)
    return out


def manual_scores(model, batches, paths, squared):
    """|sum_b g_b| or sum_b g_b^2 of the named plain weights, computed directly."""
    weights = [model.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
        for s, g in zip(sums, grads, strict=True):
            s += g.square() if squared else g
    return [s if squared else s.abs() for s in sums]


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DiffPruning, GPS, SPT])
def test_configs_build_from_targets_alone_and_round_trip(cls):
    cfg = cls(targets=["fc1"])
    assert METHODS[cfg.method] is cls and cls.mergeable
    assert config_from_dict(cfg.method, cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cls, fields, words",
    [
        (DiffPruning, {"density": 0.0}, "density"),
        (DiffPruning, {"stretch": (0.0, 1.5)}, "stretch"),
        (DiffPruning, {"params": "weight"}, "params"),
        (DiffPruning, {"kept": {"a.weight": -1}}, "kept"),
        (GPS, {"k": 0}, "k"),
        (SPT, {"rank": 0}, "rank"),
        (SPT, {"density": 1.5}, "density"),
        (SPT, {"counts": {"fc1": 1.5}}, "counts"),
    ],
)
def test_bad_fields_are_refused_with_the_field_named(cls, fields, words):
    with pytest.raises(ConfigError, match=words):
        cls(targets=["x"], **fields)


def test_unsupported_modules_are_refused_with_a_reason():
    with pytest.raises(TargetError, match="weight matrix"):
        core.inject(make_vit(), SPT(targets=["patch_embed.proj"]))
    with pytest.raises(TargetError, match="input connections"):
        core.inject(make_vit(), GPS(targets=["head"], k=65))
    with pytest.raises(TargetError, match="weight matrix"):
        core.inject(make_vit(), GPS(targets=["norm1"]))


def test_global_top_k_is_exact_and_breaks_ties_in_order():
    scores = [torch.tensor([1.0, 3.0, 2.0]), torch.tensor([3.0, 0.5]), torch.tensor([3.0])]
    chosen = global_top_k(scores, 3)
    assert [c.tolist() for c in chosen] == [[1], [0], [0]]
    chosen = global_top_k(scores, 2)  # three tied at 3.0: the earlier tensors win
    assert [c.tolist() for c in chosen] == [[1], [0], []]


# --- GPS ------------------------------------------------------------------------------------


def test_gps_starts_unchanged_counts_k_per_neuron_and_refuses_training_before_select():
    vit, frozen = vit_pair()
    core.inject(vit, GPS(targets=LINEARS + ["patch_embed.proj"], k=3))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit(x), frozen(x))
    per_layer = {p: a.num_selected() for p, a in adapters(vit).items()}
    outs = {"qkv": 192, "proj": 64, "fc1": 256, "fc2": 64}
    for path, count in per_layer.items():
        assert count == 3 * outs[path.rsplit(".", 1)[-1]]
    assert core.param_report(vit).trainable == sum(per_layer.values())
    vit.train()
    with pytest.raises(RuntimeError, match="select"):
        vit(x)


def test_gps_picks_each_neurons_top_k_gradients_deterministically():
    batches = task_batches()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        vit = make_vit()
        core.inject(vit, GPS(targets=["fc1", "fc2"], k=2))
        select(vit, batches)
        runs.append({p: a.indices_weight.clone() for p, a in adapters(vit).items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][p], runs[1][p]) for p in runs[0])
    torch.manual_seed(0)
    plain = make_vit()
    paths = list(runs[0])
    for path, score in zip(paths, manual_scores(plain, batches, paths, squared=False), strict=True):
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[runs[0][path]] = True
        chosen = chosen.view_as(score)
        assert (chosen.sum(1) == 2).all()  # exactly k per neuron
        lowest_chosen = torch.where(chosen, score, torch.inf).min(1).values
        highest_other = torch.where(chosen, -torch.inf, score).max(1).values
        assert (lowest_chosen >= highest_other).all()


def test_select_leaves_flags_and_gradients_as_they_were():
    vit = make_vit()
    core.inject(vit, GPS(targets=["fc2"], modules_to_save=["head"]))
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    select(vit, task_batches(1))
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert all(p.grad is None for p in vit.parameters())


def test_gps_training_changes_only_the_selected_entries(tmp_path):
    vit, fresh = vit_pair()
    core.inject(vit, GPS(targets=LINEARS + ["patch_embed.proj"], k=2))
    batches = task_batches()
    select(vit, batches)
    before = base_weights(vit)
    train(vit, batches)
    changed = changed_positions(vit, before)
    for path, adapter in adapters(vit).items():
        selected = set(adapter.indices_weight.tolist())
        assert set(changed[path].tolist()) <= selected
        assert changed[path].numel() > 0.9 * len(selected)  # training moved (nearly) all
        assert torch.equal(before[path], adapter_base(vit, path).weight)  # unmerged again
    x = batches[0][0]
    adapted = vit(x)
    core.merge(vit)
    torch.testing.assert_close(vit(x), adapted, atol=1e-5, rtol=1e-5)
    core.unmerge(vit)
    core.save_adapter(vit, tmp_path / "gps")
    core.load_adapter(fresh, tmp_path / "gps")
    torch.testing.assert_close(fresh(x), adapted)


def adapter_base(model, path):
    return model.get_submodule(path).base_layer


def test_gps_on_a_meta_llama_counts_without_data():
    with torch.device("meta"):
        model = make_llama()
    core.inject(model, GPS(targets=["q_proj", "down_proj"], k=4))
    assert core.param_report(model).trainable == 2 * (64 * 4 + 64 * 4)
    with pytest.raises(ValueError, match="meta"):
        select(model, [])


# --- SPT ------------------------------------------------------------------------------------


def spt_model(density=0.02, rank=1):
    torch.manual_seed(0)
    vit = make_vit()
    core.inject(vit, SPT(targets=LINEARS, density=density, rank=rank))
    return vit


def frozen_twin():
    """The plain ViT ``spt_model`` starts from."""
    torch.manual_seed(0)
    return make_vit()


def test_spt_spends_the_budget_exactly_with_structured_and_unstructured_weights():
    vit = spt_model()
    assert core.param_report(vit).trainable == 0  # nothing chosen yet
    total = sum(w.base_layer.weight.numel() for _, w in adapted_modules(vit))
    budget = round(0.02 * total)
    per_module = select(vit, task_batches())
    assert sum(per_module.values()) == budget
    assert core.param_report(vit).trainable == budget
    kinds = {p: (a.lora is not None, a.num_selected() > 0) for p, a in adapters(vit).items()}
    assert any(k[0] for k in kinds.values()) and any(k[1] for k in kinds.values())
    assert not any(k[0] and k[1] for k in kinds.values())  # a weight is one or the other
    cfg = next(iter(adapters(vit).values())).config
    for path, (structured, _) in kinds.items():
        assert (path in cfg.ranks) == structured
        if structured:
            assert cfg.counts[path] == 0


def test_spt_selection_is_deterministic_and_follows_the_sensitivity_ranking():
    batches = task_batches()
    picks = []
    for _ in range(2):
        vit = spt_model()
        select(vit, batches)
        picks.append({p: a.indices_weight.clone() for p, a in adapters(vit).items()})
    assert all(torch.equal(picks[0][p], picks[1][p]) for p in picks[0])
    plain = frozen_twin()
    unstructured = [p for p, i in picks[0].items() if i.numel()]
    scores = manual_scores(plain, batches, unstructured, squared=True)
    chosen_min = min(float(s.reshape(-1)[picks[0][p]].min()) for p, s in zip(unstructured, scores))
    others_max = max(
        float(s.reshape(-1)[~torch.isin(torch.arange(s.numel()), picks[0][p])].max())
        for p, s in zip(unstructured, scores)
    )
    assert chosen_min >= others_max


def test_spt_trains_only_chosen_entries_round_trips_and_merges(tmp_path):
    vit, fresh = spt_model(), frozen_twin()
    batches = task_batches()
    select(vit, batches)
    before = base_weights(vit)
    x = batches[0][0]
    assert torch.equal(vit(x), fresh(x))  # still the frozen model after selection
    train(vit, batches)
    changed = changed_positions(vit, before)
    for path, adapter in adapters(vit).items():
        if adapter.lora is None:
            assert set(changed[path].tolist()) <= set(adapter.indices_weight.tolist())
        else:
            assert changed[path].numel() > 0  # a LoRA update touches the whole matrix
    adapted = vit(x)
    core.save_adapter(vit, tmp_path / "spt")
    core.load_adapter(fresh, tmp_path / "spt")
    assert all(isinstance(a, SPTAdapter) for a in adapters(fresh).values())
    torch.testing.assert_close(fresh(x), adapted)
    core.merge(vit)
    torch.testing.assert_close(vit(x), adapted, atol=1e-5, rtol=1e-5)
    core.unmerge(vit)
    for path, w in before.items():
        torch.testing.assert_close(adapter_base(vit, path).weight, w, atol=1e-6, rtol=0)


def test_spt_refuses_a_budget_it_cannot_spend_exactly():
    vit = spt_model(density=0.5, rank=1)
    with pytest.raises(ConfigError, match="budget"):
        select(vit, task_batches(1))


# --- fast paths against the plain formulas ---------------------------------------------------


def plain_sparse_linear(x, layer, weight_index, weight_values, bias_index, bias_values):
    """F.linear(x, W + scatter(values), b + scatter(values)), autograd through all of it."""
    weight = layer.weight.reshape(-1).index_add(0, weight_index, weight_values)
    bias = layer.bias.index_add(0, bias_index, bias_values)
    return F.linear(x, weight.view_as(layer.weight), bias)


@pytest.mark.parametrize("per_row", [0, 2])  # 0: entries anywhere; 2: GPS, two per row
@pytest.mark.parametrize("gathered", [True, False])
def test_sparse_delta_linear_equals_the_plain_scatter_formula(per_row, gathered, monkeypatch):
    """Forward and the gradients of the selected values, the bias values and the input."""
    from core.methods import sparse

    monkeypatch.setattr(sparse, "GATHER_COST", 0 if gathered else 10**9)
    monkeypatch.setattr(sparse, "GATHER_BLOCK", 9)  # several blocks on these small sizes
    torch.manual_seed(0)
    layer = torch.nn.Linear(13, 11).requires_grad_(False)
    if per_row:
        cols = torch.stack([torch.randperm(13)[:per_row].sort().values for _ in range(11)])
        index = (torch.arange(11)[:, None] * 13 + cols).reshape(-1)
    else:
        index = torch.randperm(11 * 13)[:17].sort().values
    adapter = SparseDeltaAdapter(layer, {"weight": index.numel(), "bias": 3})
    adapter.assign("weight", index, torch.randn(index.numel()))
    adapter.assign("bias", torch.tensor([0, 4, 10]), torch.randn(3))
    x = torch.randn(3, 5, 13, requires_grad=True)
    trained = [x, adapter.values["weight"], adapter.values["bias"]]
    y = adapter.run_base(x, layer)
    grad_out = torch.randn_like(y)
    fast = torch.autograd.grad(y, trained, grad_out)
    plain = plain_sparse_linear(
        x, layer, index, adapter.values["weight"], adapter.indices("bias"), adapter.values["bias"]
    )
    torch.testing.assert_close(y, plain, atol=1e-6, rtol=1e-6)
    for got, want in zip(fast, torch.autograd.grad(plain, trained, grad_out), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparse_delta_linear_route_is_skipped_under_autocast_and_for_a_trained_weight(
    monkeypatch,
):
    """SparseDeltaLinear runs one dtype outside autocast on a frozen weight; under autocast,
    or when the base weight itself trains, the plain scatter formula runs (and trains)."""
    from core.methods import sparse

    calls = []
    real = sparse.SparseDeltaLinear.apply
    monkeypatch.setattr(sparse.SparseDeltaLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layer = torch.nn.Linear(13, 11).requires_grad_(False)
    index = torch.randperm(11 * 13)[:9].sort().values
    adapter = SparseDeltaAdapter(layer, {"weight": 9})
    adapter.assign("weight", index, torch.randn(9))
    x = torch.randn(4, 13)
    full = adapter.run_base(x, layer)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = adapter.run_base(x, layer)
    assert cast.dtype == torch.bfloat16 and len(calls) == 1
    torch.testing.assert_close(cast.float(), full, atol=0.05, rtol=0.02)
    cast.float().sum().backward()
    assert adapter.values["weight"].grad.abs().sum() > 0
    layer.weight.requires_grad_(True)
    trained = adapter.run_base(x, layer)
    assert len(calls) == 1
    trained.sum().backward()
    assert layer.weight.grad is not None  # the plain formula gives the weight its gradient


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gated_diff_equals_the_hard_concrete_formula(structured, training, monkeypatch):
    """``p + z(alpha, u) w`` in blocks vs autograd through ``gate`` on the same draw of u:
    forward and the gradients of w, alpha, the group gates and the input."""
    from core.methods import sparse

    monkeypatch.setattr(sparse, "GATE_BLOCK", 7)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11))
    core.inject(model, DiffPruning(targets=["0"], structured=structured, alpha_init=0.5))
    wrapper = model[0]
    adapter = wrapper.adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():  # gates strictly inside (0, 1) and clamped ones
            p.add_(torch.randn_like(p))
    adapter.train(training)
    x = torch.randn(3, 5, 13, requires_grad=True)
    trained = [x, *adapter.parameters()]
    torch.manual_seed(5)
    y = model(x)
    grad_out = torch.randn_like(y)
    fast = torch.autograd.grad(y, trained, grad_out)
    torch.manual_seed(5)  # the same u for every entry
    delta = adapter.deltas()
    layer = wrapper.base_layer
    plain = F.linear(x, layer.weight + delta["weight"], layer.bias + delta["bias"])
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    want = torch.autograd.grad(plain, trained, grad_out, allow_unused=True)
    for got, expected in zip(fast, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert want[1].abs().max() > 0 and want[3].abs().max() > 0  # w and alpha of the weight


# --- diff pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_diff_pruning_starts_unchanged_with_the_paper_l0_penalty(structured):
    vit, frozen = vit_pair()
    core.inject(vit, DiffPruning(targets=LINEARS + ["norm1"], structured=structured))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit(x), frozen(x))
    n = sum(
        p.numel() for _, w in adapted_modules(vit) for p in w.base_layer.parameters(recurse=False)
    )
    groups = 2 * 2 * 5  # (weight, bias) of 5 modules in 2 blocks
    assert core.param_report(vit).trainable == 2 * n + (groups if structured else 0)
    # l = -r, so log(-l/r) = 0 and P(z != 0) = sigmoid(alpha) = sigmoid(5) at init
    p = torch.sigmoid(torch.tensor(5.0))
    expected = 1.25e-7 * n * p * (p if structured else 1)
    torch.testing.assert_close(core.aux_loss(vit), expected)


def test_hard_concrete_gates_are_stochastic_in_training_and_fixed_in_eval():
    adapter = DiffPruningAdapter(DiffPruning(targets=["x"]), torch.nn.Linear(4, 3), ["weight"])
    alpha = torch.tensor([-6.0, 0.0, 6.0]).repeat(2000, 1)
    adapter.train()
    z = adapter.gate(alpha)
    assert z.min() >= 0 and z.max() <= 1
    assert (z[:, 0] == 0).float().mean() > 0.9 and (z[:, 2] == 1).float().mean() > 0.9
    # At alpha = 0: P(z != 0) = sigmoid(alpha - log(-l/r)) = 1/2, the L0 term's probability,
    # and P(z = 1) = P(logit(u) >= log 5) = 1/6.
    assert abs((z[:, 1] == 0).float().mean() - 0.5) < 0.05
    assert abs((z[:, 1] == 1).float().mean() - 1 / 6) < 0.04
    adapter.eval()
    torch.testing.assert_close(adapter.gate(torch.tensor([0.0, 6.0])), torch.tensor([0.0, 1.0]))


def test_diff_pruning_reaches_the_target_sparsity_and_trains_only_kept_entries(tmp_path):
    vit, fresh = vit_pair()
    core.inject(vit, DiffPruning(targets=LINEARS, density=0.01))
    batches = task_batches()
    train(vit, batches, steps=2, aux=True)
    dense = {p: a.final_deltas() for p, a in adapters(vit).items()}
    n = sum(d.numel() for deltas in dense.values() for d in deltas.values())
    kept = prune(vit)
    assert kept == round(0.01 * n)
    assert core.param_report(vit).trainable == kept
    magnitudes = torch.cat([d.abs().reshape(-1) for ds in dense.values() for d in ds.values()])
    chosen = torch.cat(
        [
            dense[p][t].abs().reshape(-1)[a.indices(t)]
            for p, a in adapters(vit).items()
            for t in a.tuned
        ]
    )
    assert chosen.min() >= magnitudes.topk(kept).values.min()  # magnitude pruning
    cfg = next(iter(adapters(vit).values())).config
    assert sum(cfg.kept.values()) == kept and all(
        isinstance(a, SparseDeltaAdapter) for a in adapters(vit).values()
    )
    before = base_weights(vit)
    train(vit, batches, steps=1)
    changed = changed_positions(vit, before)
    for path, adapter in adapters(vit).items():
        assert set(changed[path].tolist()) <= set(adapter.indices("weight").tolist())
    x = batches[0][0]
    adapted = vit(x)
    core.save_adapter(vit, tmp_path / "diff")
    core.load_adapter(fresh, tmp_path / "diff")
    torch.testing.assert_close(fresh(x), adapted)


def test_diff_pruning_dense_phase_merges_and_prune_refuses_twice():
    vit, _ = vit_pair()
    core.inject(vit, DiffPruning(targets=["fc1"], params=["weight"]))
    with torch.no_grad():
        for a in adapters(vit).values():
            a.diff["weight"].normal_(std=0.1)
    before = base_weights(vit)
    x = torch.randn(2, 3, 32, 32)
    adapted = vit(x)
    core.merge(vit)
    torch.testing.assert_close(vit(x), adapted, atol=1e-5, rtol=1e-5)
    core.unmerge(vit)
    for path, w in before.items():
        torch.testing.assert_close(adapter_base(vit, path).weight, w, atol=1e-6, rtol=0)
    prune(vit, density=0.1)
    with pytest.raises(ValueError, match="already pruned"):
        prune(vit)


def test_sparse_merge_is_refused_before_selection():
    vit = make_vit()
    core.inject(vit, GPS(targets=["fc1"]))
    with pytest.raises(MergeError, match="no entries"):
        core.merge(vit)


# --- the shipped configs --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vision/gps", "vision/spt", "nlp/diff_pruning"])
def test_configs_build_their_method(name):
    import yaml

    from core.lightning import method_from_spec

    with open(f"configs/{name}.yaml") as handle:
        cfg = method_from_spec(yaml.safe_load(handle)["model"]["method"])
    if name == "nlp/diff_pruning":
        from transformers import BertConfig, BertForSequenceClassification

        bert = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
        )
        model = core.inject(BertForSequenceClassification(bert), cfg)
        assert len(adapters(model)) == 21  # 8 per layer, 4 embedding modules, the pooler
        return
    model = core.inject(make_vit(), cfg)
    assert len(adapters(model)) == 8
    if name == "vision/gps":  # k = 2 per neuron of qkv, proj, fc1, fc2
        assert core.param_report(model).trainable == 2 * 2 * (192 + 64 + 256 + 64)
