"""The RNG contract (docs/rng.md): known answers, golden values, invariances."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zo_optim import rng

GOLDEN = json.loads((Path(__file__).parent / "data" / "rng_golden.json").read_text())


def _w(*xs):
    return torch.tensor(xs, dtype=torch.int64)


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, "408f276d 41c83b0e a20bc7c6 6d5451fd"),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            "d16cfe09 94fdcceb 5001e420 24126ea1",
        ),
    ],
)
def test_philox_random123_known_answers(counter, key, expected):
    out = rng.philox4x32_10(_w(*counter), _w(*key))
    assert " ".join(f"{int(v):08x}" for v in out) == expected


def test_philox_batched_matches_single():
    counters = torch.randint(0, 2**32, (7, 4), dtype=torch.int64)
    key = _w(0xDEADBEEF, 0x12345678)
    batched = rng.philox4x32_10(counters, key)
    for i in range(7):
        assert torch.equal(batched[i], rng.philox4x32_10(counters[i], key))


def test_rng_version_is_the_contract():
    assert rng.RNG_VERSION == GOLDEN["rng_version"] == "philox4x32-10/bm4/v1"


def test_splitmix64_reference_value():
    # splitmix64 seeded with 0 (state incremented first): the canonical first output.
    assert rng.splitmix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("case", GOLDEN["step_seeds"], ids=lambda c: f"{c['base_seed']}-{c['t']}")
def test_step_seed_golden(case):
    assert rng.step_seed(case["base_seed"], case["t"]) == case["seed"]


@pytest.mark.parametrize("case", GOLDEN["streams"], ids=lambda c: f"n{c['numel']}-q{c['query']}")
def test_stream_golden_values(case):
    args = (case["seed"], case["tensor_id"], case["numel"], case["query"])
    torch.testing.assert_close(rng.normal(*args), torch.tensor(case["normal"]), atol=1e-6, rtol=0)
    assert rng.rademacher(*args).tolist() == [float(x) for x in case["rademacher"]]
    assert rng.rounding_words(*args).tolist() == case["rounding_words"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), tid=st.integers(0, 2**32 - 1), n=st.integers(1, 300), cut=st.integers(0, 300))
def test_z_is_a_prefix_property(seed, tid, n, cut):
    """z of element i depends on (seed, tensor_id, query, i) only: any prefix, any blocking."""
    full = rng.normal(seed, tid, n + cut)
    assert torch.equal(rng.normal(seed, tid, n), full[:n])
    rad = rng.rademacher(seed, tid, n + cut)
    assert torch.equal(rng.rademacher(seed, tid, n), rad[:n])


def test_z_independent_of_blocking():
    seed, tid, n = 99, 4, 1000
    z = rng.normal(seed, tid, n)
    # A kernel that processes counters [a, b) only must produce the same slice.
    words = rng._words(seed, tid, 40, 0, 0, start=100)
    torch.testing.assert_close(rng.box_muller4(words).reshape(-1), z[400:560], atol=0, rtol=0)


def test_streams_differ_by_tensor_query_and_seed():
    base = rng.normal(1, 0, 64)
    assert not torch.equal(base, rng.normal(1, 1, 64))
    assert not torch.equal(base, rng.normal(1, 0, 64, query=1))
    assert not torch.equal(base, rng.normal(2, 0, 64))


def test_normal_statistics():
    z = rng.normal(2024, 0, 200_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    r = rng.rademacher(2024, 0, 200_000)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean().item()) < 0.01


def test_out_of_contract_numel_raises():
    with pytest.raises(ValueError, match="2\\*\\*32 \\* 4"):
        rng.check_numel(rng.MAX_NUMEL + 1)
    rng.check_numel(rng.MAX_NUMEL)


@pytest.mark.parametrize(
    ("server_seed", "round_idx", "local_step", "seed"),
    [
        (0, 0, 0, 0xA7F72697A2731486),
        (0, 0, 1, 0xEB718AFEA1509CD1),
        (0, 1, 1, 0x65742C76D197241B),
        (42, 3, 5, 0x3620F811FD07A836),
        (2**64 - 1, 7, 1, 0xF512C768DA730A73),
        (123456789, 1000, 32, 0x4E687F19A88AFDDA),
    ],
)
def test_round_seed_golden(server_seed, round_idx, local_step, seed):
    """Golden values of the federated seeds (computed once with an independent splitmix64)."""
    assert rng.round_seed(server_seed, round_idx, local_step) == seed
    assert seed == rng.step_seed(rng.step_seed(server_seed, round_idx), local_step)


def test_round_seed_rejects_negative():
    with pytest.raises(ValueError, match="Invalid round/local step"):
        rng.round_seed(0, -1, 1)
    with pytest.raises(ValueError, match="Invalid round/local step"):
        rng.round_seed(0, 0, -1)


def test_step_seed_rejects_negative():
    with pytest.raises(ValueError, match="Invalid step counter"):
        rng.step_seed(0, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_neighbours(dtype):
    x = torch.randn(50_000, dtype=torch.float64) * 0.37
    words = rng.rounding_words(5, 1, x.numel(), 0)
    y = rng.stochastic_round(x, dtype, words).to(torch.float64)
    x32 = x.to(torch.float32).to(torch.float64)
    nearest = x32.to(dtype)
    toward = torch.where(nearest.to(torch.float64) > x32, -math.inf, math.inf).to(dtype)
    other = torch.nextafter(nearest, toward)
    # every output is one of the two representable neighbours of x
    assert torch.all((y == nearest.to(torch.float64)) | (y == other.to(torch.float64)))
    # unbiased: mean error far smaller than round-to-nearest's typical error
    rne_err = (x32.to(dtype).to(torch.float64) - x32).abs().mean()
    assert abs((y - x32).mean()) < rne_err / 20


def test_stochastic_rounding_bf16_bit_trick():
    """For bfloat16, rounding up happens iff (w >> 16) < (bits(x) & 0xFFFF) (what the kernels use)."""
    x = torch.randn(10_000) * 3
    words = rng.rounding_words(7, 1, x.numel(), 0)
    y = rng.stochastic_round(x, torch.bfloat16, words)
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    up = ((words >> 16) < (bits & 0xFFFF)).to(torch.int64)
    out = ((bits & 0xFFFF0000) + (up << 16)) & 0xFFFFFFFF
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), y.view(torch.int16))


def test_stochastic_rounding_exact_values_unchanged():
    x = torch.tensor([0.0, 1.0, -2.5, 65504.0, math.inf, -math.inf])
    words = rng.rounding_words(1, 0, x.numel(), 0)
    assert torch.equal(rng.stochastic_round(x, torch.float16, words).float(), x)
