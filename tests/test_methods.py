"""Contract tests over every registered method (a new method gets them for free), plus the
specifics of prompts and semantic proxies."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from bench.backbones import create_backbone
from bench.config import CellConfig
from bench.losses import ProxyAnchorLoss
from bench.measure import SavedTensorMeter
from bench.model import EmbeddingModel, MetricLearner
from bench.learner import build_learner
from bench.train import build_optimizers, train_step
from methods import METHODS, MethodError, build_method, method_arguments
from methods.semantic_proxies import SemanticProxyModule

NUM_CLASSES = 4
EMBEDDING = 16
# The tiny test ViT has 3 blocks: depth-type arguments are scaled down to it.
SMALL_ARGS = {"prompt_depth": 3, "class_prompt_depth": 3, "adapter_blocks": 2, "num_prompts": 4, "peft_block_size": 8,
              "num_class_prompts": 2}
CASES = list(METHODS) + ["vptsp_g+bitfit", "adapter+bitfit", "vpt_deep+bitfit"]
# Methods that train (zero_shot is checked in tests/test_fidelity.py: nothing trains, no head).
TRAINED = [c for c in CASES if c != "zero_shot"]


def small_args(name: str) -> dict:
    accepted = method_arguments(name)
    return {k: v for k, v in SMALL_ARGS.items() if k in accepted}


def make_learner(name: str, seed: int = 0, **extra) -> MetricLearner:
    torch.manual_seed(seed)
    config = CellConfig(backbone="vit_test", weights=None, embedding_size=EMBEDDING, method=name,
                        method_args={**small_args(name), **extra})
    return build_learner(config, NUM_CLASSES)


def fixed_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return images, labels


def train_steps(learner: MetricLearner, steps: int, lr: float = 1e-2, proxy_lr: float | None = None,
                batch=None) -> list[float]:
    config = CellConfig(optimizer="adamw", lr=lr, proxy_lr=proxy_lr or lr, weight_decay=0.0)
    optimizers = build_optimizers(learner, config)
    images, labels = batch if batch is not None else fixed_batch()
    losses = []
    learner.train()
    for _ in range(steps):
        losses.append(train_step(learner, images, labels, optimizers).item())
    return losses


@pytest.mark.parametrize("name", CASES)
def test_output_is_l2_normalised_embedding(name):
    learner = make_learner(name).eval()
    images, _ = fixed_batch()
    with torch.no_grad():
        out = learner(images)
    assert out.shape == (8, 48 if name == "zero_shot" else EMBEDDING)  # zero_shot: no head
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8))


@pytest.mark.parametrize("name", TRAINED)
def test_steps_change_exactly_the_trainable_tensors(name):
    learner = make_learner(name)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert {"model.head.1.weight", "criterion.proxies"} <= trainable
    train_steps(learner, steps=3)
    for n, p in learner.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{name}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"
    frozen_backbone = [n for n, p in learner.model.backbone.named_parameters() if not p.requires_grad]
    if name == "full_ft":
        assert frozen_backbone == []
    else:
        assert frozen_backbone, f"{name} froze nothing in the backbone"


@pytest.mark.parametrize("name", TRAINED)
def test_saved_trainable_state_reproduces_embeddings(name):
    learner = make_learner(name)
    train_steps(learner, steps=2)
    blob = save_safetensors({k: v.contiguous() for k, v in learner.trainable_state_dict().items()})
    restored = make_learner(name)  # same pretrained (here: seeded random) backbone
    restored.load_trainable_state_dict(load_safetensors(blob))
    images, _ = fixed_batch(seed=5)
    learner.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(learner(images), restored(images))


@pytest.mark.parametrize("name", CASES)
def test_evaluation_needs_no_labels_and_skips_the_proxy_pass(name):
    learner = make_learner(name).eval()
    calls = []
    original = learner.model.features

    def counting_features(images, prompts="default"):
        calls.append(prompts)
        return original(images, prompts)

    learner.model.features = counting_features
    learner.proxy_source = lambda *a: pytest.fail("proxy pass ran during evaluation")
    images, _ = fixed_batch()
    with torch.no_grad():
        learner(images)
    assert calls == ["default"]


@pytest.mark.parametrize("name", TRAINED)
def test_loss_falls_on_synthetic_data(name, synthetic_batch):
    losses = train_steps(make_learner(name), steps=30, lr=1e-3, proxy_lr=1e-2, batch=synthetic_batch)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, f"{name}: {losses[:3]} ... {losses[-3:]}"


@pytest.fixture(scope="module")
def synthetic_batch(tmp_path_factory):
    from bench.data import ImageDataset, build_transforms, load_dataset, make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "synthetic", num_classes=8, images_per_class=4, image_size=40, seed=0)
    splits = load_dataset("synthetic", root)
    dataset = ImageDataset(splits.train, build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=False))
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    assert int(labels.max()) + 1 == NUM_CLASSES
    return images, labels


# ---- parameter counts (paper Table 1 arithmetic, ViT-S/16 random init, 100 classes, emb 384) ----

@pytest.fixture(scope="module")
def vit_small_counts():
    from bench.measure import parameter_counts

    def count(name, **args):
        torch.manual_seed(0)
        config = CellConfig(backbone="vit_small_patch16_224.augreg_in21k", weights=None, embedding_size=384,
                            method=name, method_args=args)
        return parameter_counts(build_learner(config, 100))

    return count


def test_paper_table1_parameter_arithmetic(vit_small_counts):
    assert vit_small_counts("linear_probe")["params_trainable"] == 187_008
    assert vit_small_counts("vpt_deep", num_prompts=10, prompt_depth=12)["params_trainable"] == 233_088
    adapter = vit_small_counts("adapter", adapter_blocks=7, adapter_width=256)["params_trainable"]
    assert adapter == 1_573_120  # paper: 1.57M
    full = vit_small_counts("full_ft")
    assert full["params_backbone"] == 21_665_664  # timm ViT-S/16, not the paper's 30.2M


# ---- where prompts enter ----

class RecordInput(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.block(x)


def recorded(learner):
    blocks = learner.model.backbone.blocks
    for i in range(len(blocks)):
        blocks[i] = RecordInput(blocks[i])
    images, _ = fixed_batch()
    with torch.no_grad():
        learner.eval()(images)
    return [b.inputs[0] for b in blocks]


def test_shallow_prompts_enter_once_and_stay():
    learner = make_learner("vpt_shallow", num_prompts=5)
    inputs = recorded(learner)
    patches = learner.model.backbone.patch_embed.num_patches
    assert [x.shape[1] for x in inputs] == [1 + 5 + patches] * 3
    prompts = learner.extras["prompts"].tokens[0]
    assert torch.equal(inputs[0][0, 1:6], prompts.detach())
    assert not torch.equal(inputs[1][0, 1:6], prompts.detach())  # carried through block 1, not replaced


def test_deep_prompts_replace_previous_outputs_and_decrease():
    learner = make_learner("vpt_deep", num_prompts=5, prompt_depth=3, prompt_decrease=2)
    inputs = recorded(learner)
    patches = learner.model.backbone.patch_embed.num_patches
    assert [x.shape[1] for x in inputs] == [1 + 5 + patches, 1 + 3 + patches, 1 + 1 + patches]
    tokens = learner.extras["prompts"].tokens
    for i, n in enumerate([5, 3, 1]):
        assert torch.equal(inputs[i][0, 1:1 + n], tokens[i].detach())


def test_deep_prompts_are_dropped_past_the_depth():
    learner = make_learner("vpt_deep", num_prompts=4, prompt_depth=1)
    inputs = recorded(learner)
    patches = learner.model.backbone.patch_embed.num_patches
    assert [x.shape[1] for x in inputs] == [1 + 4 + patches, 1 + patches, 1 + patches]


def test_bad_method_arguments_are_named():
    with pytest.raises(MethodError, match="num_promts.*did you mean 'num_prompts'"):
        build_method("vpt_deep", {"num_promts": 3})
    with pytest.raises(MethodError, match="unknown method 'vpt_dep'"):
        build_method("vpt_dep")
    with pytest.raises(MethodError, match="cannot be used together"):
        build_method("vpt_shallow+vpt_deep")
    with pytest.raises(MethodError, match="prompt_depth=12 but the backbone has 3 blocks"):
        make_learner("vpt_deep", prompt_depth=12)
    with pytest.raises(MethodError, match="proxy_checkpointing must be bool"):
        build_method("vptsp_g", {"proxy_checkpointing": "sometimes"})
    semantic_component = build_method("vptsp_g", {"proxy_checkpointing": "true"}).components[-1]
    assert semantic_component.proxy_checkpointing is True


def one_step(learner: MetricLearner) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, dense gradients by name and bytes saved for backward of one training step."""
    images, labels = fixed_batch()
    learner.train()
    with SavedTensorMeter(exclude=list(learner.parameters())) as meter:
        loss = learner.training_loss(images, labels)
    loss.backward()
    grads = {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
             for name, p in learner.named_parameters() if p.grad is not None}
    return loss.item(), grads, meter.bytes


