"""What a GPU pays for, counted on the CPU (benchmarks/cost.py): the counters themselves, and
the targets of a training step's ratio that hold (unmet ones as strict expected failures, so a
fix shows up as an unexpected pass)."""

import functools
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost import Cost, case_costs, cost, second_call_cost  # noqa: E402


def test_the_counters_count_operations_flops_and_syncs():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert cost(lambda: a @ b) == Cost(operations=1, flops=2 * 8 * 16 * 4, syncs=0)
    assert cost(lambda: (a.sum() > 0).item()).syncs == 1
    assert cost(lambda: float(a.sum())).syncs == 1
    # a grouped convolution's backward: grad_input and grad_weight each cost the forward's FLOPs
    conv = nn.Conv2d(8, 8, 3, groups=8)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    forward = 2 * 2 * conv.weight.numel() * 8 * 8  # 2 N prod(w) prod(output spatial)
    out = conv(x)
    assert cost(lambda: torch.autograd.grad(out.sum(), [x, conv.weight])).flops == 2 * forward


def test_the_cpus_fused_attention_is_counted_as_the_math_it_replaces():
    # the counter has no formula for the CPU's flash attention: a training step's attention
    # counted as 0 FLOPs (the transformer's grad reg looked 3.04x a step's FLOPs; 2.63x counted)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    costs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            out = nn.functional.scaled_dot_product_attention(q, k, v)
            costs[backend] = (cost(lambda: nn.functional.scaled_dot_product_attention(q, k, v)).flops,
                              cost(lambda: torch.autograd.grad(out.sum(), [q, k, v], retain_graph=True)).flops)
    product = 2 * 2 * 4 * 16 * 16 * 8  # 2 b h T^2 d
    assert costs[SDPBackend.MATH] == (2 * product, 4 * product)  # q k^T, (softmax) v; their gradients
    # the fused backward recomputes q k^T (the GPU's kernels alike)
    assert costs[SDPBackend.FLASH_ATTENTION] == (2 * product, 5 * product)


def test_a_label_noise_step_syncs_nothing_and_adds_a_handful_of_operations():
    costs = case_costs("mlp_b8", torch.device("cpu"), methods=("train_step", "label_noise_step"))
    step, noisy = costs["train_step"], costs["label_noise_step"]
    assert noisy.syncs == 0 == step.syncs
    assert noisy.flops == step.flops
    # the check (3 ops and an async assert); the draw from all 64 bits of the key (two seeded
    # integer draws, the second's block selected, their XOR); gaussian by inverse CDF (to float64,
    # scale and shift into (-1, 1), erfinv, scale, to the targets' dtype); the add
    assert noisy.operations - step.operations <= 4 + 4 + 6 + 1


def ratios(case, build_and_shape=None, autocast=None):
    costs = case_costs(case, torch.device("cpu"), methods=("train_step", "reg", "reg_grad"),
                       build_and_shape=build_and_shape, autocast=autocast)
    step = costs["train_step"]
    return {m: (c.operations / step.operations, c.flops / step.flops, c.syncs) for m, c in costs.items()}


def small_resnet18():
    from probe import CASES

    return CASES["resnet18"][1], (8, 3, 32, 32)


@functools.lru_cache(maxsize=None)
def case_ratios(case, autocast=None):
    """The ratios of the test-sized cases (the benchmark's transformer, CNN and ResNet-18 on
    fewer samples: the engines' choices follow the layers' shapes, not the batch), once per case
    for the tests below."""
    build = {"transformer": small_transformer, "cnn": small_cnn, "resnet18": small_resnet18}.get(case)
    return ratios(case, build() if build else None, autocast)


def small_transformer():
    from probe import PooledTransformer

    return lambda: PooledTransformer(32, 1), (8, 16, 32)


def small_cnn():
    from probe import CASES

    return CASES["cnn"][1], (16, 3, 32, 32)


# k outputs per sample: J_i has k rows, each a backward through the activations (the 10-output
# MLP's reg 2.08x a step's FLOPs, grad reg 5.96x); a target for the arithmetic of k = 1
K_BACKWARDS = "a Jacobian of k = 10 rows per sample takes 10 backward passes through the activations"


