"""OFT, BOFT and qGOFT: equations, orthogonality, exact merges, counts and HF PEFT parity."""

import copy
import dataclasses
import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn

import core
from conftest import (
    adapters_of,
    make_vit,
    model_cases,
    perturb,
    vit_input,
)
from core.errors import CheckpointError, ConfigError, TargetError
from core.methods.orthogonal import BOFT, OFT, QGOFT, butterfly_perm, givens_pairs
from core.targeting import adapted_modules

VIT_LINEAR = ["qkv", "attn.proj", "fc1", "fc2"]
VIT_ALL = ["qkv", "proj", "fc1", "fc2"]  # "proj" also hits patch_embed.proj, Conv2d(3, 64, 8)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings("ignore")  # PEFT's BOFT warns when CUDA is absent


CASES = model_cases(VIT_LINEAR, LLAMA_TARGETS)


def orthogonality_error(matrix):
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return (matrix.T @ matrix - eye).abs().max().item()


class Net(nn.Module):
    """Every layer kind the family wraps, with odd geometry."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(16, 12)
        self.gpt = Conv1D(10, 16)  # weight stored (in=16, out=10)
        self.c1 = nn.Conv1d(4, 6, 2)
        self.c2 = nn.Conv2d(2, 5, (2, 4), stride=(2, 1), padding=1)

    def forward(self, h, seq, img):
        return self.gpt(self.lin(h)[..., :4].repeat(1, 4)), self.c1(seq), self.c2(img)


def net_inputs():
    return torch.randn(3, 16), torch.randn(2, 4, 7), torch.randn(2, 2, 6, 6)


ALL_NET_LAYERS = ["lin", "gpt", "c1", "c2"]  # d = 16, 16, 8, 16
METHODS = {
    "oft": OFT(block_size=4, targets=ALL_NET_LAYERS),
    "oft_neumann_shared": OFT(r=2, neumann_terms=5, block_share=True, targets=ALL_NET_LAYERS),
    "boft_m2": BOFT(block_size=2, butterfly_factors=2, targets=ALL_NET_LAYERS),
    "boft_m3": BOFT(block_size=2, butterfly_factors=3, targets=ALL_NET_LAYERS),
    "qgoft": QGOFT(targets=ALL_NET_LAYERS),
}


# --- configs -----------------------------------------------------------------------------


def test_configs_construct_from_targets_alone_with_defaults():
    oft, boft, qgoft = OFT(targets=["q"]), BOFT(targets=["q"]), QGOFT(targets=["q"])
    assert (oft.block_size, oft.r, oft.neumann_terms, oft.coft) == (32, None, None, False)
    assert (boft.block_size, boft.block_num, boft.butterfly_factors) == (4, None, 1)
    assert qgoft.relative_angle and qgoft.flexible_norm and qgoft.orthogonality_weight == 1e-3
    assert OFT(r=4, targets=["q"]).block_size is None
    assert OFT.mergeable and BOFT.mergeable and QGOFT.mergeable
    assert {OFT.method, BOFT.method, QGOFT.method} == {"oft", "boft", "qgoft"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OFT(r=4, block_size=8, targets=["q"]), "either r .* or block_size, not both"),
        (lambda: OFT(block_size=1, targets=["q"]), r"block_size must be >= 2"),
        (lambda: OFT(neumann_terms=1, targets=["q"]), r"neumann_terms must be >= 2"),
        (lambda: OFT(eps=0, targets=["q"]), r"eps must lie in \(0.0, inf\]"),
        (lambda: OFT(module_dropout=1.0, targets=["q"]), "module_dropout must lie in"),
        (lambda: OFT(coft="yes", targets=["q"]), "coft must be True or False"),
        (lambda: BOFT(block_size=3, butterfly_factors=2, targets=["q"]), "must be even"),
        (lambda: BOFT(butterfly_factors=0, targets=["q"]), "butterfly_factors must be >= 1"),
        (
            lambda: BOFT(block_num=6, butterfly_factors=3, targets=["q"]),
            r"multiple of 2\^\(butterfly_factors-1\) = 4",
        ),
        (lambda: QGOFT(orthogonality_weight=-1, targets=["q"]), "orthogonality_weight"),
        (lambda: QGOFT(flexible_norm=1, targets=["q"]), "flexible_norm must be True or False"),
    ],
)
def test_bad_configs_are_refused_with_clear_messages(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("cfg", "layer", "message"),
    [
        (OFT(block_size=32, targets=["0"]), nn.Linear(48, 8), r"48 input features .* \(.*24"),
        (OFT(r=5, targets=["0"]), nn.Linear(48, 8), "cannot be split into 5 blocks"),
        (BOFT(block_size=4, butterfly_factors=4, targets=["0"]), nn.Linear(16, 8), "= 32"),
        (BOFT(block_size=4, targets=["0"]), nn.Embedding(10, 8), "BOFT wraps nn.Linear"),
        (OFT(block_size=4, targets=["0"]), nn.Conv2d(4, 4, 3, groups=2), "groups=1"),
        (QGOFT(targets=["0"]), nn.Linear(1, 4), "at least 2"),
    ],
)
def test_layers_that_do_not_fit_are_refused_with_reasons(cfg, layer, message):
    model = nn.Sequential(layer)
    with pytest.raises(TargetError, match=message):
        core.inject(model, cfg)
    assert core.adapter_names(model) == []


# --- equations, counts, identity -----------------------------------------------------------


def cayley_reference(upper, b):
    """(I - S)(I + S)^{-1} from the strictly upper triangle, built independently."""
    skew = torch.zeros(b, b)
    rows, cols = zip(*[(i, j) for i in range(b) for j in range(i + 1, b)], strict=True)
    skew[list(rows), list(cols)] = upper
    skew = skew - skew.T
    eye = torch.eye(b)
    return (eye - skew) @ torch.linalg.inv(eye + skew)


def test_oft_forward_is_the_equation():
    lin = nn.Linear(8, 5)
    model = nn.Sequential(lin)
    core.inject(model, OFT(block_size=4, targets=["0"]))
    perturb(model, std=0.3)
    q = model[0].adapters["default"].Q
    rotation = torch.block_diag(*[cayley_reference(row.detach(), 4) for row in q])
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), x @ rotation @ lin.weight.T + lin.bias)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_start(method):
    net = Net().eval()
    x = net_inputs()
    before = net(*x)
    core.inject(net, copy.deepcopy(METHODS[method]))
    for got, want in zip(net(*x), before, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_parameter_counts_follow_the_formulas():
    tri = lambda b: b * (b - 1) // 2  # noqa: E731
    counts = {}
    for name, cfg in METHODS.items():
        net = Net()
        core.inject(net, copy.deepcopy(cfg))
        counts[name] = {
            p: sum(t.numel() for t in a.parameters()) for p, a in adapters_of(net).items()
        }
    d = {"lin": 16, "gpt": 16, "c1": 8, "c2": 16}  # c1: 4 * 2, c2: 2 * 2 * 4
    out = {"lin": 12, "gpt": 10, "c1": 6, "c2": 5}
    for layer in d:
        assert counts["oft"][layer] == (d[layer] // 4) * tri(4)  # r * b(b-1)/2
        assert counts["oft_neumann_shared"][layer] == tri(d[layer] // 2)  # one shared block
        for m in (2, 3):  # m * (d/b) * b(b-1)/2 + out
            assert counts[f"boft_m{m}"][layer] == m * (d[layer] // 2) * tri(2) + out[layer]
        levels = int(math.log2(d[layer]))  # powers of two: d/2 log2 d angles, as many p, d norms
        assert counts["qgoft"][layer] == 2 * (d[layer] // 2) * levels + d[layer]


def test_qgoft_counts_and_mixes_every_coordinate_when_d_is_not_a_power_of_two():
    d = 12
    model = nn.Sequential(nn.Linear(d, 3))
    core.inject(model, QGOFT(relative_angle=False, flexible_norm=False, targets=["0"]))
    adapter = model[0].adapters["default"]
    # stages: bit 3 first, then bits 0..3, pairing i with i ^ 2^s where both are < 12
    pairs = [(i, i ^ (1 << s)) for s in (3, 0, 1, 2, 3) for i in range(d) if i < i ^ (1 << s) < d]
    assert adapter.theta.numel() == len(pairs) == 4 + 6 + 6 + 4 + 4
    assert givens_pairs(d, 3)[0].tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        adapter.theta.uniform_(0.3, 1.2)
    transform = adapter.matrix()
    assert orthogonality_error(transform) < 1e-5
    assert bool((transform.abs() > 1e-7).all()), "every output must depend on every input"


# --- orthogonality, merge, unmerge ---------------------------------------------------------


def trained(cfg, steps=3):
    """A ViT with ``cfg`` whose adapter was perturbed and then trained a few steps."""
    model = make_vit().train()
    core.inject(model, cfg)
    perturb(model, std=0.2)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = model(vit_input()).pow(2).mean()
        aux = core.aux_loss(model)
        (loss if aux is None else loss + aux).backward()
        optimiser.step()
        optimiser.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        OFT(block_size=8, targets=VIT_ALL),
        OFT(r=4, coft=True, eps=0.5, block_share=True, targets=VIT_ALL),
        BOFT(block_size=4, butterfly_factors=3, targets=VIT_ALL),
        QGOFT(targets=VIT_LINEAR),
    ],
    ids=["oft", "coft_shared", "boft_m3", "qgoft_rotation_part"],
)
def test_learned_transform_stays_orthogonal_after_training(cfg):
    model = trained(cfg)
    for path, adapter in adapters_of(model).items():
        if isinstance(cfg, QGOFT):
            assert orthogonality_error(adapter.matrix()) > 1e-3, path  # quasi part is free
            transform = adapter.matrix(pure=True)
        else:
            transform = adapter.matrix()
        assert orthogonality_error(transform) < 1e-5, path


@pytest.mark.parametrize("cfg", [OFT(block_size=8, targets=VIT_ALL), BOFT(targets=VIT_ALL)])
def test_merged_weights_keep_the_singular_values(cfg):
    model = make_vit()
    layers = (nn.Linear, nn.Conv2d)
    before = {
        p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, layers)
    }
    core.inject(model, cfg)
    perturb(model, key=".Q", std=0.3)  # the rotation only: BOFT's scale stays 1
    core.merge(model)
    for path, wrapper in adapted_modules(model):
        merged, original = wrapper.base_layer.weight.flatten(1), before[path].flatten(1)
        assert not torch.allclose(merged, original, atol=1e-3), path
        torch.testing.assert_close(
            torch.linalg.svdvals(merged), torch.linalg.svdvals(original), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_forward_and_unmerge_restores_the_weights(method):
    net = Net().eval()
    core.inject(net, copy.deepcopy(METHODS[method]))
    perturb(net, std=0.2)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "base_layer" in k}
    x = net_inputs()
    adapted = net(*x)
    core.merge(net)
    for got, want in zip(net(*x), adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    core.unmerge(net)
    for key, value in net.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-5, rtol=0)
    for got, want in zip(net(*x), adapted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_adapters_change_the_output_once_trained():
    for cfg in METHODS.values():
        net = Net().eval()
        x = net_inputs()
        before = net(*x)
        core.inject(net, copy.deepcopy(cfg))
        perturb(net, std=0.2)
        assert not torch.allclose(net(*x)[0], before[0], atol=1e-3), cfg


# --- BOFT structure ------------------------------------------------------------------------


def test_boft_with_one_factor_is_oft_with_the_same_blocks():
    x = torch.randn(2, 3, 32, 32)
    oft, boft = make_vit(), make_vit()
    boft.load_state_dict(oft.state_dict())
    core.inject(oft, OFT(block_size=8, targets=VIT_ALL))
    core.inject(boft, BOFT(block_size=8, targets=VIT_ALL))
    perturb(oft, std=0.2)
    with torch.no_grad():
        for path, adapter in adapters_of(boft).items():
            adapter.Q.copy_(adapters_of(oft)[path].Q[None])
    torch.testing.assert_close(boft(x), oft(x), atol=1e-6, rtol=1e-6)


def dense_butterfly_perm(d, b, factor):
    """BOFT's permutation matrix from its definition: within groups of b * 2^factor, the
    half-blocks of b/2 are listed even ones first, then odd ones. Rows pick coordinates."""
    group, half = b * 2**factor, b // 2
    order = []
    for start in range(0, d, group):
        chunks = [
            list(range(start + c * half, start + (c + 1) * half)) for c in range(2 ** (factor + 1))
        ]
        order += [i for c in chunks[0::2] + chunks[1::2] for i in c]
    matrix = torch.zeros(d, d)
    matrix[torch.arange(d), torch.tensor(order)] = 1.0
    return matrix


def dense_boft_weight(adapter, weight_rows):
    """diag(s) W (B_m ... B_1)^T with dense P_i D_i P_i^T: the reference."""
    d, b = adapter.d, adapter.block_size
    total = torch.eye(d)
    for i, factor in enumerate(adapter.Q.detach()):
        blocks = torch.block_diag(*[cayley_reference(row, b) for row in factor])
        perm = dense_butterfly_perm(d, b, i)
        total = perm @ blocks @ perm.T @ total
    return adapter.scale.detach()[:, None] * (weight_rows @ total.T)


@pytest.mark.parametrize("m", [2, 3])
def test_boft_butterflies_match_a_dense_reference(m):
    net = Net().eval()
    core.inject(net, BOFT(block_size=2, butterfly_factors=m, targets=ALL_NET_LAYERS))
    perturb(net, std=0.3)
    with torch.no_grad():
        for path, adapter in adapters_of(net).items():
            base = dict(net.named_modules())[path].base_layer
            rows = base.weight.T if path == "gpt" else base.weight.flatten(1)
            want = dense_boft_weight(adapter, rows)
            got = adapter.transformed_rows(base)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert orthogonality_error(adapter.matrix()) < 1e-5


@pytest.mark.parametrize(("d", "b", "m"), [(16, 2, 4), (32, 4, 3), (48, 8, 2), (24, 6, 2)])
def test_boft_permutations_equal_peft_block_butterfly_perm(d, b, m):
    from peft.tuners.boft.layer import BOFTLayer

    for i in range(m):
        theirs = BOFTLayer.block_butterfly_perm(None, d, d // b // 2**i, b // 2, m - 1)
        assert torch.equal(butterfly_perm(d, b, i), theirs)
        assert torch.equal(dense_butterfly_perm(d, b, i), BOFTLayer.perm2mat(None, theirs))


# --- qGOFT ---------------------------------------------------------------------------------


def test_qgoft_regulariser_is_the_soft_orthogonality_penalty():
    model = make_vit()
    core.inject(model, QGOFT(orthogonality_weight=0.01, targets=["qkv", "fc2"]))
    assert core.aux_loss(model).item() == 0.0
    perturb(model, std=0.2)
    want = 0.0
    for adapter in adapters_of(model).values():
        for theta, phi in zip(adapter.theta.tolist(), adapter.phi.tolist(), strict=True):
            block = torch.tensor(
                [
                    [math.cos(theta), -math.sin(theta + phi)],
                    [math.sin(theta), math.cos(theta + phi)],
                ]
            )
            want += (block.T @ block - torch.eye(2)).pow(2).sum().item()
        want += (adapter.norm.detach().pow(2) - 1).pow(2).sum().item()
    loss = core.aux_loss(model)
    assert loss.item() == pytest.approx(0.01 * want, rel=1e-4)
    loss.backward()
    grads = [a.phi.grad for a in adapters_of(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_goft_without_relaxations_is_exactly_orthogonal_and_has_no_regulariser():
    model = make_vit()
    core.inject(model, QGOFT(relative_angle=False, flexible_norm=False, targets=VIT_LINEAR))
    perturb(model, std=0.5)
    assert core.aux_loss(model) is None
    for adapter in adapters_of(model).values():
        assert adapter.phi is None and adapter.norm is None
        assert orthogonality_error(adapter.matrix()) < 1e-5


# --- training-time options -----------------------------------------------------------------


def test_module_dropout_acts_in_training_only_and_merges_without_it():
    model = nn.Sequential(nn.Linear(32, 8))
    core.inject(model, OFT(block_size=4, module_dropout=0.5, targets=["0"]))
    perturb(model, std=0.3)
    x = torch.randn(4, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    outs = [model(x) for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_coft_keeps_each_block_inside_its_eps_ball():
    model = nn.Sequential(nn.Linear(16, 4))
    core.inject(model, OFT(block_size=4, coft=True, eps=0.1, targets=["0"]))
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.Q.normal_(std=1.0)
    model(torch.randn(2, 16))
    skew_norms = math.sqrt(2) * adapter.Q.detach().norm(dim=-1)
    assert torch.all(skew_norms <= 0.1 / math.sqrt(4) + 1e-6)


@pytest.mark.parametrize("method", ["oft", "boft_m2", "qgoft"])
def test_half_precision_base_trains_float32_adapter(method):
    model = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16))
    core.inject(model, dataclasses.replace(METHODS[method], targets=["0"]))
    adapter = model[0].adapters["default"]
    out = model(torch.randn(3, 16, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad is not None for p in adapter.parameters())


# --- checkpoints and meta ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    net = Net().eval()
    pristine = copy.deepcopy(net)
    core.inject(net, copy.deepcopy(METHODS[method]))
    perturb(net, std=0.2)
    core.save_adapter(net, tmp_path)
    core.load_adapter(pristine, tmp_path)
    x = net_inputs()
    for got, want in zip(pristine(*x), net(*x), strict=True):
        torch.testing.assert_close(got, want)


def test_meta_device_injection_counts_by_formula():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2))  # 4096 wide
    core.inject(model, OFT(block_size=32, targets=["q_proj"]), name="oft")
    core.inject(model, BOFT(block_size=8, butterfly_factors=4, targets=["v_proj"]), name="boft")
    core.inject(model, QGOFT(targets=["o_proj"]), name="qgoft")
    by = core.param_report(model).by_adapter
    assert by["oft"]["params"] == 2 * (4096 // 32) * (32 * 31 // 2)
    assert by["boft"]["params"] == 2 * (4 * (4096 // 8) * (8 * 7 // 2) + 4096)
    assert by["qgoft"]["params"] == 2 * (2 * 2048 * 12 + 4096)
    assert all(p.is_meta for p in model.parameters())


# --- HF PEFT parity ------------------------------------------------------------------------


def randomise_peft(model, key, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.normal_(mean=1.0 if "boft_s" in name else 0.0, std=std)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neumann", [True, False], ids=["peft_default_neumann", "exact"])
def test_peft_oft_folder_imports_with_identical_outputs(tmp_path, case, neumann):
    build, make_x, run, targets = CASES[case]
    base = build()
    ours = copy.deepcopy(base)
    extra = {"coft": True, "eps": 0.05, "block_share": True} if case == "llama" else {}
    cfg = peft.OFTConfig(
        oft_block_size=8, target_modules=targets, use_cayley_neumann=neumann, **extra
    )
    theirs = peft.get_peft_model(base, cfg)
    randomise_peft(theirs, "oft_R")
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)
    assert core.param_report(ours).by_adapter["default"]["params"] == sum(
        p.numel() for n, p in theirs.named_parameters() if "oft_R" in n
    )


def test_peft_oft_conv_imports_as_the_merged_rotation(tmp_path):
    # PEFT's unmerged OFT Conv2d rotates unfold(x) and folds it back, which sums the
    # overlapping patches (not the identity even at init); its merge computes W R^T, the
    # OFT of the paper, and that is what omnipeft runs.
    base = make_vit()
    ours = copy.deepcopy(base)
    cfg = peft.OFTConfig(oft_block_size=8, target_modules=VIT_ALL, use_cayley_neumann=False)
    theirs = peft.get_peft_model(base, cfg)
    randomise_peft(theirs, "oft_R")
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path)
    x = vit_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.merge_and_unload()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neumann_terms", [None, 5])
def test_oft_exports_to_peft_with_identical_outputs(tmp_path, case, neumann_terms):
    build, make_x, run, targets = CASES[case]
    model = build()
    pristine = copy.deepcopy(model)
    core.inject(model, OFT(r=8, neumann_terms=neumann_terms, targets=targets))
    perturb(model, std=0.02)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, x), run(model, x), atol=1e-5, rtol=1e-5)


def test_oft_export_refuses_what_peft_computes_differently(tmp_path):
    model = make_vit()
    core.inject(model, OFT(block_size=8, targets=VIT_ALL))
    with pytest.raises(CheckpointError, match="unfold/fold"):
        core.interop.save_peft(model, tmp_path)
    net = Net()
    core.inject(net, OFT(block_size=4, targets=["c1"]))
    with pytest.raises(CheckpointError, match="Conv1d adapter cannot be exported"):
        core.interop.save_peft(net, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_peft_boft_folder_imports_with_identical_outputs(tmp_path, case):
    # PEFT on CPU always builds one butterfly factor, so parity is checked at m = 1 here
    # (and at m = 2, 3 below with PEFT's own math once its CUDA-only block_diag is replaced).
    build, make_x, run, targets = CASES[case]
    targets = VIT_ALL if case == "vit" else targets
    base = build()
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.BOFTConfig(boft_block_size=4, target_modules=targets))
    randomise_peft(theirs, "boft_")
    theirs.save_pretrained(tmp_path)
    core.interop.load_peft(ours, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(ours, x), run(theirs, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_boft_exports_to_peft_with_identical_outputs(tmp_path, case):
    build, make_x, run, targets = CASES[case]
    targets = VIT_ALL if case == "vit" else targets
    model = build()
    pristine = copy.deepcopy(model)
    core.inject(model, BOFT(block_num=8, targets=targets))
    perturb(model, std=0.1)
    core.interop.save_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    x = make_x()
    with torch.no_grad():
        torch.testing.assert_close(run(theirs, x), run(model, x), atol=1e-5, rtol=1e-5)


@pytest.fixture
def peft_boft_with_torch_block_diag(monkeypatch):
    """Let PEFT build its m >= 2 BOFT on CPU: its CUDA block_diag, replaced by torch's."""
    import peft.tuners.boft.layer as boft_layer

    class TorchBlockDiag:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", TorchBlockDiag)


