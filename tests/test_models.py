"""Models people bring, built from configs (no weights downloaded): Hugging Face BERT, GPT-2 and
Llama with padding masks, a ViT, and torch's own RMSNorm, each against the brute-force loops."""

import pytest
import torch
from torch import nn

from helpers import (FLOAT32_RTOL, FLOAT64_RTOL, assert_rel_close, brute_jacobian, brute_reg_grad, brute_sq_norms,
                     seeded, svd_tangent_projection)
from noisy_label_sgd import RegularizerProbe, per_sample_sq_grad_norms, regularizer_grad

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, LENGTH = 40, 16, 6


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config, add_pooling_layer=False)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaModel(config)


class WithHead(nn.Module):
    """A transformer body and a 2-output Linear head on the last position's hidden state."""

    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, nn.Linear(WIDTH, 2)

    def forward(self, ids, mask=None):
        return self.head(self.body(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1])


def tokens(n, seed=0):
    """Token ids and an attention mask with every other sequence left-padded by two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[::2, :2] = 0
    return ids, mask


BODIES = {"bert": bert, "gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("name", BODIES)
def test_a_padded_transformer_is_probed_exactly_on_the_fast_path(name):
    # 40 samples x 2 outputs: past the small-J path; every parametrised layer has a closed form
    # (Embedding, Linear or GPT-2's Conv1D, LayerNorm or Llama's RMSNorm; position embeddings
    # shared by all samples are traced expanded), so grad reg is a double backward and J for the
    # projection comes from the trace: no whole-model torch.func, which cannot run these
    # forwards (transformers branches on attention_mask.all())
    model = seeded(40, lambda: WithHead(BODIES[name]())).eval()
    inputs = tokens(40)
    report = RegularizerProbe(model, inputs)()
    assert report.method == "fast"
    J = brute_jacobian(model, inputs)
    assert_rel_close(report.per_sample, J.pow(2).reshape(40, -1).sum(1))
    grad = brute_reg_grad(model, inputs)
    manifold = svd_tangent_projection(J, grad)
    # Llama's RMSNorm normalises in float32 even in a float64 model: its second derivatives
    # (grad reg) carry float32 rounding, differently in the loop and in the closed form
    rtol = FLOAT32_RTOL if name == "llama" else FLOAT64_RTOL
    assert_rel_close(report.reg_grad_norm, float(grad.norm()), rtol=rtol)
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=rtol * float(grad.norm()))
    assert report.jacobian_rank == int(torch.linalg.matrix_rank(J))
    with pytest.raises(ValueError, match="data-dependent control flow.*method='auto' or 'fast'"):
        per_sample_sq_grad_norms(model, inputs, method="vmap")


def test_torch_rmsnorm_has_a_closed_form_exact_against_the_loop():
    model = seeded(41, lambda: nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 2)))
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert RegularizerProbe(model, x, method="fast")().method == "fast"
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="fast"), brute_sq_norms(model, x))
    names = [n for n, p in model.named_parameters()]
    grad = regularizer_grad(model, x, method="fast")
    assert_rel_close(torch.cat([grad[n].reshape(-1) for n in names]), brute_reg_grad(model, x))


class ViTWithHead(nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=WIDTH,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.body, self.head = transformers.ViTModel(config, add_pooling_layer=False), nn.Linear(WIDTH, 2)

    def forward(self, x):
        return self.head(self.body(pixel_values=x).last_hidden_state[:, 0])


@pytest.mark.parametrize("method", ["auto", "fast", "vmap"])
def test_a_vision_transformer_is_probed_exactly_in_every_method(method):
    # its embeddings own bare parameters (the class token by cat, the position embeddings by
    # add): written out as elementwise uses, so "auto" and "fast" take the fast engine whole
    model = seeded(42, ViTWithHead).eval()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    report = RegularizerProbe(model, x, method=method)()
    assert report.method == ("vmap" if method == "vmap" else "fast")
    J = brute_jacobian(model, x)
    grad = brute_reg_grad(model, x)
    assert_rel_close(report.per_sample, J.pow(2).reshape(40, -1).sum(1))
    assert_rel_close(report.reg_grad_norm, float(grad.norm()))
    manifold = svd_tangent_projection(J, grad)
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=FLOAT64_RTOL * float(grad.norm()))


class LastLogits(nn.Module):
    """A language model's logits at the last two positions, their logsumexp (2 outputs)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm(input_ids=ids, attention_mask=mask).logits[:, -2:].logsumexp(-1)


def gpt2_lm():
    return transformers.GPT2LMHeadModel(gpt2().config)