@pytest.mark.parametrize("case", ["mlp", "mlp_b8", "mlp10", "transformer", "cnn", "resnet18"])
def test_reg_dispatches_at_most_1_5x_a_step_and_syncs_nothing(case):
    # mlp 0.93x, transformer 0.82x, CNN 1.38x, ResNet-18 1.44x with the NaN/Inf check (5 operations);
    # 0.79x, 0.77x, 1.23x, 1.42x before it (2.5x for ResNet-18 before an earlier session's trimming)
    (ops, flops, syncs) = case_ratios(case)["reg"]
    assert syncs == 0 and ops <= 1.5, ops


@pytest.mark.parametrize("case", ["mlp", "mlp_b8", "transformer", "cnn", "resnet18", pytest.param(
    "mlp10", marks=pytest.mark.xfail(strict=True, reason=K_BACKWARDS))])
def test_reg_computes_at_most_1_3x_a_step(case):
    assert case_ratios(case)["reg"][1] <= 1.3


@pytest.mark.parametrize("case", ["mlp", "mlp_b8", "mlp10", "transformer", "cnn", "resnet18"])
def test_grad_reg_dispatches_at_most_4x_a_step_and_syncs_nothing(case):
    # mlp 1.57x, mlp10 1.95x, transformer 2.75x (4.5x before a Linear's bias joined its weight's
    # Gram product and the output gradients of one direction stayed bare), CNN 2.46x, ResNet-18
    # 3.94x (8.2x before GroupNorm's second derivative was written out, 5.6x before its kernels
    # took it, 4.2x before the convolutions' weights went without views)
    (ops, flops, syncs) = case_ratios(case)["reg_grad"]
    assert syncs == 0 and ops <= 4, ops


@pytest.mark.parametrize("case", ["mlp", "mlp_b8", "transformer", "resnet18", "cnn", pytest.param(
    "mlp10", marks=pytest.mark.xfail(strict=True, reason=K_BACKWARDS))])
def test_grad_reg_computes_at_most_3x_a_step(case):
    # CNN 2.83x (3.22x before the Gram matrices' symmetric backward and the convolutions'
    # written-out second derivative), transformer 2.41x (its step's fused attention now counted)
    assert case_ratios(case)["reg_grad"][1] <= 3


def test_costs_under_autocast_count_its_casts():
    fp32, bf16 = (case_costs("mlp_b8", torch.device("cpu"), methods=("train_step",), autocast=dtype)["train_step"]
                  for dtype in (None, torch.bfloat16))
    # the weights and inputs cast to bfloat16 for each linear layer, forward and backward
    assert bf16.operations > fp32.operations and bf16.flops == fp32.flops


@pytest.mark.parametrize("case", ["mlp", "transformer", "cnn", "resnet18"])
def test_under_bf16_autocast_the_targets_hold_and_nothing_syncs(case):
    # the GPU cases run under bf16 autocast too, the step alike (its casts are operations as the
    # probe's are): ResNet-18 reg 1.41x, grad reg 3.52x; transformer 0.78x, 2.35x; CNN 1.08x,
    # 1.84x; MLP 0.73x, 1.25x (grad reg's double backward in the parameters' dtype)
    r = case_ratios(case, torch.bfloat16)
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][0] <= 1.5 and r["reg"][1] <= 1.3, r
    assert r["reg_grad"][0] <= 4 and r["reg_grad"][1] <= 3, r


def small_language_model(name):
    """A 2-layer, width-64 GPT-2 or Llama with its head tied to the embedding, vocabulary 1000,
    8 sequences of 16 tokens (the benchmark's cases, smaller: the ratios barely move with size)."""
    transformers = pytest.importorskip("transformers")
    from probe import LanguageModelScore, token_ids

    def build():
        if name == "gpt2":
            config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=16, vocab_size=1000,
                                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0)
            return LanguageModelScore(transformers.GPT2LMHeadModel(config))
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=16, vocab_size=1000,
                                          tie_word_embeddings=True)
        return LanguageModelScore(transformers.LlamaForCausalLM(config))

    return build, ((8, 16), token_ids(1000))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_language_models_reg_and_grad_reg_compute_within_their_flop_targets_without_syncs(name, autocast):
    # reg 0.79x a step's FLOPs, grad reg 2.24x, under bf16 autocast alike (operations: the next
    # tests; under autocast reg 1.14-1.20x, grad reg 3.12-3.26x)
    r = ratios(name, small_language_model(name), autocast)
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][1] <= 1.3 and r["reg_grad"][1] <= 3, r
    if autocast is not None:
        assert r["reg"][0] <= 1.5 and r["reg_grad"][0] <= 4, r


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_language_models_reg_dispatches_at_most_1_5x_a_step(name):
    # GPT-2 1.20x (its tied head's cross terms held with the output gradients), Llama 1.13x
    assert ratios(name, small_language_model(name))["reg"][0] <= 1.5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_language_models_grad_reg_dispatches_at_most_4x_a_step(name):
    # Llama 3.56x (q, k, v and gate, up share their input's Gram matrix; 4.3x before); GPT-2
    # 3.78x (its GELU and LayerNorm differentiated twice in their kernels, the ghost norms'
    # Gram products and the embeddings' with a one-product backward; 4.6x before)
    assert ratios(name, small_language_model(name))["reg_grad"][0] <= 4