@pytest.mark.parametrize("option", ["proxy_checkpointing", "grad_checkpointing"])
def test_checkpointing_trades_activation_memory_not_gradients(option):
    plain_loss, plain_grads, plain_bytes = one_step(make_learner("vptsp_g+bitfit"))
    learner = make_learner("vptsp_g+bitfit", **({"proxy_checkpointing": True} if option == "proxy_checkpointing" else {}))
    learner.model.grad_checkpointing = option == "grad_checkpointing"
    loss, grads, saved = one_step(learner)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # the proxy pass keeps about as much as the sample pass: dropping it saves ~40 %
    assert saved < (0.7 if option == "proxy_checkpointing" else 0.4) * plain_bytes


def test_saved_tensor_meter_counts_each_storage_once_and_skips_excluded():
    weight = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    with SavedTensorMeter(exclude=[weight]) as meter:
        y = torch.exp(x @ weight)  # mm saves x and weight; exp saves its 3x7 output
        z = y[:, :2] * y[:, 2:4]  # two views of y's storage saved: counted once with y
    assert meter.bytes == (3 * 5 + 3 * 7) * 4
    z.sum().backward()
    assert x.grad is not None


def test_compiled_blocks_train_like_eager_ones_under_the_same_names():
    eager, compiled = make_learner("vptsp_g+bitfit"), make_learner("vptsp_g+bitfit")
    compiled.model.compile_blocks()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    eager_loss, eager_grads, _ = one_step(eager)
    loss, grads, _ = one_step(compiled)  # both sequence lengths: sample pass and proxy pass
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for name, grad in grads.items():  # fused kernels reorder float sums
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-4, msg=name)


