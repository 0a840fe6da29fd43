"""The paper suites train what the released code trains (README, "Differences from the released
code"): one test per difference, checked against formulas and hand-written references, never
against a copy of that code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import CellConfig
from bench.learner import build_learner
from bench.optim import LazySGD, SparseAdamW
from bench.suite import SUITES_DIR, load_suite
from bench.train import build_optimizers

PAPER_SUITES = ("table1", "table2", "ablation_accumulator", "ablation_alpha", "ablation_prompts", "latency")


def learner_for(method: str, init: str = "vpt", num_classes: int = 4, embedding: int = 16, **args):
    torch.manual_seed(0)
    config = CellConfig(backbone="vit_test", weights=None, embedding_size=embedding, method=method,
                        method_args=args, init=init)
    return build_learner(config, num_classes)


# --- 1. the adapter reads the residual stream ------------------------------------------------

def test_adapter_block_is_adaptformer_on_the_residual_stream():
    plain = learner_for("linear_probe").model.backbone
    adapted = learner_for("adapter", adapter_blocks=1, adapter_width=8, adapter_scale=0.3).model.backbone
    block = adapted.blocks[-1]
    with torch.no_grad():  # a non-zero adapter, so that its input matters
        for p in block.adapter.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 17, 48)
    reference = plain.blocks[-1]  # the same pretrained weights (same seed), untouched
    with torch.no_grad():
        h = x + reference.attn(reference.norm1(x))
        bottleneck = block.adapter.up(torch.relu(block.adapter.down(h)))
        expected = h + reference.mlp(reference.norm2(h)) + 0.3 * F.layer_norm(
            bottleneck, (48,), block.adapter.norm.weight, block.adapter.norm.bias, block.adapter.norm.eps)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_adapter_keeps_the_pretrained_block_and_its_parameter_names():
    names = dict(learner_for("adapter", adapter_blocks=2).model.backbone.named_parameters())
    plain = dict(learner_for("linear_probe").model.backbone.named_parameters())
    assert set(plain) <= set(names)  # timm's names: blocks.2.attn.qkv.bias, ...
    for name, p in plain.items():
        assert torch.equal(p, names[name]), name  # qkv bias and the rest kept exactly
    assert {n for n in names if n not in plain} == {
        f"blocks.{i}.adapter.{part}" for i in (1, 2)
        for part in ("down.weight", "down.bias", "up.weight", "up.bias", "norm.weight", "norm.bias")}


def test_adapted_model_starts_at_the_pretrained_one():
    images = torch.randn(2, 3, 32, 32)
    plain, adapted = learner_for("linear_probe").eval(), learner_for("adapter", adapter_blocks=3).eval()
    adapted.model.head.load_state_dict(plain.model.head.state_dict())
    torch.testing.assert_close(adapted.model(images), plain.model(images))


# --- 3 and 4. the paper suites resolve to the reference's loss and initialisation -------------

@pytest.mark.parametrize("suite", PAPER_SUITES)
def test_paper_suites_use_the_reference_averaging_and_init(suite):
    cells = load_suite(SUITES_DIR / f"{suite}.yaml", check_methods=False).cells()
    assert {c.config.loss_positive_average for c in cells} == {"all"}
    assert {c.config.init for c in cells} == {"reference"}


def test_library_defaults_stay_the_formula_and_vpt_init():
    config = CellConfig()
    assert config.loss_positive_average == "positive" and config.init == "vpt"


def test_reference_init_matches_the_released_code_distributions():
    num_classes, width, embedding = 100, 48, 16
    learner = learner_for("vptsp_g", "reference", num_classes, embedding, num_prompts=10, prompt_depth=3,
                          prompt_decrease=3, num_class_prompts=3, class_prompt_depth=3)
    prompts = learner.extras["prompts"].tokens
    assert [p.shape[0] for p in prompts] == [10, 7, 4]
    values = torch.cat([p.detach().flatten() for p in prompts])
    # xavier_normal_ on [1, N, W]: std sqrt(2 / ((1 + N) W)), the full N even in shorter blocks
    assert values.std().item() == pytest.approx(math.sqrt(2 / (11 * width)), rel=0.06)
    assert prompts[2].std().item() == pytest.approx(math.sqrt(2 / (11 * width)), rel=0.15)
    table = learner.extras["semantic_proxies"].class_prompts.table.weight.detach()
    # [C, m, W] per block: std sqrt(2 / ((C + m) W)) = 0.0201 for 100 classes, m = 3, W = 48
    assert table.std().item() == pytest.approx(math.sqrt(2 / (103 * width)), rel=0.03)
    for head in (learner.model.head[1], learner.extras["semantic_proxies"].head[1]):
        bound = math.sqrt(6 / (head.in_features + head.out_features))  # Xavier-uniform
        assert head.weight.abs().max().item() <= bound
        assert head.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(head.bias) == 0
    memory = learner.extras["semantic_proxies"].memory
    torch.testing.assert_close(memory.norm(dim=1), torch.ones(num_classes))


def test_reference_init_of_ordinary_proxies_is_xavier_over_8():
    num_classes, embedding = 200, 64
    proxies = learner_for("vpt_deep", "reference", num_classes, embedding, prompt_depth=3).criterion.proxies
    bound = math.sqrt(6 / (num_classes + embedding)) / 8
    assert proxies.abs().max().item() <= bound
    assert proxies.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    kaiming = learner_for("vpt_deep", "vpt", num_classes, embedding, prompt_depth=3).criterion.proxies
    assert kaiming.std().item() == pytest.approx(math.sqrt(2 / num_classes), rel=0.05)  # fan out = C


def test_vpt_init_is_the_uniform_vpt_bound():
    prompts = learner_for("vpt_deep", "vpt", prompt_depth=3).extras["prompts"].tokens
    bound = math.sqrt(6 / (3 * 8 * 8 + 48))  # vit_test: patch 8, width 48
    values = torch.cat([p.detach().flatten() for p in prompts])
    assert values.abs().max().item() <= bound
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


# --- 5. class-prompt optimisers: dense on the device, the memory bank's lazy rows offloaded ---

def test_table_on_the_device_is_dense_and_trained_by_dense_adamw_with_decay():
    learner = learner_for("vptsp_g", num_classes=6, prompt_depth=3, class_prompt_depth=3,
                          class_prompt_offload="device")
    table = learner.extras["semantic_proxies"].class_prompts.table
    optimizers = build_optimizers(learner, CellConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert not table.sparse and len(optimizers) == 1
    group = next(g for g in optimizers[0].param_groups if any(p is table.weight for p in g["params"]))
    assert group["weight_decay"] == 0.05 and group["lr"] == 1e-3
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    before = table.weight.detach().clone()
    for _ in range(2):
        loss = learner.training_loss(images, labels)
        optimizers[0].zero_grad()
        loss.backward()
        optimizers[0].step()
    moved = (table.weight.detach() - before).abs().sum(dim=1) > 0
    assert moved.all()  # absent classes move too: decoupled decay, as dense AdamW does


def test_offloaded_table_uses_the_sparse_optimisers_with_decay():
    learner = learner_for("vptsp_g", num_classes=6, prompt_depth=3, class_prompt_depth=3,
                          class_prompt_offload="cpu")
    table = learner.extras["semantic_proxies"].class_prompts.table
    assert table.sparse
    adamw = build_optimizers(learner, CellConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(adamw[1], SparseAdamW) and adamw[1].param_groups[0]["weight_decay"] == 0.05
    sgd = build_optimizers(learner, CellConfig(optimizer="sgd", lr=1e-3, weight_decay=0.05, momentum=0.9))
    assert isinstance(sgd[1], LazySGD) and sgd[1].param_groups[0]["momentum"] == 0.9
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    before = table.weight.detach().clone()
    loss = learner.training_loss(images, labels)
    loss.backward()
    adamw[1].step()
    moved = (table.weight.detach() - before).abs().sum(dim=1) > 0
    assert moved.tolist() == [True, True, False, False, False, False]


def memory_bank_steps(optimizer_class, batches, table, **hyper):
    """The reference's memory bank: gather the batch's rows and their optimiser state into a
    dense buffer, step the dense PyTorch optimiser on it, write rows and state back."""
    state_keys = ("exp_avg", "exp_avg_sq") if optimizer_class is torch.optim.AdamW else ("momentum_buffer",)
    bank = {k: torch.zeros_like(table) for k in state_keys}
    step = torch.zeros(())
    for rows, grad in batches:
        buffer = nn.Parameter(table[rows].clone())
        optimizer = optimizer_class([buffer], **hyper)
        if step > 0:
            optimizer.state[buffer] = {k: bank[k][rows].clone() for k in state_keys}
            if optimizer_class is torch.optim.AdamW:
                optimizer.state[buffer]["step"] = step.clone()
        buffer.grad = grad
        optimizer.step()
        state = optimizer.state[buffer]
        for k in state_keys:
            bank[k][rows] = state[k]
        step = state["step"].clone() if "step" in state else step + 1
        table[rows] = buffer.detach()
    return table


def sparse_steps(optimizer, batches, parameter):
    for rows, grad in batches:
        parameter.grad = torch.sparse_coo_tensor(rows[None], grad, parameter.shape, check_invariants=True)
        optimizer.step()
    return parameter.detach()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_sparse_optimisers_equal_the_reference_memory_bank(kind):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, 6, generator=g)
    batches = [(torch.tensor(rows), torch.randn(len(rows), 6, generator=g))
               for rows in ([0, 3, 4], [3, 5, 9], [0, 1, 2], [4, 9, 8], [3, 0, 7])]
    if kind == "adamw":
        hyper = dict(lr=1e-2, weight_decay=0.1)
        expected = memory_bank_steps(torch.optim.AdamW, batches, table.clone(), **hyper)
        parameter = nn.Parameter(table.clone())
        ours = sparse_steps(SparseAdamW([parameter], **hyper), batches, parameter)
    else:
        hyper = dict(lr=1e-2, weight_decay=0.1, momentum=0.9)
        expected = memory_bank_steps(torch.optim.SGD, batches, table.clone(), **hyper)
        parameter = nn.Parameter(table.clone())
        ours = sparse_steps(LazySGD([parameter], **hyper), batches, parameter)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_sparse_adamw_without_decay_is_torch_sparse_adam():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(8, 4, generator=g)
    batches = [(torch.tensor(rows), torch.randn(len(rows), 4, generator=g)) for rows in ([0, 1], [1, 5], [7, 0])]
    a, b = nn.Parameter(table.clone()), nn.Parameter(table.clone())
    ours = sparse_steps(SparseAdamW([a], lr=1e-2, weight_decay=0.0), batches, a)
    torch_sparse = sparse_steps(torch.optim.SparseAdam([b], lr=1e-2), batches, b)
    torch.testing.assert_close(ours, torch_sparse, rtol=1e-6, atol=1e-7)


def test_sparse_optimiser_state_survives_a_checkpoint():
    parameter = nn.Parameter(torch.randn(5, 3))
    optimizer = SparseAdamW([parameter], lr=1e-2, weight_decay=0.1)
    sparse_steps(optimizer, [(torch.tensor([1, 2]), torch.ones(2, 3))], parameter)
    restored = SparseAdamW([nn.Parameter(parameter.detach().clone())], lr=1e-2, weight_decay=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state_dict()["state"][0]["step"] == 1


# --- 6. zero-shot ---------------------------------------------------------------------------

def test_zero_shot_is_the_backbone_cls_feature_and_trains_nothing():
    learner = learner_for("zero_shot").eval()
    assert not [n for n, p in learner.named_parameters() if p.requires_grad]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(learner.model.backbone.forward_features(images)[:, 0], dim=-1)
        torch.testing.assert_close(learner.model(images), expected)
    assert CellConfig(method="zero_shot", epochs=15).epochs == 0


def test_zero_shot_comes_first_in_table1_and_in_the_reporter_order():
    from report import names

    cells = load_suite(SUITES_DIR / "table1.yaml", check_methods=False).cells()
    assert cells[0].key["method"] == "zero_shot"
    ranked = sorted(["vptsp_g+bitfit", "full_ft", "zero_shot", "linear_probe"], key=names.method_rank)
    assert ranked[0] == "zero_shot"


def test_zero_shot_combines_with_nothing():
    from methods import MethodError, build_method

    with pytest.raises(MethodError, match="combines with nothing"):
        build_method("zero_shot+bitfit")


# --- 7. plain timm names ---------------------------------------------------------------------

def test_a_suite_accepts_an_untagged_timm_name_and_a_run_records_the_resolved_tag(tmp_path):
    from bench.backbones import resolve_name

    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\ngrid:\n  backbone: [vit_small_patch16_224]\n  method: [linear_probe]\n"
                    "  seed: [0]\ndefaults: {dataset: cub200}\n")
    (cell,) = load_suite(path).cells()
    assert cell.config.backbone == "vit_small_patch16_224"
    assert resolve_name(cell.config.backbone) == "vit_small_patch16_224.augreg_in21k_ft_in1k"
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("vit_small_patch16_224]", "vit_small_patch16_224.nosuchtag]"))
    with pytest.raises(Exception, match=r"grid\.backbone\[0\].*no pretrained tag 'nosuchtag'.*augreg_in21k"):
        load_suite(bad)


def test_result_records_the_resolved_backbone(synthetic_root, tmp_path):
    from bench.runner import run_cell

    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), backbone="vit_test", weights=None,
                        method="zero_shot", num_workers=0, batch_size=8, embedding_size=16)
    result = run_cell(config, tmp_path / "cell", key={"method": "zero_shot"})
    assert result["status"] == "ok", result["reason"]
    assert result["model"]["backbone"] == "vit_test" and result["model"]["embedding_size"] == 48
    assert result["epochs"][0]["epoch"] == 0 and result["final"]["epoch"] == 0