def small_vit():
    import transformers

    from probe import PooledHidden

    def build():
        return PooledHidden(transformers.ViTModel(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False))

    return build, (8, 3, 16, 16)


def test_a_vision_transformer_is_on_the_fast_path_within_the_step_targets():
    # issue 28: Hugging Face's ViT whole on the fast engine (class token and position embeddings
    # written out), reg 1.31x and grad reg 3.54x a step's operations at the benchmark's size
    # (benchmarks/README.md); no host sync
    r = ratios("vit", small_vit())
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][0] <= 1.5 and r["reg_grad"][0] <= 4, r


def test_convnext_is_on_the_fast_path_within_the_step_targets():
    # issue 28: Hugging Face's ConvNeXt (channels-first LayerNorms by the F.layer_norm they apply,
    # layer scales as elementwise uses), reg 1.29x and grad reg 3.96x a step's operations at the
    # benchmark's size (benchmarks/README.md); its pooler LayerNorm, which the model's output does
    # not use, costs nothing; no host sync
    r = ratios("convnext")  # (at the benchmark's size: 4.04x for grad reg with one block a stage)
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][0] <= 1.5 and r["reg_grad"][0] <= 4, r


def small_t5():
    import transformers

    from probe import PooledHidden, token_ids

    def build():
        return PooledHidden(transformers.T5EncoderModel(transformers.T5Config(
            d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0, vocab_size=1000)))

    return build, ((8, 16), token_ids(1000))


def test_a_t5_encoder_is_on_the_fast_path_within_the_step_targets():
    # issue 28: its relative position bias, shared by all samples, taken where it meets them
    # (engines/shared.py): reg 1.05x and grad reg 2.71x a step's operations at the benchmark's
    # size (benchmarks/README.md; 2.42x and 8.61x by vmap before); no host sync
    r = ratios("t5", small_t5())
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][0] <= 1.5 and r["reg_grad"][0] <= 4, r