# ---- semantic proxies ----

def semantic(learner) -> SemanticProxyModule:
    return learner.extras["semantic_proxies"]


def test_ema_update_equals_spec():
    learner = make_learner("vptsp_e", ema_keep=0.8, proxy_bias_ratio=0.3)
    module = semantic(learner)
    memory_before = module.memory.clone()
    images, labels = fixed_batch()
    vectors = module.semantic_vectors(learner, images, labels).detach()
    module.semantic_vectors = lambda *a: vectors  # same vectors as the forward will see
    proxies = module(learner, images, labels)
    expected = memory_before.clone()
    for c in range(NUM_CLASSES):
        expected[c] = F.normalize(0.8 * memory_before[c] + 0.2 * vectors[labels == c].mean(0), dim=0)
    torch.testing.assert_close(module.memory, expected)
    bias = learner.criterion.proxies.detach()
    torch.testing.assert_close(proxies.detach(), 0.3 * bias + 0.7 * expected)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gru_update_equals_spec_in_batch_order(activation):
    learner = make_learner("vptsp_g", accumulator=f"gru_{activation}", proxy_bias_ratio=0.5)
    module = semantic(learner)
    act = torch.relu if activation == "relu" else torch.tanh
    # classes interleaved and of uneven counts: order within a class is batch order
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    vectors = F.normalize(torch.randn(6, EMBEDDING), dim=1)
    memory_before = module.memory.clone()
    classes, rows = module.accumulate(vectors, labels)
    gru = module.gru
    wi, wh, b = gru.weight_input.detach(), gru.weight_hidden.detach(), gru.bias.detach()
    for c, row in zip(classes.tolist(), rows):
        h = memory_before[c]
        for v in vectors[labels == c]:
            z = torch.sigmoid(v @ wi[0] + h @ wh[0] + b[0])
            r = torch.sigmoid(v @ wi[1] + h @ wh[1] + b[1])
            n = act(v @ wi[2] + r * (h @ wh[2]) + b[2])
            h = (1 - z) * n + z * h
        torch.testing.assert_close(row.detach(), F.normalize(h, dim=0))  # memory stays on the sphere


