"""DP-SGD on LoRA with real opacus and real peft, on a tiny random Llama.

The reference for a DP step is worked out independently: each record is run
alone, truncated to its real tokens, its gradient clipped to C by hand, and
the clipped gradients averaged. With sigma = 0 and SGD at lr = 1 the update
must equal minus that average. ``batch_size = N`` gives sample rate
1 / ceil(N / N) = 1, so the Poisson batch holds every record and is fixed.
"""

from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from torch.utils.data import TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from fedretrain.errors import TrainingError
from fedretrain.training import dp as dp_module
from fedretrain.training.dp import DPParams, TrainParams, poisson_sample_rate, train_lora
from fedretrain.training.evaluate import evaluate_loss

VOCAB = 97
LENGTHS = [12, 9, 7, 12, 5, 10]  # real tokens per record; the rest is right padding


def _base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _lora(base: nn.Module, *, random_b: bool = True) -> nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    if random_b:
        # peft starts lora_B at 0, which leaves lora_A without gradient.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    return model


def _padded_dataset(lengths: list[int] = LENGTHS, length: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    return TensorDataset(ids * mask, mask)  # pad token 0 where mask is 0


def _lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _record_loss_by_hand(model: nn.Module, ids: torch.Tensor, length: int) -> torch.Tensor:
    # One record alone, cut to its real tokens: no padding can leak in.
    row = ids[None, :length]
    logits = model(input_ids=row).logits[0, :-1]
    return F.cross_entropy(logits, row[0, 1:])


def _clipped_mean_gradient(model: nn.Module, data: TensorDataset, clip: float) -> dict:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids, mask in zip(*data.tensors, strict=True):
        model.zero_grad()
        _record_loss_by_hand(model, ids, int(mask.sum())).backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))
        factor = min(1.0, clip / (norm + 1e-6))  # opacus' flat clipping
        for n, p in params.items():
            total[n] += factor * p.grad
    return {n: g / len(data) for n, g in total.items()}


def _per_record_norms(model: nn.Module, data: TensorDataset) -> list[float]:
    norms = []
    for ids, mask in zip(*data.tensors, strict=True):
        model.zero_grad()
        _record_loss_by_hand(model, ids, int(mask.sum())).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    model.zero_grad(set_to_none=True)
    return norms