def llama_lm():
    config = llama().config
    config.tie_word_embeddings = True
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("name,build", [("gpt2", gpt2_lm), ("llama", llama_lm)])
def test_a_language_model_with_tied_embedding_and_head_is_exact_on_the_fast_path(name, build):
    # one weight in the token embedding and the output head: the cross terms of its two uses
    # in closed form (issue 14: "parameter shared by two modules" sent these to vmap, which
    # cannot run them)
    model = seeded(45, lambda: LastLogits(build())).eval()
    embedding = model.lm.get_input_embeddings()
    assert model.lm.get_output_embeddings().weight is embedding.weight
    inputs = tokens(40, seed=3)
    report = RegularizerProbe(model, inputs)()
    assert report.method == "fast"
    J = brute_jacobian(model, inputs)
    assert_rel_close(report.per_sample, J.pow(2).reshape(40, -1).sum(1))
    grad = brute_reg_grad(model, inputs)
    rtol = FLOAT32_RTOL if name == "llama" else FLOAT64_RTOL  # (RMSNorm in float32, as above)
    assert_rel_close(report.reg_grad_norm, float(grad.norm()), rtol=rtol)
    manifold = svd_tangent_projection(J, grad)
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=rtol * float(grad.norm()))


def assert_exact_on_the_fast_path(model, inputs, method):
    """The probe's report (``method``: "fast" taken) and grad reg against the brute-force loop and
    J's SVD; the report, for more checks."""
    report = RegularizerProbe(model, inputs, method=method)()
    assert report.method == "fast"
    J = brute_jacobian(model, inputs)
    assert_rel_close(report.per_sample, J.pow(2).reshape(len(report.per_sample), -1).sum(1))
    grad = brute_reg_grad(model, inputs)
    got = regularizer_grad(model, inputs, method=method)
    assert_rel_close(torch.cat([got[n].reshape(-1) for n, p in model.named_parameters()]), grad)
    manifold = svd_tangent_projection(J, grad)
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=FLOAT64_RTOL * float(grad.norm()))
    return report


def t5_encoder():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0)
    return transformers.T5EncoderModel(config)


@pytest.mark.parametrize("mask", ["none", "ones", "padded"])
@pytest.mark.parametrize("method", ["auto", "fast"])
def test_a_t5_encoder_is_probed_exactly_on_the_fast_path(method, mask):
    # its relative position bias is one Embedding looked up on a grid of positions, [q, k,
    # heads]: no sample dim; it meets the samples as every layer's attention mask, where the
    # trace takes its per-sample gradients (engines.shared); its RMS norm's weight is a bare
    # parameter times the normalised input (engines.elementwise); its token embedding is tied
    # to the model's never-called `shared` embedding
    model = seeded(46, lambda: WithHead(t5_encoder())).eval()
    ids, padding = tokens(40, seed=4)
    # (without a mask its attention reads attributes of the bias a mask's path does not)
    inputs = {"none": (ids,), "ones": (ids, torch.ones_like(padding)), "padded": (ids, padding)}[mask]
    report = assert_exact_on_the_fast_path(model, inputs, method)
    if mask == "none":  # (torch.func runs it: the same numbers)
        assert_rel_close(per_sample_sq_grad_norms(model, inputs, method="vmap"), report.per_sample)
        return
    # T5 branches on the mask's values: torch.func cannot run it, so the fast path is the only one
    with pytest.raises(ValueError, match="data-dependent control flow.*method='auto' or 'fast'"):
        per_sample_sq_grad_norms(model, inputs, method="vmap")


class SwinWithHead(nn.Module):
    """Hugging Face's Swin (2 stages; 4 windows of 2x2 patches a sample in the first, with a
    shifted block, one window in the second) and a 2-output Linear head on its mean token."""

    def __init__(self):
        super().__init__()
        config = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 2],
                                         num_heads=[2, 2], window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
        self.body, self.head = transformers.SwinModel(config, add_pooling_layer=False), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(pixel_values=x).last_hidden_state.mean(1))


@pytest.mark.parametrize("method", ["auto", "fast"])
def test_a_swin_transformer_is_probed_exactly_on_the_fast_path(method):
    # its windows are merged into the batch dim ([n windows, T, C]: read as sample-major blocks,
    # which the certificate's row check holds each measurement to), and its relative position
    # bias is a table indexed by position, shared by all samples and met by every window's
    # scores (engines.shared, replayed on the table batched per sample)
    model = seeded(47, SwinWithHead).eval()
    with torch.no_grad():  # (Hugging Face starts the bias tables at zero: no gradient would test them)
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    report = assert_exact_on_the_fast_path(model, x, method)
    assert_rel_close(per_sample_sq_grad_norms(model, x, method="vmap"), report.per_sample)