@pytest.mark.parametrize("m", [2, 3])
def test_boft_butterflies_match_peft_both_ways(tmp_path, peft_boft_with_torch_block_diag, m):
    base = make_vit()
    ours, pristine = copy.deepcopy(base), copy.deepcopy(base)
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=m, target_modules=VIT_ALL)
    theirs = peft.get_peft_model(base, cfg)
    assert next(p for n, p in theirs.named_parameters() if "boft_R" in n).shape[0] == m
    randomise_peft(theirs, "boft_")
    theirs.save_pretrained(tmp_path / "peft")
    core.interop.load_peft(ours, tmp_path / "peft")
    x = vit_input()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    core.interop.save_peft(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(pristine, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=1e-5, rtol=1e-5)


def test_peft_boft_folder_that_silently_fell_back_to_one_factor_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            make_vit(),
            peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["qkv"]),
        )
    theirs.save_pretrained(tmp_path)  # config says 2 factors, tensors hold 1 (CPU fallback)
    model = make_vit()
    with pytest.raises(CheckpointError, match="silently falls back to 1 factor"):
        core.interop.load_peft(model, tmp_path)
    assert core.adapter_names(model) == []


def test_unsupported_peft_options_are_refused(tmp_path):
    theirs = peft.get_peft_model(
        make_vit(), peft.OFTConfig(oft_block_size=8, target_modules=["qkv"], bias="oft_only")
    )
    theirs.save_pretrained(tmp_path)
    model = make_vit()
    with pytest.raises(CheckpointError, match="bias"):
        core.interop.load_peft(model, tmp_path)
    assert core.adapter_names(model) == []
