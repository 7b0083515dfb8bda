"""The embedded toy: digits data, text encoder, ToyDigitsPolicy, digit/jpeg rewards, pretraining."""

from __future__ import annotations

import pytest
import torch

from fastcps.toy.digits import (
    DIGIT_WORDS,
    NUM_HELDOUT,
    TEMPLATES,
    all_prompts,
    digit_of,
    image_ids,
    load_split,
    pack,
    parse_digit,
    prompt_for,
    unpack,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(one_thread):
    from fastcps.policies.toy import ToyDigitsPolicy

    return ToyDigitsPolicy()


# --- data -------------------------------------------------------------------------------------------


def test_pack_round_trip_and_flux_layout():
    x = torch.randn(3, 1, 16, 16)
    tok = pack(x)
    assert tok.shape == (3, 64, 4)
    assert torch.equal(unpack(tok), x)
    # token (r, c) holds the 2×2 patch at rows 2r..2r+1, cols 2c..2c+1, row-major (FluxPipeline._pack_latents)
    r, c = 2, 5
    assert torch.equal(tok[:, r * 8 + c], x[:, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(3, 4))
    ids = image_ids()
    assert ids.shape == (64, 3) and ids[r * 8 + c].tolist() == [0.0, r, c]
    x3 = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpack(pack(x3)), x3)


def test_split_is_fixed_disjoint_and_scaled():
    xt, yt = load_split("train")
    xh, yh = load_split("heldout")
    assert xt.shape[1:] == (1, 16, 16) and len(yh) == NUM_HELDOUT and len(yt) + len(yh) == 1797
    assert xt.min() >= -1 and xt.max() <= 1 and float(xt.min()) == -1.0
    assert torch.equal(load_split("heldout")[0], xh)  # deterministic
    assert set(yh.tolist()) == set(range(10))


def test_prompt_parsing():
    for d in range(10):
        for t in range(len(TEMPLATES)):
            assert parse_digit(prompt_for(d, t)) == d
    assert parse_digit("a handwritten digit seven") == 7
    assert parse_digit("The Number 7!") == 7
    assert parse_digit("a sketch of the digit 0") == 0
    assert parse_digit("seven, i.e. 7") == 7
    assert digit_of("anything", {"digit": 3}) == 3
    assert digit_of("the number 4", {"label": 5}) == 5
    assert digit_of("the number 4", {}) == 4
    with pytest.raises(ValueError, match="metadata"):
        parse_digit("a picture of a cat")
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        parse_digit("one or 2")
    assert len(all_prompts()) == 10 * len(TEMPLATES) and len(set(all_prompts())) == 40
    assert len(DIGIT_WORDS) == 10


# --- rewards ----------------------------------------------------------------------------------------


def test_classifier_heldout_accuracy_of_shipped_weights():
    from fastcps.rewards.digit import DigitReward

    x, y = load_split("heldout")
    images = ((x + 1) / 2).repeat(1, 3, 1, 1)
    reward = DigitReward()
    probs = reward.probabilities(images)
    acc = float((probs.argmax(-1) == y).float().mean())
    assert acc >= 0.95, acc
    assert float(reward.metadata["heldout_accuracy"]) >= 0.95
    r = reward(images[:8], [prompt_for(int(d)) for d in y[:8]], None)
    assert r.shape == (8,) and r.dtype == torch.float32 and bool(((r >= 0) & (r <= 1)).all())
    assert float(r.mean()) > 0.8
    # metadata beats the prompt; the wrong digit scores low
    wrong = reward(images[:8], ["the number 0"] * 8, [{"digit": (int(d) + 1) % 10} for d in y[:8]])
    assert float(wrong.mean()) < 0.2


def test_jpeg_compressibility():
    from fastcps.rewards.jpeg import JpegCompressibility

    j = JpegCompressibility()
    assert j.name == "jpeg_compressibility"
    blank = j(torch.zeros(2, 3, 16, 16), ["x", "y"], [{}, {}])
    noise = j(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ["x", "y"], [{}, {}])
    assert blank.shape == (2,) and bool((blank < 0).all())
    assert bool((blank > noise).all())  # a blank image compresses better


# --- policy -----------------------------------------------------------------------------------------


def test_policy_shapes_dtypes_and_schedule(policy):
    prompts = ["a handwritten digit seven", "the number 3", "a sketch of the digit 1"]
    cond = policy.encode(prompts)
    assert cond["encoder_hidden_states"].shape[0] == 3 and cond["encoder_hidden_states"].ndim == 3
    assert cond["pooled_projections"].shape == (3, cond["encoder_hidden_states"].shape[-1])
    assert policy.latent_shape() == (64, 4)
    s = policy.sigmas(8)
    assert s.dtype == torch.float32 and s.shape == (9,)
    assert torch.allclose(
        s, torch.tensor([1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]), atol=1e-6
    )
    x = policy.initial_noise(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 64, 4) and x.dtype == torch.float32
    v = policy.velocity(policy.transformer, x, torch.full((3,), 0.5), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and bool(torch.isfinite(v).all())
    v.square().mean().backward()  # gradients reach the trainable parameters
    params = policy.trainable_parameters()
    assert params and all(p.grad is not None for p in params)
    policy.transformer.zero_grad(set_to_none=True)
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    img = policy.decode(x * 3)
    assert img.shape == (3, 3, 16, 16) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert torch.equal(img[:, 0], img[:, 2])


def test_reference_is_frozen_copy_of_base(policy):
    x = policy.initial_noise(2, generator=torch.Generator().manual_seed(1))
    cond = policy.encode(["the number 5", "the number 6"])
    sig = torch.tensor([0.75, 0.25])
    with policy.reference(policy.transformer) as ref:
        assert ref is not policy.transformer
        assert not any(p.requires_grad for p in ref.parameters())
        with torch.no_grad():
            v_ref = policy.velocity(ref, x, sig, cond)
            v = policy.velocity(policy.transformer, x, sig, cond)
    assert torch.equal(v, v_ref)
    for (n, p), (_, q) in zip(policy.transformer.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
        assert p.data_ptr() != q.data_ptr()


def test_ode_sample_is_deterministic(policy):
    from fastcps.toy.evaluate import ode_sample

    prompts = ["the number 2", "the number 8"]
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    a = ode_sample(policy, prompts, noise, 3)
    b = ode_sample(policy, prompts, noise, 3)
    assert a.shape == noise.shape and torch.equal(a, b)


def test_missing_weights_error_names_path_and_key(tmp_path):
    from fastcps.policies.toy import ToyDigitsPolicy

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        ToyDigitsPolicy(str(missing))
    assert str(missing) in str(e.value) and "policy.pretrained" in str(e.value)


# --- pretraining ------------------------------------------------------------------------------------


def test_pretraining_is_deterministic(tmp_path):
    from fastcps.policies.toy import ToyDigitsPolicy, save_weights
    from fastcps.toy.pretrain import pretrain

    was = torch.are_deterministic_algorithms_enabled()
    a_t, a_e, cfg = pretrain(3, seed=7, batch_size=8)
    b_t, b_e, _ = pretrain(3, seed=7, batch_size=8)
    c_t, _, _ = pretrain(3, seed=8, batch_size=8)
    assert torch.are_deterministic_algorithms_enabled() == was
    for m1, m2 in ((a_t, b_t), (a_e, b_e)):
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(v, c_t.state_dict()[k]) for k, v in a_t.state_dict().items())
    # what pretrain makes, the policy loads
    path = tmp_path / "toy.safetensors"
    save_weights(path, a_t, a_e, cfg, {"steps": "3"})
    pol = ToyDigitsPolicy(str(path))
    assert pol.metadata["steps"] == "3"
    assert all(torch.equal(p, a_t.state_dict()[k]) for k, p in pol.transformer.state_dict().items())