def test_memory_is_detached_and_gradients_reach_prompts_head_and_gru():
    learner = make_learner("vptsp_g")
    module = semantic(learner)
    images = fixed_batch()[0][:4]
    labels = torch.tensor([1, 1, 3, 3])  # classes 0 and 2 absent
    loss = learner.training_loss(images, labels)
    assert module.memory.grad_fn is None and not module.memory.requires_grad
    loss.backward()
    prompt_grad = module.class_prompts.table.weight.grad.to_dense()
    assert prompt_grad[[1, 3]].abs().sum() > 0
    assert prompt_grad[[0, 2]].abs().sum() == 0
    for p in list(module.head.parameters()) + list(module.gru.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_absent_classes_keep_their_memory_and_mix_by_ratio():
    learner = make_learner("vptsp_g", proxy_bias_ratio=0.25)
    module = semantic(learner)
    before = module.memory.clone()
    images = fixed_batch()[0][:4]
    proxies = module(learner, images, torch.tensor([1, 1, 3, 3]))
    bias = learner.criterion.proxies.detach()
    for c in (0, 2):
        torch.testing.assert_close(module.memory[c], before[c])
        torch.testing.assert_close(proxies[c].detach(), 0.25 * bias[c] + 0.75 * before[c])
    for c in (1, 3):
        assert not torch.equal(module.memory[c], before[c])
        torch.testing.assert_close(proxies[c].detach(), 0.25 * bias[c] + 0.75 * module.memory[c])


def test_offloaded_class_prompt_table_is_sparse_and_stays_on_cpu():
    from bench.optim import SparseAdamW

    learner = make_learner("vptsp_g", class_prompt_offload="cpu")
    table = semantic(learner).class_prompts.table
    assert table.sparse and not semantic(make_learner("vptsp_g")).class_prompts.table.sparse
    optimizers = build_optimizers(learner, CellConfig(optimizer="adamw"))
    assert any(isinstance(o, SparseAdamW) for o in optimizers)
    learner.to("meta")  # any device move: the offloaded table must not follow
    assert table.weight.device.type == "cpu"


def test_describe_counts_without_downloading():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "run_suite.py"), "describe", "--method", "linear_probe",
                           "vpt_deep", "adapter", "ssf", "fact_tt", "gate_vpt", "peft:dora",
                           "--method-arg", "adapter_blocks=7", "--method-arg",
                           "adapter_width=256", "--json"], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(proc.stdout)}
    assert rows["linear_probe"]["params_trainable"] == 187_008
    assert rows["vpt_deep"]["params_trainable"] == 233_088
    assert rows["adapter"]["params_trainable"] == 1_573_120
    assert rows["adapter"]["params_trainable_no_head"] == 1_386_112
    # the wider table's, by their closed forms (test_new_methods_count_their_closed_forms, and peft's own
    # count for peft:dora in test_peft_method_counts_agree_with_peft_and_describe_lists_them)
    assert [rows[m]["params_trainable_no_head"] for m in ("ssf", "fact_tt", "gate_vpt", "peft:dora")] == \
        [102_144, 46_080, 46_092, 239_616]


# ---- the wider table: closed forms of the new methods (ViT-S/16, 100 classes, emb 384) ----

def test_new_methods_count_their_closed_forms(vit_small_counts):
    width, blocks = 384, 12
    layer_norms = 2 * blocks + 1  # norm1, norm2 per block, the final norm
    assert vit_small_counts("ln_tuning")["params_trainable_no_head"] == 2 * width * layer_norms  # 19,200
    per_block = (3 * width + width + 4 * width + width) + 2 * width  # after qkv, proj, fc1, fc2; norm1, norm2
    assert vit_small_counts("ssf")["params_trainable_no_head"] == 2 * (blocks * per_block + width)  # 102,144
    rank = 16
    slices = blocks * (3 + 4 + 4)  # qkv, fc1, fc2 as width x width slices
    assert vit_small_counts("fact_tt", fact_rank=rank)["params_trainable_no_head"] == \
        2 * width * rank + slices * rank * rank  # 46,080