def _max_relative_error(update: dict, expected: dict) -> float:
    scale = max(float(e.abs().max()) for e in expected.values())
    return max(float((update[n] - expected[n]).abs().max()) for n in expected) / scale


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_dp_update_matches_per_record_clipping_by_hand(mode: str) -> None:
    # Prepare: C at the median per-record norm, so some records are clipped and some not.
    model, data = _lora(_base_model()), _padded_dataset()
    norms = sorted(_per_record_norms(model, data))
    clip = (norms[2] + norms[3]) / 2
    expected_grad = _clipped_mean_gradient(copy.deepcopy(model), data, clip)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = TrainParams(local_steps=1, batch_size=len(data), lr=1.0, optimizer="sgd")

    # Execute: one DP step, no noise, all six records in the batch.
    train_lora(model, data, params, DPParams(True, 0.0, clip, grad_sample_mode=mode), seed=0)

    # Assert: SGD at lr 1 moved each weight by minus the clipped mean gradient.
    update = {n: state[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert norms[0] < clip < norms[-1]
    assert _max_relative_error(update, expected_grad) < 1e-3


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_proximal_term_joins_the_private_gradient_after_clipping(mode: str) -> None:
    # Prepare: FedProx's mu = 0.5, two full-batch DP steps without noise, SGD at lr 1. By hand:
    # step 1 is a plain DP step (w1 = w0 - g(w0): the term mu (w - w0) is 0 at w0); step 2 is
    # w2 = w1 - (g(w1) + mu (w1 - w0)), g the clipped mean gradient and the term outside the clip.
    model, data = _lora(_base_model()), _padded_dataset()
    clip, mu = 0.05, 0.5
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = copy.deepcopy(model)
    train_lora(
        reference, data, TrainParams(1, len(data), 1.0, "sgd"), DPParams(True, 0.0, clip, grad_sample_mode=mode), seed=0
    )
    w1 = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    g1 = _clipped_mean_gradient(copy.deepcopy(reference), data, clip)
    expected = {n: w1[n] - (g1[n] + mu * (w1[n] - w0[n])) for n in w0}

    # Execute
    params = TrainParams(2, len(data), 1.0, "sgd", proximal_mu=mu)
    train_lora(model, data, params, DPParams(True, 0.0, clip, grad_sample_mode=mode), seed=0)

    # Assert: the term moved w2 back towards w0 by mu (w1 - w0), which no per-record clip bounded.
    w2 = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert _max_relative_error(w2, expected) < 1e-3
    pull = max(float((mu * (w1[n] - w0[n])).abs().max()) for n in w0)
    assert pull > 0.01 * max(float(g.abs().max()) for g in g1.values())


def test_dp_step_without_noise_or_clipping_equals_a_plain_step() -> None:
    # Prepare: two identical models; C far above any gradient norm, sigma = 0.
    private, plain = _lora(_base_model()), _lora(_base_model())
    data = _padded_dataset()
    start = _lora_weights(plain)
    params = TrainParams(local_steps=1, batch_size=len(data), lr=0.5, optimizer="sgd")

    with torch.no_grad():
        hand_losses = [_record_loss_by_hand(plain, ids, n) for ids, n in zip(data[:][0], LENGTHS, strict=True)]

    # Execute: the same full batch once through opacus, once through plain SGD.
    result = train_lora(private, data, params, DPParams(True, 0.0, 1e6), seed=0)
    train_lora(plain, data, params, DPParams(False, 0.0, 1.0), seed=0)

    # Assert: same update; the reported loss is the mean per-record loss before it.
    assert (result.num_examples, result.sample_rate) == (len(LENGTHS), 1.0)
    assert result.mean_loss == pytest.approx(float(sum(hand_losses)) / len(LENGTHS), rel=1e-5)
    dp_update = {k: start[k] - v for k, v in _lora_weights(private).items()}
    plain_update = {k: start[k] - v for k, v in _lora_weights(plain).items()}
    assert _max_relative_error(dp_update, plain_update) < 1e-5


def test_noisy_training_changes_lora_and_leaves_a_clean_model() -> None:
    # Prepare: peft's own init (lora_B = 0); the noise alone must move lora_B.
    model, data = _lora(_base_model(), random_b=False), _padded_dataset()
    start = _lora_weights(model)
    hooks_before = _hook_count(model)
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    params = TrainParams(local_steps=3, batch_size=2, lr=0.01)

    # Execute: two rounds on the same object, as a site does.
    first = train_lora(model, data, params, DPParams(True, 1.0, 1.0), seed=3, num_threads=1)
    second = train_lora(model, data, params, DPParams(True, 1.0, 1.0), seed=4)

    # Assert: weights moved, reported numbers are the round's, nothing of opacus is left.
    after = _lora_weights(model)
    assert set(after) == set(start) and not any("_module" in k for k in after)
    assert max(float((after[k] - start[k]).abs().max()) for k in start) > 0
    assert first.lora_max_abs_delta > 0 and second.lora_max_abs_delta > 0
    assert (first.steps, first.noise_multiplier) == (3, 1.0)
    assert first.sample_rate == 1 / 3  # ceil(6 / 2) = 3 batches' worth
    assert _hook_count(model) == hooks_before
    for p in model.parameters():
        assert not {"grad_sample", "summed_grad", "_forward_counter"} & set(vars(p))
        assert p.grad is None
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    evaluate_loss(model, data)  # the unwrapped model evaluates as usual


def test_same_seed_gives_the_same_weights() -> None:
    # Prepare
    a, b = _lora(_base_model()), _lora(_base_model())
    data, params = _padded_dataset(), TrainParams(local_steps=3, batch_size=2, lr=0.01)

    # Execute
    train_lora(a, data, params, DPParams(True, 1.0, 1.0), seed=5)
    train_lora(b, data, params, DPParams(True, 1.0, 1.0), seed=5)

    # Assert
    wa, wb = _lora_weights(a), _lora_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("enabled", [True, False])
def test_guard_raises_when_lora_weights_do_not_change(enabled: bool) -> None:
    # Prepare: lr = 0 is the stand-in for opacus#820's silent no-update.
    model, data = _lora(_base_model()), _padded_dataset()
    params = TrainParams(local_steps=2, batch_size=2, lr=0.0, optimizer="sgd")

    # Execute / Assert
    with pytest.raises(TrainingError, match=r"did not change during training \(opacus#820"):
        train_lora(model, data, params, DPParams(enabled, 1.0, 1.0), seed=0)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_empty_poisson_batches_do_not_crash(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 6 records at q = 1/6; a batch is empty with probability (5/6)^6 = 0.33.
    model, data = _lora(_base_model()), _padded_dataset()
    empties = []
    real = dp_module._empty_batch_gradients
    monkeypatch.setattr(dp_module, "_empty_batch_gradients", lambda ps: (empties.append(1), real(ps)))
    params = TrainParams(local_steps=12, batch_size=1, lr=0.01)

    # Execute
    result = train_lora(model, data, params, DPParams(True, 1.0, 1.0, mode), seed=0)

    # Assert: every step was taken, some of them on empty batches.
    assert result.steps == 12 and result.sample_rate == pytest.approx(1 / 6)
    assert len(empties) >= 1
    assert result.num_examples >= 12 - len(empties)
    assert result.lora_max_abs_delta > 0


def test_secure_mode_without_torchcsprng_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: make `import torchcsprng` fail whether or not it is installed.
    monkeypatch.setitem(sys.modules, "torchcsprng", None)
    model, data = _lora(_base_model()), _padded_dataset()
    dp = DPParams(True, 1.0, 1.0, secure_mode=True)

    # Execute / Assert
    with pytest.raises(TrainingError, match="torchcsprng"):
        train_lora(model, data, TrainParams(local_steps=1, batch_size=2, lr=0.1), dp, seed=0)


def test_only_lora_weights_may_be_trainable() -> None:
    # Prepare: someone left the output layer trainable.
    model, data = _lora(_base_model()), _padded_dataset()
    model.base_model.model.lm_head.weight.requires_grad_(True)

    # Execute / Assert
    with pytest.raises(ValueError, match="lm_head"):
        train_lora(model, data, TrainParams(1, 2, 0.1), DPParams(True, 1.0, 1.0), seed=0)


def test_settings_are_validated_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        TrainParams(local_steps=1, batch_size=1, lr=0.1, optimizer="adam")
    with pytest.raises(ValueError, match="grad_sample_mode must be one of ew, functorch, ghost"):
        DPParams(True, 1.0, 1.0, grad_sample_mode="fast")
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPParams(True, 1.0, 0.0)
    assert poisson_sample_rate(10, 4) == 1 / 3 and poisson_sample_rate(12, 4) == 4 / 12


def test_evaluate_without_adapter_is_the_base_model() -> None:
    # Prepare: a copy of the base model before peft touches it, and a non-zero adapter.
    base = _base_model()
    reference = copy.deepcopy(base)
    model, data = _lora(base), _padded_dataset()
    model.train()
    with torch.no_grad():
        losses = [
            _record_loss_by_hand(reference, ids, int(m.sum())) * (int(m.sum()) - 1)
            for ids, m in zip(*data.tensors, strict=True)
        ]
    tokens = sum(n - 1 for n in LENGTHS)
    expected = float(sum(losses)) / tokens

    # Execute
    bare = evaluate_loss(model, data, batch_size=4, use_adapter=False)
    adapted = evaluate_loss(model, data, batch_size=4)

    # Assert
    assert bare.loss == pytest.approx(expected, rel=1e-5)
    assert (bare.tokens, bare.examples) == (tokens, len(LENGTHS))
    assert abs(adapted.loss - bare.loss) > 1e-4
    assert model.training  # mode restored


def test_evaluate_weights_tokens_and_ignores_padding() -> None:
    # Prepare: V = 5. Rows 0 and 2 get uniform logits (CE = ln 5 per token); row 1
    # gets logit ln 4 on the true next token, 0 elsewhere: CE = ln(1 + 4/4) = ln 2.
    # Row 0: 4 real tokens, right padded (3 predictions). Row 1: 6 real (5).
    # Row 2: left padded, 4 real (3 predictions; none from a padded context).
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [4, 3, 2, 1, 0, 4], [0, 0, 1, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    model = _OracleStub(vocab=5, confident_rows={1}, logit=math.log(4))

    # Execute: batch size 2 splits the rows across two forward passes.
    stats = evaluate_loss(model, TensorDataset(ids, mask), batch_size=2)

    # Assert
    expected = (3 * math.log(5) + 5 * math.log(2) + 3 * math.log(5)) / 11
    assert stats.loss == pytest.approx(expected, rel=1e-6)
    assert stats.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert (stats.tokens, stats.examples) == (11, 3)
    assert stats.example_losses == pytest.approx((math.log(5), math.log(2), math.log(5)))


def test_training_on_a_repeated_pattern_lowers_its_loss() -> None:
    # Prepare: 16 copies of one counting sequence.
    model = _lora(_base_model(), random_b=False)
    ids = torch.arange(1, 13).repeat(16, 1)
    data = TensorDataset(ids, torch.ones_like(ids))
    before = evaluate_loss(model, data)

    # Execute: a few low-noise DP steps.
    params = TrainParams(local_steps=15, batch_size=8, lr=0.05)
    train_lora(model, data, params, DPParams(True, 0.3, 1.0), seed=0)

    # Assert: down from about ln 97 = 4.57 (a LoRA of r=4 on q, v of one layer
    # cannot go far: about 0.2 here, and it levels off near 0.25).
    assert evaluate_loss(model, data).loss < before.loss - 0.1


class _OracleStub(nn.Module):
    # Stands in for a causal LM whose logits we choose: uniform, or `logit` on the
    # true next token for `confident_rows`.
    def __init__(self, vocab: int, confident_rows: set[int], logit: float) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives evaluate_loss a device
        self.vocab, self.rows, self.logit = vocab, confident_rows, logit
        self.seen = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        for b in range(batch):
            if self.seen + b in self.rows:
                nxt = input_ids[b, 1:]
                logits[b, torch.arange(length - 1), nxt] = self.logit
        self.seen += batch
        return SimpleNamespace(logits=logits)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_ffa_lora_trains_lora_b_only_under_dp() -> None:
    # lora.freeze_a: the embedded model's lora_A stays at its seeded initialisation; lora_B moves.
    from fedretrain.config import compose_config
    from fedretrain.modeling.lora_model import adapter_arrays, load_lora_model

    cfg = compose_config(["lora.freeze_a=true", "model.max_length=32"])
    lm = load_lora_model(cfg.model, cfg.lora, seed=0, device="cpu")
    assert all(not p.requires_grad for n, p in lm.model.named_parameters() if "lora_A" in n)
    assert any(p.requires_grad for n, p in lm.model.named_parameters() if "lora_B" in n)
    before = adapter_arrays(lm.model)
    ids = torch.randint(5, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(ids, torch.ones_like(ids))

    train_lora(lm.model, data, TrainParams(2, 8, 0.05), DPParams(True, 1.0, 1.0), seed=0)

    after = adapter_arrays(lm.model)
    assert all((after[k] == before[k]).all() for k in before if "lora_A" in k)
    assert any((after[k] != before[k]).any() for k in before if "lora_B" in k)