def small_swin():
    import transformers

    from probe import LinearScore

    def build():
        return LinearScore(transformers.SwinModel(transformers.SwinConfig(
            image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False), 32)

    return build, (8, 3, 16, 16)  # 8x8 patches: 4 windows of 4x4 a sample, then one


def test_a_swin_transformer_is_on_the_fast_path_within_the_step_targets():
    # issue 28: Hugging Face's Swin, its windows merged into the batch read as sample-major
    # blocks and its relative position bias tables replayed per sample where the window scores
    # meet them (engines/shared.py): reg 1.28x and grad reg 3.20x a step's operations at the
    # benchmark's size (benchmarks/README.md; 2.63x and 8.94x by vmap before); no host sync
    r = ratios("swin", small_swin())
    assert r["reg"][2] == 0 == r["reg_grad"][2]
    assert r["reg"][0] <= 1.5 and r["reg_grad"][0] <= 4, r


def small_window_attention():
    from test_certificate import WithWindowAttention

    return (lambda: WithWindowAttention(shift=True)), (8, 4, 4)


@pytest.mark.parametrize("name,small", [("swin", small_swin), ("t5", small_t5),
                                        ("window_attention", small_window_attention)])
def test_a_shared_values_per_sample_gradients_do_not_loop_over_the_samples(name, small):
    # a vmapped backward through an indexed table (Swin's bias) or an Embedding (T5's) loops over
    # the samples, an operation each on a GPU: the replayed root (a module, or a function of a
    # parameter in a module's own code: torchvision's Swin) dispatches as many for 8 as for 4
    build, shape = small()
    counts = []
    for n in (4, 8):
        batch = (n, *shape[1:]) if isinstance(shape[0], int) else ((n, *shape[0][1:]), shape[1])
        costs = case_costs(name, torch.device("cpu"), methods=("reg", "reg_grad"), build_and_shape=(build, batch))
        counts.append({m: c.operations for m, c in costs.items()})
    assert counts[0] == counts[1], counts


def test_accelerator_choices_dispatch_whole_layers_and_give_the_same_numbers():
    # the choices a GPU gets (launch_bound), made on the CPU: one patch piece per layer
    from cost import as_accelerator

    from helpers import assert_rel_close, brute_sq_norms, make
    from noisy_label_sgd import per_sample_sq_grad_norms

    model, x = make("narrow_conv2d_strided_dilated")
    x = torch.cat([x] * 32)  # 128 samples: several 4 MB pieces per layer on the CPU
    cpu = second_call_cost(lambda: per_sample_sq_grad_norms(model, x))
    with as_accelerator():
        accelerator = second_call_cost(lambda: per_sample_sq_grad_norms(model, x))
        norms = per_sample_sq_grad_norms(model, x)
    assert accelerator.operations < cpu.operations and abs(accelerator.flops - cpu.flops) <= 0.01 * cpu.flops
    assert_rel_close(norms, brute_sq_norms(model, x[:4]).repeat(32))


@pytest.mark.parametrize("name", ["mlp_multi_output", "cnn_groupnorm", "transformer_encoder_layer"])
def test_the_dense_projection_and_its_rank_report_sync_nothing(name):
    # K from closed forms (the MLP) or J from the trace (CNN, transformer): the rank and the
    # smallest kept singular value are reductions, read by the probe with its other numbers
    from helpers import make, random_vector
    from noisy_label_sgd import tangent_projection

    model, x = make(name)
    x = torch.cat([x] * 20)  # past the small-J path
    v = random_vector(model)
    assert second_call_cost(lambda: tangent_projection(model, x, v)).syncs == 0


def test_the_cholesky_solve_of_a_large_k_syncs_once_for_its_verdict():
    from helpers import mlp, random_vector
    from noisy_label_sgd import tangent_projection
    from noisy_label_sgd.engines.tangent import CHOLESKY_MIN_ROWS

    model = mlp(sizes=(20, 64, 1))
    x = torch.randn(CHOLESKY_MIN_ROWS, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = random_vector(model)
    assert second_call_cost(lambda: tangent_projection(model, x, v)).syncs == 1


def test_the_default_memory_budget_follows_the_device(monkeypatch):
    # 1 GiB on the CPU; on an accelerator a quarter of what is free (every chunk of samples
    # repeats every operation there), at least 1 GiB
    from noisy_label_sgd.engines import functional, select_engine

    cpu = torch.device("cpu")
    model, x = nn.Linear(3, 1), torch.randn(4, 3)
    assert functional.default_memory_budget(cpu) == 1 << 30
    assert select_engine(model, x).memory_budget == 1 << 30
    assert select_engine(model, x, memory_budget=12345).memory_budget == 12345
    monkeypatch.setattr(functional, "launch_bound", lambda device: True)
    monkeypatch.setattr(functional, "available_memory", lambda device: 100 << 30)
    assert functional.default_memory_budget(cpu) == 25 << 30
    assert select_engine(model, x).memory_budget == 25 << 30
    monkeypatch.setattr(functional, "available_memory", lambda device: 0)
    assert functional.default_memory_budget(cpu) == 1 << 30


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_lsqrs_j_v_from_the_held_pullback_costs_less_than_a_jvp(name):
    # (u -> J^T u is linear: its vjp is J v, a backward through the held backward, where a jvp
    # recomputes the forward with its tangent: GPT-2 2x128 at n = 8: fewer operations and FLOPs)
    from projection_scaling import model_and_data

    from noisy_label_sgd.engines.functional import FunctionalModel, evaluation_mode

    if name == "gpt2":
        pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    model, x, _ = model_and_data(name, 8, 1, g)
    with evaluation_mode(model):
        fm = FunctionalModel(model)
        J_times, J_transpose_times = fm.linear_products((x,))
        v = torch.randn(fm.num_params, generator=g)
        torch.testing.assert_close(J_times(v), fm.J_times([(x,)], v), rtol=1e-4, atol=1e-4)
        held, jvp = cost(lambda: J_times(v)), cost(lambda: fm.J_times([(x,)], v))
    assert held.syncs == 0 == jvp.syncs
    assert held.operations < jvp.operations and held.flops < jvp.flops, (held, jvp)