def test_ssf_starts_as_the_identity_up_to_its_init_noise():
    from methods.ssf import ScaleShift

    learner = make_learner("ssf")
    wrapped = [m for m in learner.model.backbone.modules() if isinstance(m, ScaleShift)]
    gamma = torch.cat([m.gamma.detach() for m in wrapped])
    beta = torch.cat([m.beta.detach() for m in wrapped])
    assert abs(gamma.mean().item() - 1) < 0.01 and 0.012 < gamma.std().item() < 0.03
    assert abs(beta.mean().item()) < 0.01 and 0.012 < beta.std().item() < 0.03
    x = torch.randn(5, wrapped[0].base.in_features if hasattr(wrapped[0].base, "in_features") else 48)
    with torch.no_grad():
        wrapped[0].gamma.fill_(1.0)
        wrapped[0].beta.zero_()
        assert torch.equal(wrapped[0](x), wrapped[0].base(x))  # gamma 1, beta 0: exactly the base layer


def test_ln_tuning_trains_exactly_the_layer_norms():
    learner = make_learner("ln_tuning")
    backbone = learner.model.backbone
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    norms = {f"{m}.{p}" for m, module in backbone.named_modules() if isinstance(module, nn.LayerNorm)
             for p in ("weight", "bias")}
    assert trained == norms


def test_fact_shares_u_and_v_across_blocks_and_starts_at_the_pretrained_model():
    from methods.fact import FactLinear

    learner = make_learner("fact_tt", fact_rank=4)
    layers = [m for m in learner.model.backbone.modules() if isinstance(m, FactLinear)]
    assert len(layers) == 3 * len(learner.model.backbone.blocks)
    assert len({id(m.factors) for m in layers}) == 1  # one U, one V for every block
    names = [n for n, p in learner.named_parameters() if p.requires_grad and ".factors." not in n]
    assert [n for n in names if n.startswith("extras.fact.")] == ["extras.fact.u", "extras.fact.v", "extras.fact.cores"]
    assert all(torch.count_nonzero(m.delta_weight()) == 0 for m in layers)  # zero cores: no update yet
    train_steps(learner, 2)
    assert all(torch.count_nonzero(m.delta_weight()) > 0 for m in layers)


@pytest.mark.parametrize("name", TRAINED)
def test_export_round_trip_gives_the_same_embeddings(name):
    """What export does: merge what merges, keep what only training needs out, rebuild the
    exported method's structure and load the state: the same embeddings (1e-5)."""
    from bench.learner import merged_for_export
    from bench.reuse import training_only

    learner = make_learner(name)
    train_steps(learner, 2)
    images, _ = fixed_batch()
    learner.eval()
    with torch.no_grad():
        before = learner(images)
    args = small_args(name)
    exported, exported_args = merged_for_export(learner, name, args)
    state = {k: v for k, v in learner.state_dict().items() if not k.startswith(training_only(learner))}
    torch.manual_seed(1)
    config = CellConfig(backbone="vit_test", weights=None, embedding_size=EMBEDDING, method=exported,
                        method_args=exported_args)
    rebuilt = build_learner(config, NUM_CLASSES)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith(training_only(rebuilt))]
    with torch.no_grad():
        after = rebuilt.eval()(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    if name in ("lora", "ssf", "fact_tt"):
        assert exported == "linear_probe"  # merged into the backbone: the plain architecture


# ---- Hugging Face peft methods --------------------------------------------------------------

def _peft_layers(learner):
    from methods.peft_methods import tuner_layers

    return [layer for _, _, layer in tuner_layers(learner.model.backbone)]


def test_dora_at_init_equals_the_base_model():
    learner = make_learner("peft:dora")
    layers = _peft_layers(learner)
    assert layers
    x = torch.randn(4, 7, 48)
    with torch.no_grad():
        for layer in layers:
            torch.testing.assert_close(layer(x), layer.get_base_layer()(x), atol=1e-6, rtol=1e-6)


def test_vera_frozen_matrices_are_shared_and_reproducible_from_their_seed():
    first, second = make_learner("peft:vera", seed=0), make_learner("peft:vera", seed=5)
    layers = _peft_layers(first)
    assert len({id(layer.vera_A) for layer in layers}) == 1  # one shared A (and B) for every layer
    shared = dict(layers[0].vera_A["default"].named_buffers()) if hasattr(layers[0].vera_A["default"], "named_buffers") \
        else {"A": layers[0].vera_A["default"]}
    assert all(not t.requires_grad for t in shared.values())
    # another seed of the run, the same projection_prng_key: the same frozen matrices
    torch.testing.assert_close(layers[0].vera_A["default"], _peft_layers(second)[0].vera_A["default"])
    torch.testing.assert_close(layers[0].vera_B["default"], _peft_layers(second)[0].vera_B["default"])
    assert {n for n, p in first.named_parameters() if p.requires_grad and "vera" in n} <= \
        {n for n, _ in first.named_parameters() if "vera_lambda" in n}  # only the scaling vectors train


def test_our_lora_equals_peft_lora_on_identical_weights():
    """The hand-written LoRA (kept: recorded results and exports name its tensors) and peft's
    LoRA, on the same backbone, head, proxies and update: the same outputs and gradients (1e-6)."""
    ours = make_learner("lora", lora_rank=2, lora_alpha=4.0)
    theirs = make_learner("peft:lora", peft_rank=2, peft_alpha=4.0, peft_targets="qkv,proj")
    mapped = {}
    for key, value in ours.state_dict().items():
        key = key.replace(".base.", ".base_layer.").replace(".lora_a", ".lora_A.default.weight") \
            .replace(".lora_b", ".lora_B.default.weight")
        mapped[key] = value
    torch.manual_seed(3)
    for name, p in ours.named_parameters():
        if name.endswith("lora_b"):  # a trained update, not the zero init
            with torch.no_grad():
                p.normal_(0, 0.1)
            mapped[name.replace(".lora_b", ".lora_B.default.weight")] = p.detach().clone()
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected
    images, labels = fixed_batch()
    losses = []
    for learner in (ours, theirs):
        learner.train()
        loss = learner.training_loss(images, labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    grads_ours = {n.replace(".base.", ".base_layer.").replace(".lora_a", ".lora_A.default.weight")
                  .replace(".lora_b", ".lora_B.default.weight"): p.grad for n, p in ours.named_parameters()
                  if p.grad is not None}
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert set(grads_ours) == set(grads_theirs)
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grad, grads_theirs[name], atol=1e-6, rtol=1e-5)


def test_peft_method_counts_agree_with_peft_and_describe_lists_them():
    """ViT-S/16: the trainable backbone parameters of each peft method (what describe reports
    beside head and proxies) equal peft's own count of a PeftModel of that backbone."""
    import copy

    import peft

    from bench.backbones import create_backbone
    from bench.measure import parameter_counts
    from methods import METHODS
    from methods.peft_methods import peft_config
    from methods.registry import resolve_arguments

    base = create_backbone("vit_small_patch16_224.augreg_in21k", weights=None)
    for name in [m for m in METHODS if m.startswith("peft:")]:
        torch.manual_seed(0)
        config = CellConfig(backbone="vit_small_patch16_224.augreg_in21k", weights=None, embedding_size=384,
                            method=name)
        ours = parameter_counts(build_learner(config, 100, backbone=copy.deepcopy(base)))["params_trainable_no_head"]
        (_, values), = resolve_arguments(name)
        model = copy.deepcopy(base)
        wrapped = peft.get_peft_model(model, peft_config(values))
        theirs, _ = wrapped.get_nb_trainable_parameters()
        assert ours == theirs > 0, name


def test_gate_vpt_counts_its_gates_and_with_open_gates_is_vpt_deep(vit_small_counts):
    assert vit_small_counts("gate_vpt", num_prompts=10, prompt_depth=12)["params_trainable_no_head"] == \
        10 * 12 * 384 + 12  # VPT-deep's prompts and one gate per block: 46,092
    gated = make_learner("gate_vpt")
    deep = make_learner("vpt_deep")
    state = {k: v for k, v in gated.state_dict().items() if "gate_logits" not in k}
    assert not deep.load_state_dict(state, strict=False).missing_keys
    images, _ = fixed_batch()
    with torch.no_grad():
        gated.extras["prompts"].gate_logits.fill_(60.0)  # sigmoid = 1: each block's own prompts only
        torch.testing.assert_close(gated.eval()(images), deep.eval()(images), atol=1e-6, rtol=1e-6)
        gated.extras["prompts"].gate_logits.fill_(0.0)  # half of the previous block's prompt outputs
        assert not torch.allclose(gated(images), deep(images), atol=1e-4)
